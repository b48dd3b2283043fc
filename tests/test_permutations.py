"""Permutations by ``gather`` (``x[:, perm]``, ``jnp.take``): exact, and checked.

A ``gather`` that picks whole slices along one axis with an index array the program
holds is crossed as a permutation: the vijp applies the same gather to the cotangent,
the inverse (reversible mode) applies the inverse permutation. That the array is a
permutation is checked at run time: if it is not, the gradient is NaN, and with
``debug=True`` a :class:`moonjax.NotPermutationError` names the line.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from nets import assert_grads_close

import moonjax

DIM = 6


def coupling(h, p):
    a, b = jnp.split(h, 2, -1)
    b = b * jnp.exp(0.5 * jnp.tanh(a @ p["v"])) + jnp.tanh(a @ p["w"])
    return jnp.concatenate([a, b], -1)


PERMUTE = {
    "fancy index": lambda h, perm: h[:, perm],
    "take": lambda h, perm: jnp.take(h, perm, axis=-1),
    "ellipsis index": lambda h, perm: h[..., perm],
}


def params(seed, depth=3):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    half = DIM // 2
    return {"w": jax.random.normal(k1, (depth, half, half)),
            "v": 0.5 * jax.random.normal(k2, (depth, half, half))}


def data(seed):
    return jax.random.normal(jax.random.PRNGKey(50 + seed), (5, DIM))


def unrolled(permute, perm_const=None):
    """Couplings with a permutation between them; ``perm`` a constant or an argument."""

    def loss(p, x, perm=None):
        perm = perm_const if perm is None else perm
        h = x
        for i in range(p["w"].shape[0]):
            h = coupling(h, {k: v[i] for k, v in p.items()})
            h = permute(h, perm)
        return jnp.mean(jnp.sum(h ** 2, -1))

    return loss


def scanned(permute):
    def loss(p, x, perm):
        def step(h, q):
            return permute(coupling(h, q), perm), None

        h, _ = lax.scan(step, x, p)
        return jnp.mean(jnp.sum(jnp.tanh(h) ** 2, -1))

    return loss


@pytest.mark.parametrize("how", sorted(PERMUTE))
def test_gather_permutation_is_exact(how):
    for seed in range(2):
        perm = np.random.default_rng(seed).permutation(DIM)
        p, x = params(seed), data(seed)
        const = unrolled(PERMUTE[how], perm)  # the array is a constant of the program
        assert_grads_close(moonjax.moonwalk_grad(const)(p, x), jax.grad(const)(p, x))
        arg = unrolled(PERMUTE[how])  # a non-differentiated argument
        got = moonjax.moonwalk_grad(arg)(p, x, jnp.asarray(perm))
        assert_grads_close(got, jax.grad(arg)(p, x, jnp.asarray(perm)))


@pytest.mark.parametrize("mode", ["mixed", "reversible"])
def test_gather_permutation_in_a_scan_is_exact_and_swept(mode):
    loss = scanned(PERMUTE["take"])
    for seed in range(3):
        perm = jnp.asarray(np.random.default_rng(10 + seed).permutation(DIM))
        p, x = params(seed, depth=4), data(seed)
        got = moonjax.moonwalk_grad(loss, mode=mode)(p, x, perm)
        assert_grads_close(got, jax.grad(loss)(p, x, perm))
    # swept, not recorded: the permutation needs no fragment
    report = moonjax.check(loss, p, x, perm)
    assert report.ok, report
    assert report.fragment_bytes == 0, report


@pytest.mark.parametrize("mode", ["mixed", "reversible"])
def test_gather_with_a_non_permutation_gives_nan_or_the_error(mode):
    loss = unrolled(PERMUTE["take"]) if mode == "mixed" else scanned(PERMUTE["take"])
    p, x = params(0, depth=4), data(0)
    bad = jnp.asarray([0, 1, 2, 3, 3, 5])  # 3 twice, 4 never
    got = moonjax.moonwalk_grad(loss, mode=mode, on_drift="nan")(p, x, bad)
    assert all(bool(jnp.all(jnp.isnan(g))) for g in jax.tree_util.tree_leaves(got))
    # the same program with a permutation is exact: the check is about the values
    good = jnp.asarray([0, 1, 2, 3, 5, 4])
    assert_grads_close(moonjax.moonwalk_grad(loss, mode=mode)(p, x, good),
                       jax.grad(loss)(p, x, good))
    if mode == "mixed":
        with pytest.raises(moonjax.NotPermutationError,
                           match=re.escape("the index array of a gather is not a "
                                           "permutation")) as e:
            moonjax.moonwalk_grad(loss, mode="mixed", debug=True)(p, x, bad)
        assert "test_permutations.py:" in str(e.value), e.value
