"""Errors say what (the primitive or argument), where (the user's file:line) and what to do.

Extends ``test_transforms.py`` (top-level sort, ReLU, expanding dense layer, residual
block, basic argument and loss checks): here the same families inside ``lax.scan``
bodies, in every mode, for more primitives, and the argument, loss and ``debug``
errors around the transform.
"""

import inspect
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nets import line_of

import moonjax

HERE = os.path.basename(__file__)
MODES = ["mixed", "reversible", "forward"]

W = jnp.eye(4) + 0.1
X = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
WS = jnp.stack([W, W.T, W])


def _points_at(err, fn, text):
    """The message names this file and the line of ``fn`` that contains ``text``."""
    msg = str(err.value)
    want = f"{HERE}:{line_of(fn, text)}"
    assert want in msg, f"{want} not in:\n{msg}"
    return msg


def _scan_loss(layer):
    def loss(ws, x):
        h = jax.lax.scan(lambda h, w: (layer(h, w), None), x, ws)[0]
        return jnp.sum(h ** 2)

    return loss


# -- unsupported primitives ------------------------------------------------------------


def _sort_layer(h, w):
    return jnp.sort(h @ w, axis=-1)  # marker: sort layer


@pytest.mark.parametrize("mode", ["mixed", "forward"])
def test_unsupported_primitive_in_a_scan_body_names_it_and_the_body_line(mode):
    with pytest.raises(moonjax.UnsupportedPrimitiveError) as e:
        moonjax.moonwalk_grad(_scan_loss(_sort_layer), mode=mode, fragments=False)(WS, X)
    msg = _points_at(e, _sort_layer, "marker: sort layer")
    assert "`sort`" in msg and "register_vijp" in msg and "custom_vijp" in msg


def test_reversible_mode_cannot_invert_an_unsupported_primitive():
    with pytest.raises(moonjax.MoonjaxError) as e:
        moonjax.moonwalk_grad(_scan_loss(_sort_layer), mode="reversible",
                              fragments=False)(WS, X)
    msg = _points_at(e, _sort_layer, "marker: sort layer")
    assert "sort" in msg


def test_unsupported_primitive_error_is_a_not_implemented_error():
    with pytest.raises(NotImplementedError):
        moonjax.moonwalk_grad(_scan_loss(_sort_layer), mode="mixed", fragments=False)(WS, X)


def test_cumsum_without_a_rule_is_unsupported_at_its_line():
    def loss(w, x):
        h = jnp.cumsum(x @ w, axis=-1)  # marker
        return jnp.sum(jnp.tanh(h @ w))

    with pytest.raises(moonjax.UnsupportedPrimitiveError) as e:
        moonjax.moonwalk_grad(loss, mode="mixed", fragments=False)(W, X)
    assert "cumsum" in _points_at(e, loss, "# marker")


def test_a_primitive_inside_an_installed_library_points_at_the_users_call(tmp_path,
                                                                          monkeypatch):
    # a library in a virtual environment's site-packages is not the user's code, even
    # though JAX (which skips only itself and the standard library) would show it
    lib = tmp_path / "site-packages"
    lib.mkdir()
    (lib / "moonjax_fake_lib.py").write_text(
        "import jax.numpy as jnp\n\n"
        "def layer(h, w):\n"
        "    return jnp.sort(h @ w, axis=-1)\n"
    )
    monkeypatch.syspath_prepend(str(lib))
    import moonjax_fake_lib

    def loss(w, x):
        return jnp.sum(jnp.tanh(moonjax_fake_lib.layer(x, w) @ w))  # marker: library call

    with pytest.raises(moonjax.UnsupportedPrimitiveError) as e:
        moonjax.moonwalk_grad(loss, mode="mixed", fragments=False)(W, X)
    assert "moonjax_fake_lib" not in _points_at(e, loss, "marker: library call")


# -- non-submersive layers -------------------------------------------------------------


def _relu_layer(h, w):
    return jax.nn.relu(h @ w)  # marker: relu layer


@pytest.mark.parametrize("mode", ["reversible", "forward"])
def test_relu_in_a_scan_body_is_not_submersive_in_modes_without_fragments(mode):
    # without fragments (or, in reversible mode, the checkpointed fallback) the other
    # modes refuse a ReLU spine at its line
    with pytest.raises(moonjax.NotSubmersiveError) as e:
        moonjax.moonwalk_grad(_scan_loss(_relu_layer), mode=mode, fragments=False)(WS, X)
    msg = _points_at(e, _relu_layer, "marker: relu layer")
    assert "`max`" in msg and "not submersive" in msg and "fragments" in msg


