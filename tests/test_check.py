"""``moonjax check``: the report on reference models matches what we know of them.

``check`` only traces, so every test here runs in well under a second after the
imports; the models are tiny anyway.
"""

import inspect
import json
import os

import jax
import jax.numpy as jnp
import nets
import pytest
from flax import nnx
from jax import lax
from nets import LAYERS, PARAMS, classification_loss, data, line_of, scanned, unrolled

import moonjax
from moonjax import CheckReport, check, models
from moonjax.cli import main

HERE = os.path.basename(__file__)
TARGETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "check_targets.py")


def _at(fn, text):
    """``file.py:line`` of the line of ``fn`` containing ``text``."""
    return f"{os.path.basename(inspect.getsourcefile(fn))}:{line_of(fn, text)} "


def _net(kind, style, depth=2, d=4, batch=3):
    """A plain-JAX network of ``nets.py`` and its arguments, as shapes only (``check``
    only traces, and shapes spare the tests compiling the random initialisers)."""
    params = jax.eval_shape(lambda: PARAMS[kind](jax.random.PRNGKey(0), depth, d))
    x, y = jax.eval_shape(lambda: data(jax.random.PRNGKey(1), batch, d))
    apply = (scanned if style == "scanned" else unrolled)(LAYERS[kind])
    return classification_loss(apply), (params, x, y)


def _groups_at(report, location_part):
    return [g for g in report.all_groups() if location_part in g.location]


# -- plain-JAX networks ------------------------------------------------------------------


def test_scanned_leaky_mlp_is_a_submersive_scan_then_a_head():
    loss, args = _net("leaky", "scanned", depth=3)
    r = check(loss, *args)
    assert isinstance(r, CheckReport)
    assert r.ok and r.error is None and r.submersive and r.fragment_bytes == 0
    scan, *head = r.groups
    assert scan.role == "scan" and scan.length == 3 and scan.submersive
    assert {g.role for g in scan.groups} == {"spine"}
    assert all(_at(nets.leaky_layer, "leaky_relu") in g.location for g in scan.groups)
    assert head and {g.role for g in head} == {"head"}
    assert all(_at(nets.classification_loss, "log_softmax") in g.location for g in head)
    body = scan.groups[0]
    assert [(s.kind, s.primitives[0], s.rule) for s in body.steps] == [
        ("spine", "dot_general", "linear"), ("region", "add", "elementwise"),
        ("region", "mul", "elementwise")]
    assert r.rules["dot_general"] == ("linear",)
    assert r.rules["select_n"] == ("elementwise",)


def test_report_text_lists_dot_general_under_the_linear_rule():
    loss, args = _net("leaky", "scanned")
    text = str(check(loss, *args))
    assert text.startswith("moonjax check: OK")
    assert "every layer is submersive" in text
    assert "dot_general[linear]" in text
    rules_line = next(ln for ln in text.splitlines() if ln.startswith("spine rules:"))
    assert "dot_general -> linear" in rules_line


@pytest.mark.parametrize("kind", ["additive", "affine"])
def test_unrolled_coupling_side_branch_is_side_and_the_spine_is_structural(kind):
    loss, args = _net(kind, "unrolled", depth=2)
    r = check(loss, *args)
    assert r.ok and r.submersive and r.fragment_bytes == 0
    layer = LAYERS[kind]
    splits = _groups_at(r, _at(layer, "jnp.split"))
    assert len(splits) == 2 and all(g.role == "spine" for g in splits)
    assert all(g.steps[0].rule == "structural" for g in splits)
    # the side network's lines are side branches: reverse mode inside the layer
    side_line = _at(layer, 'p["w1"]')
    side = _groups_at(r, side_line)
    assert len(side) == 2 and {g.role for g in side} == {"side"}
    assert "dot_general" in side[0].primitives("side")
    assert r.rules["split"] == ("structural",) and r.rules["concatenate"] == ("structural",)
    assert "dot_general" not in r.rules  # every dense layer is in a side branch
    assert r.groups[-1].role == "head"


def test_affine_coupling_scale_is_an_elementwise_spine_step_read_from_the_side():
    loss, args = _net("affine", "scanned")
    r = check(loss, *args)
    line = _groups_at(r, _at(nets.affine_layer, "sigmoid"))
    assert [g.primitives("spine") for g in line] == [[], ["concatenate"]]
    mixed = line[0]
    assert "mul" in mixed.primitives("region") and "logistic" in mixed.primitives("side")
    assert mixed.role == "spine" and mixed.submersive


# -- reference models (moonjax.models) ---------------------------------------------------


