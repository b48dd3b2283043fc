"""The benchmark: its baselines are exact, its depth search is exact, its CLI reports sanely."""

from __future__ import annotations

import io
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moonjax import bench, cli
from moonjax.bench import _report
from moonjax.bench._methods import _moonwalk
from moonjax.bench._models import MODELS, STACKS

MODEL_NAMES = list(MODELS)


def _rel(a, b) -> float:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    num = sum(float(jnp.sum((x - y) ** 2)) for x, y in pairs)
    den = sum(float(jnp.sum(y**2)) for y in jax.tree.leaves(b))
    return math.sqrt(num / den)


def _small_problem(name, depth=3, width=8, batch=2, dtype=jnp.float32):
    model = MODELS[name]
    params = bench.init_params(model, 0, depth, width, dtype)
    x, y = bench.make_data(model, 0, batch, width, dtype)
    return model, params, x, y


# -- models and baselines ----------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if MODELS[n].inverse is not None])
def test_layer_inverse_rebuilds_the_input(name):
    model, params, x, _ = _small_problem(name)
    layers = params["layers"]
    layer0 = layers[0] if model.unrolled else jax.tree.map(lambda a: a[0], layers)
    roundtrip = jax.jit(lambda p, h: model.inverse(p, model.layer(p, h)))
    np.testing.assert_allclose(roundtrip(layer0, x), x, atol=1e-5)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("stack", [s for s in STACKS if s != "plain"])
def test_remat_and_revbackprop_match_grad_float64(name, stack):
    if stack == "reversible" and MODELS[name].inverse is None:
        with pytest.raises(ValueError, match="inverse"):
            bench.make_loss(MODELS[name], stack)
        return
    with jax.enable_x64(True):
        _, params, x, y = _small_problem(name, dtype=jnp.float64)
        model = MODELS[name]
        assert x.dtype == jnp.float64
        ref = jax.grad(bench.make_loss(model, "plain"))(params, x, y)
        got = jax.grad(bench.make_loss(model, stack))(params, x, y)
        assert jax.tree.structure(got) == jax.tree.structure(ref)
        assert _rel(got, ref) <= 1e-9


def test_naive_forward_matches_grad_float64():
    with jax.enable_x64(True):
        model, params, x, y = _small_problem("leaky_mlp", depth=2, dtype=jnp.float64)
        loss = bench.make_loss(model)
        got = bench.naive_forward_grad(loss)(params, x, y)
        assert _rel(got, jax.grad(loss)(params, x, y)) <= 1e-9


def test_moonwalk_mode_unknown_to_moonjax_is_unavailable():
    with pytest.raises(bench.MethodUnavailable, match="no_such_mode"):
        _moonwalk("no_such_mode")(MODELS["revnet_mlp"])


# -- the depth search --------------------------------------------------------------------------


def _brute_force(bytes_at, budget, cap):
    best = 0
    for d in range(1, cap + 1):
        if bytes_at(d) > budget:
            break
        best = d
    return best


