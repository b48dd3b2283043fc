"""Every activation of ``jax.nn`` on the spine of a dense MLP: moonwalk == jax.grad.

Strictly monotone activations are swept by ``g / φ'(x)`` (no fragment, so they work
with ``fragments=False``); the others lose part of the cotangent where ``φ'`` vanishes
or the map folds, and are exact through fragments under the default. The table is
checked against ``dir(jax.nn)``: a new JAX activation fails the test until it is
classified here.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nets import assert_grads_close

import moonjax

# swept by g / φ'(x): the derivative is proved never to vanish
MONOTONE = {
    "sigmoid": jax.nn.sigmoid,
    "tanh": jax.nn.tanh,
    "softplus": jax.nn.softplus,
    "log_sigmoid": jax.nn.log_sigmoid,
    "leaky_relu": jax.nn.leaky_relu,
    "elu": jax.nn.elu,
    "celu": jax.nn.celu,
    "selu": jax.nn.selu,
    "identity": jax.nn.identity,
}
# exact through fragments: φ' is 0 somewhere (flat pieces, a fold) or, for soft_sign
# and squareplus, its positivity is beyond the interval analysis
FRAGMENT = {
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "hard_sigmoid": jax.nn.hard_sigmoid,
    "hard_silu": jax.nn.hard_silu,
    "hard_swish": jax.nn.hard_swish,
    "hard_tanh": jax.nn.hard_tanh,
    "silu": jax.nn.silu,
    "swish": jax.nn.swish,
    "mish": jax.nn.mish,
    "gelu": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_exact": functools.partial(jax.nn.gelu, approximate=False),
    "sparse_plus": jax.nn.sparse_plus,
    "sparse_sigmoid": jax.nn.sparse_sigmoid,
    "soft_sign": jax.nn.soft_sign,
    "squareplus": jax.nn.squareplus,
}
NOT_AN_ELEMENTWISE_ACTIVATION = {
    "glu": "splits its input in two halves and multiplies them: not elementwise",
    "softmax": "normalises over an axis: not elementwise",
    "log_softmax": "normalises over an axis: not elementwise",
    "logsumexp": "a reduction",
    "logmeanexp": "a reduction",
    "standardize": "normalises over an axis",
    "one_hot": "integer encoding, not an activation",
    "log1mexp": "defined for x > 0 only (NaN elsewhere): not a whole-line activation",
    "dot_product_attention": "attention, not an activation",
    "scaled_dot_general": "a matmul",
    "scaled_matmul": "a matmul",
    "get_scaled_dot_general_config": "a configuration helper",
    "initializers": "a module",
}


def test_every_jax_nn_function_is_classified():
    names = {n for n in dir(jax.nn) if not n.startswith("_")}
    classified = set(MONOTONE) | set(FRAGMENT) | set(NOT_AN_ELEMENTWISE_ACTIVATION)
    classified -= {"gelu_exact"}
    assert names - classified == set()


def mlp_loss(act):
    def loss(params, x):
        h = x
        for w, b in params[:-1]:
            h = act(h @ w + b)  # the activation on the spine
        w, b = params[-1]
        return jnp.mean((h @ w + b) ** 2)

    return loss


def make(seed, width=5, depth=2, batch=7):
    key = jax.random.PRNGKey(seed)
    ks = jax.random.split(key, 2 * depth + 2)
    params = [(jax.random.normal(ks[2 * i], (width, width)) / np.sqrt(width),
               0.3 * jax.random.normal(ks[2 * i + 1], (width,))) for i in range(depth)]
    x = 1.5 * jax.random.normal(ks[-1], (batch, width))
    return params, x


@pytest.mark.parametrize("name", sorted(MONOTONE))
def test_monotone_activation_is_swept_by_its_derivative(x64, name):
    loss = mlp_loss(MONOTONE[name])
    for seed in range(3):
        params, x = make(seed)
        got = moonjax.moonwalk_grad(loss, fragments=False)(params, x)
        assert_grads_close(got, jax.jit(jax.grad(loss))(params, x))
    report = moonjax.check(loss, params, x, fragments=False)
    assert report.ok and report.fragment_bytes == 0, report


@pytest.mark.parametrize("name", sorted(FRAGMENT))
def test_non_monotone_activation_is_exact_through_fragments(x64, name):
    loss = mlp_loss(FRAGMENT[name])
    for seed in range(3):
        params, x = make(seed)
        got = moonjax.moonwalk_grad(loss, mode="mixed")(params, x)
        assert_grads_close(got, jax.jit(jax.grad(loss))(params, x))
    report = moonjax.check(loss, params, x, mode="mixed")
    assert report.ok and not report.submersive and report.fragment_bytes > 0, report


@pytest.mark.parametrize("name", ["gelu", "silu", "mish", "relu"])
def test_non_monotone_activation_without_fragments_names_the_users_line(x64, name):
    loss = mlp_loss(FRAGMENT[name])
    params, x = make(0)
    with pytest.raises(moonjax.NotSubmersiveError,
                       match=re.escape("test_activations.py")):
        moonjax.moonwalk_grad(loss, mode="mixed", fragments=False)(params, x)


def test_activation_used_twice_inside_a_region_and_under_jit(x64):
    # a user's own elementwise map that reads the spine value three times, inside a
    # nested jit and a custom_jvp: one strictly monotone region (derivative > 0)
    @jax.custom_jvp
    def smooth(x):
        return x + jax.nn.softplus(x) + jnp.tanh(x)

    smooth.defjvp(lambda p, t: (smooth(*p), t[0] * (1 + jax.nn.sigmoid(p[0])
                                                     + 1 - jnp.tanh(p[0]) ** 2)))
    loss = mlp_loss(jax.jit(smooth))
    for seed in range(3):
        params, x = make(seed)
        got = moonjax.moonwalk_grad(loss, fragments=False)(params, x)
        assert_grads_close(got, jax.jit(jax.grad(loss))(params, x))
