"""Plain-JAX networks shared by the tests: unrolled and scanned, as users write them."""

import jax
import jax.numpy as jnp
import numpy as np


def near_identity(key, depth, d, scale=0.3):
    w = jax.random.normal(key, (depth, d, d)) * scale / np.sqrt(d)
    return w + jnp.eye(d)


def mlp_params(key, depth, d):
    k1, k2 = jax.random.split(key)
    return {"w": near_identity(k1, depth, d), "b": 0.1 * jax.random.normal(k2, (depth, d))}


def coupling_params(key, depth, d, hidden=16):
    k1, k2, k3 = jax.random.split(key, 3)
    h = d // 2
    return {
        "w1": jax.random.normal(k1, (depth, h, hidden)) * 0.5 / np.sqrt(h),
        "b1": 0.1 * jax.random.normal(k3, (depth, hidden)),
        "w2": jax.random.normal(k2, (depth, hidden, h)) * 0.5 / np.sqrt(hidden),
    }


def leaky_layer(h, p, slope=0.2):
    return jax.nn.leaky_relu(h @ p["w"] + p["b"], slope)


def tanh_layer(h, p):
    return jnp.tanh(h @ p["w"] + p["b"])


def additive_layer(h, p):
    x1, x2 = jnp.split(h, 2, -1)
    t = jax.nn.gelu(x1 @ p["w1"] + p["b1"]) @ p["w2"]
    return jnp.concatenate([x2 + t, x1], -1)


def affine_layer(h, p):
    x1, x2 = jnp.split(h, 2, -1)
    z = jnp.tanh(x1 @ p["w1"] + p["b1"])
    s = z @ p["w2"]
    return jnp.concatenate([x2 * jax.nn.sigmoid(s + 2.0) + jnp.tanh(s), x1], -1)


LAYERS = {"leaky": leaky_layer, "tanh": tanh_layer, "additive": additive_layer,
          "affine": affine_layer}
PARAMS = {"leaky": mlp_params, "tanh": mlp_params, "additive": coupling_params,
          "affine": coupling_params}


def unrolled(layer):
    def apply(params, x):
        depth = jax.tree_util.tree_leaves(params)[0].shape[0]
        for i in range(depth):
            x = layer(x, jax.tree_util.tree_map(lambda a, i=i: a[i], params))
        return x
    return apply


def scanned(layer):
    def apply(params, x):
        return jax.lax.scan(lambda h, p: (layer(h, p), None), x, params)[0]
    return apply


def classification_loss(apply):
    def loss(params, x, y):
        logits = apply(params, x)
        return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * y, -1))
    return loss


def data(key, batch, d, dtype=jnp.float64):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (batch, d), dtype)
    y = jax.nn.one_hot(jax.random.randint(ky, (batch,), 0, d), d, dtype=dtype)
    return x, y


def assert_grads_close(got, want, rtol=1e-8):
    """Leaf by leaf, ``rtol`` relative to each entry and to the leaf's largest entry."""
    got, want = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert len(got) == len(want) and want
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol,
                                   atol=rtol * float(jnp.max(jnp.abs(w))))


def rel_err(a, b):
    num = sum(float(jnp.sum((x - y) ** 2)) for x, y in
              zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))
    den = sum(float(jnp.sum(y ** 2)) for y in jax.tree_util.tree_leaves(b))
    return (num / den) ** 0.5


def line_of(fn, text):
    """The line number of the line of ``fn``'s source that contains ``text``."""
    import inspect

    lines, start = inspect.getsourcelines(fn)
    for k, line in enumerate(lines):
        if text in line:
            return start + k
    raise AssertionError(f"{text!r} not in the source of {fn.__name__}")
