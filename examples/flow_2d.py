"""Fit a Glow-style normalising flow to a 2-D density and plot what it learned.

What it shows: ``moonjax.models.GlowFlow`` (ActNorm, an LU-parameterised invertible
dense layer and an affine coupling per step, stacked with ``moonjax.nn.Stack``) trained
by maximum likelihood on "two moons" or a ring of Gaussians drawn with numpy. The flow
is exactly invertible, so it gives both the density ``log p(x)`` (change of variables)
and samples ``x = flow.inverse(z)``. The script writes a PNG with the data, the learned
density and samples from the flow.

Gradients: ``moonjax.moonwalk_value_and_grad`` by default (``--grad backprop`` for
``jax.value_and_grad``). The flow's loss adds a log-determinant term at every step;
Moonwalk's sweep reads those per-step terms' cotangents off its first phase, so the
same loss trains either way.

Run it (about a minute on two CPU cores)::

    pip install -e ".[examples]"
    python examples/flow_2d.py                       # two moons -> flow_2d.png
    python examples/flow_2d.py --data ring --out ring.png
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np


def two_moons(n: int, rng: np.random.Generator, noise: float = 0.08) -> np.ndarray:
    """Two interleaved half circles, centred and scaled to unit spread."""
    t = rng.uniform(0, math.pi, n)
    upper = rng.random(n) < 0.5
    x = np.where(upper, np.cos(t), 1 - np.cos(t))
    y = np.where(upper, np.sin(t), 0.5 - np.sin(t))
    pts = np.stack([x, y], -1) + noise * rng.normal(size=(n, 2))
    return ((pts - [0.5, 0.25]) / 0.75).astype(np.float32)


def ring(
    n: int, rng: np.random.Generator, modes: int = 8, radius: float = 2.0, scale: float = 0.2
) -> np.ndarray:
    """A mixture of ``modes`` Gaussians evenly spaced on a circle."""
    angle = 2 * math.pi * rng.integers(0, modes, n) / modes
    centres = radius * np.stack([np.cos(angle), np.sin(angle)], -1)
    return (centres + scale * rng.normal(size=(n, 2))).astype(np.float32)


DATASETS = {"moons": two_moons, "ring": ring}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=sorted(DATASETS), default="moons")
    p.add_argument("--steps", type=int, default=4000, help="Adam steps (default: 4000)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--depth", type=int, default=12, help="flow steps (default: 12)")
    p.add_argument("--hidden", type=int, default=64, help="coupling MLP width (default: 64)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grad", choices=["moonwalk", "backprop"], default="moonwalk",
                   help="gradient method (default: moonwalk)")
    p.add_argument("--out", default="flow_2d.png", help="PNG to write (default: flow_2d.png)")
    p.add_argument("--grid", type=int, default=200, help="density grid points per axis")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # small LAPACK calls: one thread
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import moonjax
    from moonjax.models import GlowFlow, flow_loss

    try:
        import matplotlib
    except ImportError:
        print(
            "this example draws with matplotlib: pip install 'moonjax[examples]'", file=sys.stderr
        )
        return 2
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(args.seed)
    sample_data = DATASETS[args.data]
    data = sample_data(50_000, rng)

    flow = GlowFlow(2, depth=args.depth, hidden=args.hidden, rngs=nnx.Rngs(args.seed))
    flow.initialize(jnp.asarray(data[:1024]))  # ActNorm's data-dependent init
    graphdef, params = nnx.split(flow)
    nll = flow_loss(graphdef)  # mean negative log-likelihood per dimension, nats
    schedule = optax.cosine_decay_schedule(args.lr, max(args.steps, 1), alpha=0.05)
    optimizer = optax.adam(schedule)
    opt_state = optimizer.init(params)

    value_and_grad = {
        "moonwalk": moonjax.moonwalk_value_and_grad, "backprop": jax.value_and_grad
    }[args.grad]

    @jax.jit
    def step(params, opt_state, x):
        value, grads = value_and_grad(nll)(params, x)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    held_out = jnp.asarray(sample_data(4096, rng))
    t0 = time.perf_counter()
    for i in range(args.steps):
        batch = data[rng.integers(0, len(data), args.batch_size)]
        params, opt_state, value = step(params, opt_state, jnp.asarray(batch))
        if (i + 1) % max(args.steps // 10, 1) == 0 or i + 1 == args.steps:
            print(
                f"step {i + 1:>5}/{args.steps}  train nll {float(value):.4f}  "
                f"held-out nll {float(nll(params, held_out)):.4f} nats/dim  "
                f"({time.perf_counter() - t0:.1f} s)",
                flush=True,
            )

    flow = nnx.merge(graphdef, params)
    lim = float(np.ceil(2 * 1.1 * np.percentile(np.abs(data), 99.9)) / 2)
    axis = np.linspace(-lim, lim, args.grid, dtype=np.float32)
    gx, gy = np.meshgrid(axis, axis)
    grid = jnp.asarray(np.stack([gx.ravel(), gy.ravel()], -1))
    density = np.exp(np.asarray(jax.jit(flow.log_prob)(grid))).reshape(gx.shape)
    samples = np.asarray(flow.sample(jax.random.key(args.seed + 1), 2000))
    mass = density.sum() * (axis[1] - axis[0]) ** 2
    print(f"density integrates to {mass:.3f} over the plotted square")

    fig, axes = plt.subplots(1, 3, figsize=(12, 4), constrained_layout=True)
    shown = data[:2000]
    axes[0].scatter(shown[:, 0], shown[:, 1], s=2, alpha=0.5)
    axes[0].set_title(f"data ({args.data})")
    axes[1].imshow(density, origin="lower", extent=(-lim, lim, -lim, lim), cmap="magma")
    axes[1].set_title("learned density p(x)")
    axes[2].scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.5, color="tab:orange")
    axes[2].set_title("samples x = flow.inverse(z)")
    for ax in axes:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    fig.suptitle(f"GlowFlow, depth {args.depth}, {args.steps} Adam steps ({args.grad})")
    fig.savefig(args.out, dpi=100)
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
