"""A character-level language model with a reversible transformer and Moonwalk gradients.

What it shows: ``moonjax.models.ReversibleTransformer`` (causal, Reformer / Rev-ViT style
blocks ``y1 = x1 + Attn(LN(x2))``, ``y2 = x2 + MLP(LN(y1))``) trained on a short paragraph
bundled in ``examples/data/moon.txt``, with ``moonjax.moonwalk_value_and_grad`` for the
transformer and its head, and ordinary reverse mode for the embedding in front of it.

The embedding maps integer tokens to floats, so it cannot be swept by Moonwalk (the
sweep starts from a float network input). The train step therefore

1. embeds the tokens, ``h0 = embed(tokens)``, keeping ``jax.vjp``'s pullback;
2. calls ``moonwalk_value_and_grad(loss, argnums=(0, 1), stream_argnums=1)`` on the
   transformer + head: phase 1 computes ``∂ℓ/∂h0`` and the inverse-forward sweep gives
   every block's parameter gradient without storing the blocks' activations; with
   ``h0`` in ``argnums`` its gradient is returned too;
3. pulls ``∂ℓ/∂h0`` back through the embedding.

The head is a dense layer from the ``2 * d_model`` stream width to the vocabulary; it
must not be wider than the stream (``vocab <= 2 * d_model``) so that its Jacobian is
full-rank and contracting (submersive), which Moonwalk needs. At the start the script
checks the gradients against ``jax.grad`` of the whole model, then trains and prints a
sample. It takes about a minute on two CPU cores::

    python examples/char_transformer.py
    python examples/char_transformer.py --grad backprop --steps 300
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

TEXT = Path(__file__).parent / "data" / "moon.txt"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grad", choices=("moonwalk", "backprop"), default="moonwalk")
    p.add_argument("--steps", type=int, default=600, help="Adam steps (default: 600)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=48, help="context length (default: 48)")
    p.add_argument("--d-model", type=int, default=32, help="width of each stream")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--depth", type=int, default=4, help="reversible blocks (default: 4)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", default=str(TEXT), help="a small UTF-8 text file to learn")
    p.add_argument("--sample", type=int, default=200, help="characters to generate")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # small LAPACK calls: one thread
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import moonjax
    from moonjax.models import ReversibleTransformer

    text = Path(args.text).read_text(encoding="utf-8")
    vocab = sorted(set(text))
    if len(vocab) > 2 * args.d_model:
        print(
            f"the text has {len(vocab)} distinct characters; the head needs "
            f"vocab <= 2 * d_model = {2 * args.d_model}: raise --d-model",
            file=sys.stderr,
        )
        return 2
    index = {c: i for i, c in enumerate(vocab)}
    data = np.array([index[c] for c in text], np.int32)
    T, D = args.seq_len, args.d_model
    if len(data) <= T + 1:
        print(f"the text is shorter than --seq-len {T}", file=sys.stderr)
        return 2

    rngs = nnx.Rngs(args.seed)
    # the network Moonwalk sweeps: the reversible blocks, then the dense head
    net = nnx.Sequential(
        ReversibleTransformer(D, args.heads, depth=args.depth, causal=True, rngs=rngs),
        nnx.Linear(2 * D, len(vocab), rngs=rngs),
    )
    graphdef, net_params = nnx.split(net)
    key = jax.random.key(args.seed)
    embed_params = {  # plain arrays: token and position embeddings
        "token": 0.5 * jax.random.normal(key, (len(vocab), D)),
        "position": 0.1 * jax.random.normal(jax.random.fold_in(key, 1), (T, D)),
    }
    params = {"embed": embed_params, "net": net_params}

    def embed(p, tokens):
        e = p["token"][tokens] + p["position"][: tokens.shape[-1]]
        return jnp.concatenate([e, e], -1)  # the same embedding in both streams

    def net_loss(net_params, h0, targets):
        logits = nnx.merge(graphdef, net_params)(h0)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    def full_loss(params, tokens, targets):  # for jax.grad: the whole model at once
        return net_loss(params["net"], embed(params["embed"], tokens), targets)

    swept = moonjax.moonwalk_value_and_grad(net_loss, argnums=(0, 1), stream_argnums=1)

    def value_and_grad(params, tokens, targets):
        if args.grad == "backprop":
            return jax.value_and_grad(full_loss)(params, tokens, targets)
        h0, embed_pullback = jax.vjp(lambda p: embed(p, tokens), params["embed"])
        value, (g_net, g_h0) = swept(params["net"], h0, targets)
        (g_embed,) = embed_pullback(g_h0)
        return value, {"embed": g_embed, "net": g_net}

    optimizer = optax.adam(optax.cosine_decay_schedule(args.lr, max(args.steps, 1), 0.1))
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, tokens, targets):
        value, grads = value_and_grad(params, tokens, targets)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    rng = np.random.default_rng(args.seed)

    def batch():
        start = rng.integers(0, len(data) - T - 1, args.batch_size)
        window = np.stack([data[s : s + T + 1] for s in start])
        return jnp.asarray(window[:, :-1]), jnp.asarray(window[:, 1:])

    tokens, targets = batch()
    _, ours = jax.jit(value_and_grad)(params, tokens, targets)
    ref = jax.jit(jax.grad(full_loss))(params, tokens, targets)
    err = max(
        float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True)
    )
    print(
        f"{args.grad} gradient vs jax.grad of the whole model: max relative difference "
        f"{err:.1e} ({jnp.result_type(*jax.tree.leaves(params))})"
    )
    compiled = step.lower(params, opt_state, tokens, targets).compile()  # compiled once
    memory = compiled.memory_analysis()
    if memory is not None:
        print(f"XLA temp memory of one train step: {memory.temp_size_in_bytes / 2**20:.2f} MiB")

    t0 = time.perf_counter()
    for i in range(args.steps):
        params, opt_state, value = compiled(params, opt_state, *batch())
        if (i + 1) % max(args.steps // 10, 1) == 0 or i + 1 == args.steps:
            print(
                f"step {i + 1:>4}/{args.steps}  loss {float(value):.3f} nats/char  "
                f"({time.perf_counter() - t0:.1f} s)",
                flush=True,
            )

    model = nnx.merge(graphdef, params["net"])

    @jax.jit
    def next_logits(tokens):
        return model(embed(params["embed"], tokens))[-1]

    context = list(data[:T])
    out = []
    for _ in range(args.sample):
        logits = np.asarray(next_logits(jnp.asarray(context[-T:])))
        c = int(
            rng.choice(
                len(vocab), p=np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            )
        )
        out.append(vocab[c])
        context.append(c)
    print("prompt: " + repr(text[:T]))
    print("sample: " + repr("".join(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