def test_relu_in_a_scan_body_without_fragments_points_at_the_body_line():
    with pytest.raises(moonjax.NotSubmersiveError) as e:
        moonjax.moonwalk_grad(_scan_loss(_relu_layer), mode="mixed", fragments=False)(WS, X)
    _points_at(e, _relu_layer, "marker: relu layer")


def test_expanding_dense_layer_in_a_scan_body_is_not_submersive():
    def layer(h, w):
        return jnp.tanh(h @ w)[..., :4]  # marker

    def loss(p, x):
        h = jax.lax.scan(lambda h, w: (layer(h, w), None), x, p)[0]
        return jnp.sum(h ** 2)

    wide = jnp.ones((2, 4, 6))  # 4 -> 6 features, then a slice that drops two
    with pytest.raises(moonjax.NotSubmersiveError) as e:
        moonjax.moonwalk_grad(loss, mode="mixed", fragments=False)(wide, X)
    msg = _points_at(e, layer, "# marker")
    assert "maps 4 features to 6" in msg


def _abs(h, w):
    return jnp.abs(h @ w)


def _square(h, w):
    return (h @ w) ** 2


def _product(h, w):
    h = h @ w
    return h * h  # two spine operands


def _drop(h, w):
    return (h @ w)[:, :3] @ w[:3]  # a slice that drops a column


def _broadcast(h, w):
    return jnp.broadcast_to((h @ w)[None], (2,) + h.shape)


def _pad(h, w):
    return jnp.concatenate([h @ w, jnp.ones_like(h[:, :1])], -1) @ jnp.ones((5, 4))