@pytest.mark.parametrize(
    "bytes_at",
    [
        lambda d: 1000 + 37 * d,  # affine, like a scanned stack
        lambda d: 5 * d * d,  # convex
        lambda d: 4000 * math.isqrt(d) + d,  # concave
        lambda d: 100 * math.ceil(d / 64) * 64,  # staircase (allocation granularity)
        lambda d: 2 ** (d // 50),  # explosive
    ],
)
@pytest.mark.parametrize("budget", [10**5, 123_457])
def test_largest_depth_is_exact_on_monotone_memory(bytes_at, budget):
    cap = 4096
    seen = []

    def tracked(d):
        seen.append(d)
        return bytes_at(d)

    limit = bench.largest_depth(tracked, budget, cap=cap)
    expected = _brute_force(bytes_at, budget, cap)
    assert limit.depth == expected
    assert limit.capped == (expected == cap)
    assert limit.evaluations == len(set(seen)) == len(seen)  # each depth compiled once
    assert len(seen) <= 2 * math.ceil(math.log2(cap)) + 4


def test_largest_depth_affine_memory_needs_two_compiles_after_three_seeds():
    f = lambda d: 1000 + 37 * d
    known = {d: f(d) for d in (16, 64, 256)}
    limit = bench.largest_depth(f, 10**6, cap=2**20, known=known)
    assert limit.depth == (10**6 - 1000) // 37
    assert limit.evaluations == 2


def test_largest_depth_edge_cases():
    assert bench.largest_depth(lambda d: 10 * d, 5).depth == 0  # even depth 1 is over
    flat = bench.largest_depth(lambda d: 7, 100, cap=1000)
    assert (flat.depth, flat.capped) == (1000, True)
    with pytest.raises(ValueError, match="nondecreasing"):
        bench.largest_depth(lambda d: 0, 10, known={4: 100, 8: 5})


def test_parse_bytes():
    assert bench.parse_bytes("1GiB") == 2**30
    assert bench.parse_bytes("512 MiB") == 2**29
    assert bench.parse_bytes("2GB") == 2 * 10**9
    assert bench.parse_bytes("12345") == 12345
    with pytest.raises(ValueError):
        bench.parse_bytes("lots")


# -- the command line --------------------------------------------------------------------------


def _check_results(data, models, methods):
    assert data["config"]["models"] == list(models)
    assert data["meta"]["jax"] == jax.__version__
    for meth in methods:
        assert meth in data["meta"]["methods"]
    rows = data["rows"]
    for model in models:
        for meth in methods:
            if data["meta"]["methods"][meth]["status"] != "ok":
                assert any(meth in n for n in data["notes"])
                continue
            mine = [r for r in rows if r["model"] == model and r["method"] == meth]
            assert {r["depth"] for r in mine} == set(data["config"]["depths"])
            if meth == "revbackprop" and model == "relu_mlp":  # no inverse: said so
                assert all(r["status"] == "skipped" and "no inverse" in r["note"]
                           for r in mine), mine
                continue
            if model == "relu_mlp" and meth in ("moonwalk_mixed", "moonwalk_forward"):
                # the sweep through ReLU layers, forced: exact or a moonjax error saying why
                mine = [r for r in mine if r["status"] != "error" or not re.match(
                    r"(NotSubmersiveError|DriftError): ", r["note"])]
            for r in mine:
                assert r["status"] == "ok", r
                assert r["time_s"] > 0 and r["runs"] >= 1
                assert r["temp_bytes"] >= 0 and r["peak_bytes"] >= r["temp_bytes"]
                assert r["compile_s"] > 0
                assert r["time_ratio"] > 0
                assert r["grad_error"] < 1e-4
            if meth == "backprop":
                assert all(r["time_ratio"] == pytest.approx(1.0) for r in mine)
    for lim in data["limits"]:
        if lim["status"] == "ok":
            assert lim["max_depth"] >= max(data["config"]["depths"]), lim
            assert lim["ratio"] > 0
    # headline verdicts only where they mean something (not at --quick's smoke sizes)
    assert bool(data["checks"]) == data["config"]["verdicts"]


def test_bench_quick_one_model_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")  # the CLI would set it otherwise
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    methods = ["backprop", "naive_forward", "moonwalk_mixed", "moonwalk_reversible"]
    argv = [
        "bench",
        "--quick",
        "--models",
        "leaky_mlp",
        "--methods",
        ",".join(methods),
        "--no-progress",
        "--json",
        str(out),
        "--markdown",
        str(md),
    ]
    assert cli.main(argv) == 0
    data = json.loads(out.read_text())
    _check_results(data, ["leaky_mlp"], methods)
    assert "largest depth" in capsys.readouterr().out
    assert "| leaky_mlp | naive_forward |" in md.read_text()
    again = bench.Results.from_json(data)
    assert _report.markdown(again) == md.read_text()
    monkeypatch.setattr(_report, "HAVE_RICH", False)  # the plain-text fallback
    plain = io.StringIO()
    _report.print_report(again, plain)
    assert "largest depth under" in plain.getvalue()
    assert "leaky_mlp  moonwalk_mixed" in plain.getvalue()


@pytest.mark.slow
def test_bench_quick_all_models_writes_json(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    _check_results(data, list(bench.QUICK_MODELS), list(bench.METHODS))


def test_cli_without_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "bench" in capsys.readouterr().err


def test_cli_rejects_unknown_model(capsys):
    assert cli.main(["bench", "--models", "resnet9000"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert cli.main(["bench", "--quick", "--plot", "x.png"]) == 2
    assert "pip install" in capsys.readouterr().err
    with pytest.raises(_report.PlotUnavailable, match="matplotlib"):
        _report.plot(None, "x.png")


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    results = bench.run(
        bench.BenchConfig.quick(models=("revnet_mlp",), methods=("backprop",), reference=False)
    )
    path = tmp_path / "bench.png"
    bench.plot(results, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the paper's comparisons (``moonjax bench --paper``) -------------------------------------


def test_bench_paper_quick_reports_forward_speedup_beside_the_papers(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    out, md = tmp_path / "paper.json", tmp_path / "paper.md"
    # --max-depth 6: the depth search stops at the timed depth (no extra compiles)
    argv = ["bench", "--paper", "--quick", "--max-depth", "6", "--no-progress",
            "--json", str(out), "--markdown", str(md)]
    assert cli.main(argv) == 0
    results = bench.Results.from_json(json.loads(out.read_text()))
    assert results.config.paper and results.config.models == ("revnet_mlp",)
    assert set(results.config.methods) == {
        "backprop", "naive_forward", "moonwalk_forward", "moonwalk_mixed"}
    (fwd,) = bench.forward_comparison(results)
    assert (fwd.model, fwd.depth, fwd.paper, fwd.note) == ("revnet_mlp", 6, 27.0, "")
    assert fwd.features == 8 and fwd.params == results.rows[0].params
    assert fwd.speedup == pytest.approx(fwd.naive_s / fwd.forward_s) and fwd.speedup > 0
    # the gradients agree: both within float32 round-off of a float64 jax.grad
    assert fwd.naive_error < 1e-5 and fwd.forward_error < 1e-5
    (mixed,) = bench.mixed_comparison(results)
    assert mixed.time_ratio > 0 and mixed.temp_ratio > 0 and mixed.note == ""
    assert mixed.mixed_error < 1e-5
    text = md.read_text()
    assert text == _report.markdown(results)
    assert "| revnet_mlp | 6 | 496 | 8 |" in text and "| 27x |" in text
    assert "moonwalk_mixed against jax.grad" in text


def _row(method, depth, time_s, status="ok", note=""):
    return bench.Row("revnet_mlp", method, depth, 8, 64, 100 * depth, status, note,
                     time_s=time_s, time_ratio=time_s, temp_bytes=1000, temp_ratio=0.5,
                     grad_error=1e-7)


def test_paper_comparison_reads_the_rows_and_says_what_was_not_run():
    config = bench.paper_config()
    assert (config.depths, config.width, config.batch) == ((6, 60), 8, 64)
    rows = [_row("backprop", d, 1.0) for d in (6, 60)]
    rows += [_row("naive_forward", 6, 30.0), _row("moonwalk_forward", 6, 2.0),
             _row("naive_forward", 60, None, "skipped", "too many parameters"),
             _row("moonwalk_forward", 60, 5.0), _row("moonwalk_mixed", 60, 1.5)]
    limits = [bench.Limit("revnet_mlp", "moonwalk_mixed", "ok", 1000, True, 4.0)]
    results = bench.Results(config, {}, rows, limits, [])
    six, sixty = bench.forward_comparison(results)
    assert (six.speedup, six.paper, six.note) == (15.0, 27.0, "")
    assert (sixty.speedup, sixty.paper) == (None, 110.0)
    assert sixty.note == "naive_forward skipped: too many parameters"
    m6, m60 = bench.mixed_comparison(results)
    assert m6.note == "moonwalk_mixed not run" and m6.mixed_s is None
    assert (m60.time_ratio, m60.temp_ratio, m60.depth_ratio, m60.depth_capped) == (
        1.5, 0.5, 4.0, True)
    cells = [_report.forward_cells(c) for c in (six, sixty)]
    assert [c[6:8] for c in cells] == [["15.0x", "27x"], ["-", "110x"]]
    assert _report.mixed_cells(m60)[6] == ">=4.00x"
