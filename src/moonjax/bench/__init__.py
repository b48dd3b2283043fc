"""``moonjax bench``: Moonwalk against backprop, remat, reversible backprop and forward gradients.

Each method's gradient is compiled and run on the same models, data and device, in one
process. Reported per (model, method, depth): time as a ratio to ``jax.grad``, XLA's
temporary and peak bytes, compile time and the relative error against a float64
``jax.grad``; and per (model, method) the largest depth whose compiled gradient fits a
memory budget (found by compiling only). Run it as ``moonjax bench`` or
``python -m moonjax.bench``; ``--help`` lists the flags. ``moonjax bench --paper``
(``paper_config``) measures the paper's own comparisons and prints each figure beside
the paper's.

Example:
  >>> from moonjax import bench
  >>> results = bench.run(bench.BenchConfig.quick(models=("revnet_mlp",)))  # doctest: +SKIP
  >>> bench.print_report(results)  # doctest: +SKIP
"""

from moonjax.bench._measure import DepthLimit, Memory, largest_depth, parse_bytes
from moonjax.bench._methods import METHODS, Method, MethodUnavailable, naive_forward_grad
from moonjax.bench._models import MODELS, Model, init_params, make_data, make_loss
from moonjax.bench._paper import (
    ForwardComparison,
    MixedComparison,
    forward_comparison,
    mixed_comparison,
    paper_config,
)
from moonjax.bench._report import markdown, plot, print_report, write_json
from moonjax.bench._run import QUICK_MODELS, BenchConfig, Limit, Results, Row, run

__all__ = [
    "METHODS",
    "MODELS",
    "BenchConfig",
    "QUICK_MODELS",
    "DepthLimit",
    "ForwardComparison",
    "Limit",
    "Memory",
    "Method",
    "MethodUnavailable",
    "MixedComparison",
    "Model",
    "Results",
    "Row",
    "forward_comparison",
    "init_params",
    "largest_depth",
    "make_data",
    "make_loss",
    "markdown",
    "mixed_comparison",
    "naive_forward_grad",
    "paper_config",
    "parse_bytes",
    "plot",
    "print_report",
    "run",
    "write_json",
]