def test_revnet_classifier_report():
    model = nnx.eval_shape(lambda: models.RevNetClassifier(4, 3, rngs=nnx.Rngs(0), depth=2,
                                                           hidden=4))
    graphdef, params = nnx.split(model)
    r = check(models.classifier_loss(graphdef), params, jnp.ones((2, 4)), jnp.array([0, 1]))
    assert r.ok and r.submersive and r.fragment_bytes == 0
    (scan,) = [g for g in r.groups if g.role == "scan"]
    assert scan.length == 2 and "Stack.__call__" in scan.location
    roles = {g.location.split(" ")[-1]: g.role for g in scan.groups}
    assert roles["(MLP.__call__)"] == "side"  # the coupling's side network
    assert roles["(AdditiveCoupling.__call__)"] == "spine"
    assert roles["(LeakyReLU.__call__)"] == "spine"
    assert roles["(InvertibleDense.__call__)"] == "spine"
    assert r.groups[-1].role == "head" and "classifier_loss" in r.groups[-1].location
    assert r.rules["dot_general"] == ("linear",)  # InvertibleDense and the head
    assert r.rules["split"] == ("structural",)


def test_reversible_transformer_report():
    model = nnx.eval_shape(lambda: models.ReversibleTransformer(4, 2, depth=2,
                                                               rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model)

    def loss(params, x, y):
        out = nnx.merge(graphdef, params)(x)
        return jnp.mean((out.mean(axis=1)[:, :1] - y) ** 2)

    r = check(loss, params, jnp.ones((2, 3, 8)), jnp.zeros((2, 1)))
    assert r.ok and r.submersive and r.fragment_bytes == 0
    (scan,) = r.groups[:1]
    assert scan.role == "scan" and scan.length == 2
    attention = [g for g in scan.groups if "SelfAttention.__call__" in g.location]
    assert attention and {g.role for g in attention} == {"side"}
    mlp = [g for g in scan.groups if "MLP.__call__" in g.location]
    assert mlp and {g.role for g in mlp} == {"side"}
    spine = [p for g in scan.groups if g.role == "spine" for p in g.primitives()]
    assert {"split", "concatenate", "add"} <= set(spine)
    assert set(r.rules) == {"split", "add", "concatenate"}  # attention is all side
    assert r.groups[-1].role == "head"


# -- non-submersive nets -------------------------------------------------------------------


def relu_loss(w, x):
    h = jax.nn.relu(x @ w[0])  # marker: relu
    return jnp.sum(jnp.tanh(h @ w[1]))


RELU_W = jnp.stack([jnp.eye(4), jnp.eye(4) + 0.1])
RELU_X = jnp.ones((3, 4))


def test_relu_net_is_ok_with_fragments_and_reports_them_at_the_user_line():
    r = check(relu_loss, RELU_W, RELU_X, mode="mixed")
    assert r.ok and not r.submersive
    assert isinstance(r.fragment_error, moonjax.NotSubmersiveError)
    assert r.primitive == "max" and f"{HERE}:{line_of(relu_loss, 'marker: relu')}:" in r.location
    (relu,) = _groups_at(r, _at(relu_loss, "marker: relu"))
    assert relu.role == "spine" and not relu.submersive
    assert relu.fragment_bytes == 3 * 4 * 8  # the ReLU's output cotangent, float64
    assert r.fragment_bytes >= relu.fragment_bytes
    assert "fragment" in r.rules["max"]
    text = str(r)
    assert "not submersive" in text and "NO" in text
    assert f"{HERE}:{line_of(relu_loss, 'marker: relu')}" in text


def test_relu_net_stores_only_the_relu_fragment():
    r = check(relu_loss, RELU_W, RELU_X, mode="mixed")
    assert r.fragment_bytes == 3 * 4 * 8


def test_scanned_relu_net_counts_fragments_once_per_layer():
    def loss(ws, x):
        h = lax.scan(lambda h, w: (jax.nn.relu(h @ w), None), x, ws)[0]  # marker
        return jnp.sum(jnp.tanh(h @ ws[0]))

    ws = jnp.stack([jnp.eye(4)] * 5)
    assert check(loss, ws, RELU_X).treatment == "checkpointed"  # the default: no sweep
    r = check(loss, ws, RELU_X, mode="mixed")
    scan = r.groups[0]
    assert r.ok and not r.submersive and scan.role == "scan" and not scan.submersive
    per_layer = sum(g.fragment_bytes for g in scan.groups)
    assert per_layer == 3 * 4 * 8 and scan.fragment_bytes == 5 * per_layer


def test_relu_net_without_fragments_fails_at_the_relu_line():
    r = check(relu_loss, RELU_W, RELU_X, fragments=False, mode="mixed")
    assert not r.ok and isinstance(r.error, moonjax.NotSubmersiveError)
    assert r.primitive == "max"
    assert f"{HERE}:{line_of(relu_loss, 'marker: relu')}" in r.location
    assert "moonjax.nn" in r.suggestion and "custom_vijp" in r.suggestion
    text = str(r)
    assert text.startswith("moonjax check: FAILED") and "NotSubmersiveError" in text


def test_relu_net_in_forward_mode_records_fragments_or_fails_without():
    r = check(relu_loss, RELU_W, RELU_X, mode="forward")
    assert r.ok and not r.submersive and r.rules["max"] == ("fragment",), r
    r = check(relu_loss, RELU_W, RELU_X, mode="forward", fragments=False)
    assert not r.ok and isinstance(r.error, moonjax.NotSubmersiveError)


def test_reversible_mode_takes_unrolled_layers_by_reverse_mode():
    r = check(relu_loss, RELU_W, RELU_X, mode="reversible")
    assert r.ok and r.treatment == "reversible"
    assert "forces reversible backprop" in r.plan and "no lax.scan" in r.plan


def sort_loss(w, x):
    h = jnp.sort(x @ w[0], axis=-1)  # marker: sort
    return jnp.sum(jnp.tanh(h @ w[1]))


def test_unsupported_primitive_is_reported_with_a_fix():
    r = check(sort_loss, RELU_W, RELU_X, fragments=False, mode="mixed")
    assert not r.ok and isinstance(r.error, moonjax.UnsupportedPrimitiveError)
    assert r.primitive == "sort" and f"{HERE}:{line_of(sort_loss, 'marker: sort')}" in r.location
    assert "custom_vijp" in r.suggestion and "register_vijp" in r.suggestion
    assert "moonjax.nn" in r.suggestion
    # with fragments, phase 1 stores the sort's output cotangent instead
    r = check(sort_loss, RELU_W, RELU_X, mode="mixed")
    assert r.ok and not r.submersive and r.rules["sort"] == ("fragment",)


def test_value_feeding_two_layers_fails_with_a_structure_error():
    def loss(w, x):
        h = x + jnp.tanh(x @ w)  # marker
        return jnp.sum(h @ w)

    r = check(loss, jnp.eye(4), RELU_X, fragments=False, mode="mixed")
    assert not r.ok and isinstance(r.error, moonjax.SpineStructureError)
    assert f"{HERE}:{line_of(loss, '# marker')}" in r.location
    assert "coupling" in r.suggestion
    # by default phase 1 records the residual's output cotangent instead: exact, stored
    rescued = check(loss, jnp.eye(4), RELU_X, mode="mixed")
    assert rescued.ok and rescued.fragment_bytes > 0


# -- arguments, options, formats -----------------------------------------------------------


def test_argument_and_loss_errors_are_reported_without_groups():
    r = check(relu_loss, RELU_W, RELU_X, argnums=4)
    assert not r.ok and isinstance(r.error, moonjax.ArgumentError) and r.groups == ()
    r = check(lambda w, x: x @ w[0], RELU_W, RELU_X)
    assert not r.ok and isinstance(r.error, moonjax.LossShapeError)


def test_shapes_are_enough():
    w = jax.ShapeDtypeStruct((2, 4, 4), jnp.float32)
    x = jax.ShapeDtypeStruct((3, 4), jnp.float32)
    r = check(relu_loss, w, x, mode="mixed")
    assert r.ok and not r.submersive
    (relu,) = _groups_at(r, _at(relu_loss, "marker: relu"))
    assert relu.fragment_bytes == 3 * 4 * 4  # float32


def test_keyword_arguments_has_aux_and_stream_argnums():
    def loss(x, w, *, shift):
        h = jnp.tanh(x @ w + shift)
        return jnp.sum(h @ w), {"h": h}

    r = check(loss, RELU_X, jnp.eye(4), argnums=1, stream_argnums=0, has_aux=True,
              shift=jnp.ones(4))
    assert r.ok and r.submersive and r.rules["dot_general"] == ("linear",)


def test_custom_vijp_blocks_are_named_in_the_rules():
    @moonjax.custom_vijp
    def scale(x, s):
        return x * jnp.exp(s)

    @scale.defvijp
    def _(x, s, g):
        return g * jnp.exp(-s)

    def loss(s, x):
        return jnp.sum(jnp.tanh(scale(x, s)) @ jnp.diag(s))

    r = check(loss, jnp.ones(4), RELU_X)
    assert r.ok
    (name,) = [p for p in r.rules if p.startswith("custom_vijp:")]
    assert r.rules[name] == ("custom_vijp",) and "scale" in name


def test_repr_is_short():
    assert repr(check(relu_loss, RELU_W, RELU_X, fragments=False, mode="mixed")) == (
        "CheckReport(ok=False, error=NotSubmersiveError, submersive=False, "
        "fragment_bytes=0, groups=3)")


def test_to_dict_is_json_and_mirrors_the_report():
    r = check(relu_loss, RELU_W, RELU_X, mode="mixed")
    d = json.loads(r.to_json())
    assert d == r.to_dict()
    assert d["ok"] is True and d["submersive"] is False
    assert d["fragment_bytes"] == r.fragment_bytes
    assert d["fragment_error"]["type"] == "NotSubmersiveError"
    assert d["rules"]["dot_general"] == ["linear"]
    assert [g["role"] for g in d["groups"]] == [g.role for g in r.groups]
    failed = check(relu_loss, RELU_W, RELU_X, fragments=False, mode="mixed").to_dict()
    assert failed["error"]["type"] == "NotSubmersiveError" and failed["primitive"] == "max"


def test_check_does_not_compute_anything():
    calls = []

    def loss(w, x):
        jax.debug.callback(lambda: calls.append(1))
        return jnp.sum(jnp.tanh(x @ w))

    assert check(loss, jnp.eye(4), RELU_X).ok
    assert calls == []


# -- the command line ------------------------------------------------------------------------


def _cli(capsys, *argv):
    code = main(["check", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_module_target_ok_exits_0(capsys):
    code, out, _ = _cli(capsys, "check_targets:leaky_mlp")
    assert code == 0
    assert out.startswith("moonjax check: OK") and "dot_general[linear]" in out


def test_cli_file_target_with_kwargs_exits_0_and_shows_fragments(capsys):
    code, out, _ = _cli(capsys, f"{TARGETS}:relu_net", "--mode", "mixed")
    assert code == 0 and "not submersive" in out
    import check_targets

    assert _at(check_targets.relu_loss, "marker: relu").strip() in out


def test_cli_not_ok_exits_1(capsys):
    code, out, _ = _cli(capsys, f"{TARGETS}:relu_net", "--no-fragments", "--mode", "mixed")
    assert code == 1 and "NotSubmersiveError" in out and "check_targets.py:" in out
    code, out, _ = _cli(capsys, f"{TARGETS}:residual_net", "--no-fragments", "--mode",
                        "mixed")
    assert code == 1 and "SpineStructureError" in out


def test_cli_strict_fails_on_fragments(capsys):
    assert _cli(capsys, f"{TARGETS}:abstract_relu_net", "--strict", "--mode", "mixed")[0] == 1
    assert _cli(capsys, f"{TARGETS}:abstract_relu_net")[0] == 0
    assert _cli(capsys, "check_targets:leaky_mlp", "--strict")[0] == 0


def test_cli_json(capsys):
    code, out, _ = _cli(capsys, "check_targets:relu_net", "--json", "--mode", "forward",
                        "--no-fragments")
    d = json.loads(out)
    assert code == 1 and d["ok"] is False and d["mode"] == "forward"
    code, out, _ = _cli(capsys, "check_targets:relu_net", "--json", "--mode", "forward")
    d = json.loads(out)
    assert code == 0 and d["ok"] is True and d["submersive"] is False


def test_cli_loss_that_fails_to_trace_exits_1_with_its_error(capsys):
    code, out, err = _cli(capsys, "check_targets:shape_bug")
    assert code == 1 and "tracing the loss raised TypeError" in err and "dot_general" in err


@pytest.mark.parametrize("target, message", [
    ("check_targets:broken_contract", "must return (loss, args) or (loss, args, kwargs)"),
    ("check_targets:not_a_tuple_of_args", "args (second item) must be a tuple"),
    ("check_targets:NOT_CALLABLE", "is not callable"),
    ("check_targets:missing", "has no attribute 'missing'"),
    ("no_such_module_xyz:f", "cannot import"),
    ("check_targets", "expected module:function"),
    ("does/not/exist.py:f", "no such file"),
])
def test_cli_bad_target_exits_2_with_a_message(capsys, target, message):
    code, out, err = _cli(capsys, target)
    assert code == 2 and message in err and out == ""


def test_cli_survives_a_closed_pipe():
    # `moonjax check --json | head -c 1`: the reader has gone when the report is
    # written; the command ends quietly instead of a BrokenPipeError traceback
    import contextlib

    read, write = os.pipe()
    os.close(read)
    with open(write, "w", buffering=1) as out, contextlib.redirect_stdout(out):
        assert main(["check", f"{TARGETS}:relu_net", "--json"]) == 0