@pytest.mark.parametrize(
    "layer, primitive, reason",
    [
        (_abs, "abs", "not one-to-one"),
        (_square, "integer_pow", "even exponent 2"),
        (_product, "mul", "both depend on the spine input"),
        (_drop, "slice", "do not partition"),
        (_broadcast, "broadcast_in_dim", "expanding map"),
        (_pad, "concatenate", "do not depend on the network input"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_non_submersive_primitives_name_themselves_why_and_where(layer, primitive, reason):
    def loss(w, x):
        return jnp.sum(jnp.tanh(layer(x, w) @ w))

    with pytest.raises(moonjax.NotSubmersiveError) as e:
        moonjax.moonwalk_grad(loss, mode="mixed", fragments=False)(W, X)
    msg = str(e.value)
    assert f"primitive: {primitive}" in msg and reason in msg
    src, start = inspect.getsourcelines(layer)
    assert f"{HERE}:{start + len(src) - 1}" in msg  # the layer's return line


def test_non_submersive_errors_work_with_fragments_in_mixed_mode():
    # the same ReLU that the other modes refuse is exact with fragments (the default)
    loss = _scan_loss(_relu_layer)
    got = moonjax.moonwalk_grad(loss)(WS, X)
    assert np.allclose(got, jax.grad(loss)(WS, X), rtol=1e-10, atol=1e-12)


# -- a value feeding two layers --------------------------------------------------------


def _residual(h, w):
    return h + jnp.tanh(h @ w)  # marker: residual


@pytest.mark.parametrize("mode", ["mixed", "forward"])
def test_residual_in_a_scan_body_names_both_uses_with_their_lines(mode):
    with pytest.raises(moonjax.SpineStructureError) as e:
        moonjax.moonwalk_grad(_scan_loss(_residual), mode=mode, fragments=False)(WS, X)
    msg = _points_at(e, _residual, "marker: residual")
    assert "feeds 2 operations" in msg and "`x + f(x)`" in msg
    assert "primitive: dot_general" in msg and "coupling" in msg


def test_residual_at_top_level_points_at_the_user_line():
    def loss(w, x):
        h = x + jnp.tanh(x @ w)  # marker
        return jnp.sum(h @ w)

    with pytest.raises(moonjax.SpineStructureError) as e:
        moonjax.moonwalk_grad(loss, mode="mixed", fragments=False)(W, X)
    _points_at(e, loss, "# marker")
    # the default records the block's output cotangent (a fragment) and is exact
    got = moonjax.moonwalk_grad(loss)(W, X)
    assert np.allclose(got, jax.grad(loss)(W, X), rtol=1e-10, atol=1e-12)


def test_a_scanned_residual_is_rescued_by_recording_the_carry_cotangent():
    # the sweep cannot cross x + f(x), so phase 1 records the loop carry's cotangent at
    # every step (one activation per layer, like a fragment) and reverse mode does the rest
    loss = _scan_loss(_residual)
    got = moonjax.moonwalk_grad(loss, mode="mixed")(WS, X)
    assert np.allclose(got, jax.grad(loss)(WS, X), rtol=1e-10, atol=1e-12)
    report = moonjax.check(loss, WS, X, mode="mixed")
    assert report.ok and not report.submersive
    assert report.fragment_bytes == len(WS) * X.size * X.dtype.itemsize


def test_a_value_entering_one_operation_twice_is_named():
    def loss(w, x):
        h = jnp.concatenate([x, x], -1)  # marker
        return jnp.sum(jnp.tanh(jnp.tanh(h) @ jnp.concatenate([w, w], 0)))

    with pytest.raises(moonjax.SpineStructureError) as e:
        moonjax.moonwalk_grad(loss, mode="mixed")(W, X)
    msg = _points_at(e, loss, "# marker")
    assert "enters the same operation twice" in msg and "concatenate" in msg


def test_reversible_mode_cannot_rebuild_a_residual_block():
    with pytest.raises(moonjax.NotSubmersiveError) as e:
        moonjax.moonwalk_grad(_scan_loss(_residual), mode="reversible", fragments=False)(WS, X)
    assert "reversible mode cannot rebuild" in _points_at(e, _residual, "marker: residual")


# -- the stream argument ---------------------------------------------------------------


def _tanh_loss(w, x):
    return jnp.sum(jnp.tanh(x @ w) ** 2)


@pytest.mark.parametrize("stream_argnums", [None, 1])
def test_integer_stream_input_is_an_argument_error_where_the_sweep_runs(stream_argnums):
    x_int = jnp.ones((2, 4), jnp.int32)
    with pytest.raises(moonjax.ArgumentError, match="float"):
        moonjax.moonwalk_grad(_tanh_loss, stream_argnums=stream_argnums,
                              mode="mixed")(W, x_int)


def test_the_default_takes_an_integer_input_as_jax_grad_does():
    x_int = jnp.ones((2, 4), jnp.int32)
    got = moonjax.moonwalk_grad(_tanh_loss)(W, x_int)
    assert np.allclose(got, jax.grad(_tanh_loss)(W, x_int))


def test_integer_stream_input_error_names_the_argument_and_dtype():
    x_int = jnp.ones((2, 4), jnp.int32)
    with pytest.raises(moonjax.ArgumentError) as e:
        moonjax.moonwalk_grad(_tanh_loss, stream_argnums=1)(W, x_int)
    assert "argument 1" in str(e.value) and "int32" in str(e.value)


def test_stream_argnums_out_of_range_is_named():
    with pytest.raises(moonjax.ArgumentError, match="stream_argnums=5 is out of range"):
        moonjax.moonwalk_grad(_tanh_loss, stream_argnums=5)(W, X)


def test_no_stream_argument_left_is_an_argument_error_where_the_sweep_runs():
    with pytest.raises(moonjax.ArgumentError, match="network input"):
        moonjax.moonwalk_grad(_tanh_loss, argnums=(0, 1), mode="mixed")(W, X)
    # the default differentiates every argument as jax.grad does
    got = moonjax.moonwalk_grad(_tanh_loss, argnums=(0, 1))(W, X)
    for a, b in zip(got, jax.grad(_tanh_loss, argnums=(0, 1))(W, X)):
        assert np.allclose(a, b)


# -- argnums ---------------------------------------------------------------------------


@pytest.mark.parametrize("argnums, bad", [(-3, "-3"), ((0, 3), "3"), (7, "7")])
def test_argnums_out_of_range_names_the_value(argnums, bad):
    with pytest.raises(moonjax.ArgumentError) as e:
        moonjax.moonwalk_grad(_tanh_loss, argnums=argnums)(W, X)
    assert f"argnums={bad} is out of range" in str(e.value)
    assert "2 positional argument" in str(e.value)


def test_argnums_out_of_range_is_a_value_error_like_jax():
    with pytest.raises(ValueError):
        moonjax.moonwalk_grad(_tanh_loss, argnums=2)(W, X)


def test_argnums_of_the_wrong_type_is_an_argument_error():
    with pytest.raises(moonjax.ArgumentError, match="argnums"):
        moonjax.moonwalk_grad(_tanh_loss, argnums="a")(W, X)


def test_differentiating_an_integer_argument_names_it():
    with pytest.raises(moonjax.ArgumentError, match="argument 0 to differentiate"):
        moonjax.moonwalk_grad(_tanh_loss)(jnp.eye(4, dtype=jnp.int32), X)


# -- the loss --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "out, shape, dtype",
    [
        (lambda h: h.sum(0), "(4,)", "float64"),
        (lambda h: h.sum().reshape(1), "(1,)", "float64"),
        (lambda h: h.sum().astype(jnp.int32), "()", "int32"),
        (lambda h: h.sum() > 0, "()", "bool"),
        (lambda h: h.sum().astype(jnp.complex128), "()", "complex128"),
    ],
)
def test_non_scalar_or_non_float_loss_names_shape_and_dtype(out, shape, dtype):
    loss = lambda w, x: out(jnp.tanh(x @ w))
    with pytest.raises(moonjax.LossShapeError) as e:
        moonjax.moonwalk_grad(loss)(W, X)
    msg = str(e.value)
    assert f"shape {shape}" in msg and f"dtype {dtype}" in msg and "scalar" in msg


def test_has_aux_loss_must_be_a_pair_with_a_scalar_loss():
    with pytest.raises(moonjax.LossShapeError, match="pair"):
        moonjax.moonwalk_grad(_tanh_loss, has_aux=True)(W, X)
    with pytest.raises(moonjax.LossShapeError, match=r"shape \(2, 4\)"):
        moonjax.moonwalk_grad(lambda w, x: (jnp.tanh(x @ w), 0.0), has_aux=True)(W, X)


# -- debug: a singular weight ----------------------------------------------------------

SINGULAR = jnp.array([[1.0, 2.0], [2.0, 4.0]])


def _singular_loss(w, x):
    return jnp.sum(jnp.tanh(x @ w) ** 2)  # marker: singular


def test_singular_weight_raises_drift_error_or_gives_nan_without_debug():
    with pytest.raises(moonjax.DriftError, match="drifted non-finite") as e:
        moonjax.moonwalk_grad(_singular_loss, mode="mixed")(SINGULAR, jnp.ones((3, 2)))
    assert "solves with the weight of `dot_general`" in str(e.value)
    g = moonjax.moonwalk_grad(_singular_loss, mode="mixed", on_drift="nan")(
        SINGULAR, jnp.ones((3, 2)))
    assert np.all(np.isnan(g))


def test_debug_names_the_primitive_and_line_of_a_singular_weight():
    with pytest.raises(moonjax.NonFiniteCotangentError) as e:
        jax.block_until_ready(
            moonjax.moonwalk_grad(_singular_loss, mode="mixed", debug=True)(
                SINGULAR, jnp.ones((3, 2))))
    msg = _points_at(e, _singular_loss, "marker: singular")
    assert "non-finite swept cotangent after `dot_general`" in msg


def test_debug_raises_non_finite_cotangent_error():
    with pytest.raises(moonjax.NonFiniteCotangentError):
        jax.block_until_ready(
            moonjax.moonwalk_grad(_singular_loss, mode="mixed", debug=True)(
                SINGULAR, jnp.ones((3, 2))))


def test_debug_is_silent_for_a_regular_weight():
    g = moonjax.moonwalk_grad(_singular_loss, mode="mixed", debug=True)(W[:2, :2], jnp.ones((3, 2)))
    assert np.allclose(g, jax.grad(_singular_loss)(W[:2, :2], jnp.ones((3, 2))))


# -- errors are one hierarchy ------------------------------------------------------------


@pytest.mark.parametrize("cls", [
    moonjax.UnsupportedPrimitiveError, moonjax.NotSubmersiveError,
    moonjax.SpineStructureError, moonjax.LossShapeError, moonjax.ArgumentError,
    moonjax.NonFiniteCotangentError,
])
def test_every_error_is_a_moonjax_error(cls):
    assert issubclass(cls, moonjax.MoonjaxError)
