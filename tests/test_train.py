"""moonjax.train and ``moonjax train``: the loop, checkpoints, data errors, data parallel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from moonjax.cli import main
from moonjax.train import (
    CheckpointError,
    ConfigError,
    DataError,
    Dataset,
    TrainConfig,
    fit,
    load_dataset,
)

# Per-step losses of moonwalk and backprop training from the same seed, float32: the two
# gradients differ by float rounding only (measured: <= 3e-7 relative over 12 steps).
LOSS_RTOL = 1e-5
TINY = dict(depth=2, hidden=8, batch_size=16, verbose=False)


def synthetic(n_train=96, n_test=32, features=6, classes=3, seed=0) -> Dataset:
    """Gaussian inputs, labels from a fixed linear map: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(features, classes))
    x = rng.normal(size=(n_train + n_test, features)).astype(np.float32)
    y = np.argmax(x @ w, -1).astype(np.int32)
    return Dataset("synthetic", x[:n_train], y[:n_train], x[n_train:], y[n_train:], classes)


def leaves(tree):
    return [np.asarray(a) for a in jax.tree.leaves(tree)]


def test_moonwalk_and_backprop_training_give_the_same_per_step_losses():
    data = synthetic()
    runs = {g: fit(TrainConfig(grad=g, epochs=2, **TINY), data) for g in ("moonwalk", "backprop")}
    mw, bp = runs["moonwalk"].step_losses, runs["backprop"].step_losses
    assert len(mw) == len(bp) == 12
    np.testing.assert_allclose(mw, bp, rtol=LOSS_RTOL)
    assert mw[-1] < mw[0]  # it learns
    for a, b in zip(leaves(runs["moonwalk"].params), leaves(runs["backprop"].params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_moonwalk_and_backprop_train_steps_agree_under_sgd():
    """Adam is blind to a gradient's scale (a 2x gradient gives the same Adam steps), so
    the loss curves above cannot catch a wrongly scaled gradient; plain SGD can."""
    import optax
    from flax import nnx

    from moonjax.models import RevNetClassifier, classifier_loss
    from moonjax.train import make_train_step

    data = synthetic()
    graphdef, params = nnx.split(RevNetClassifier(6, 3, rngs=nnx.Rngs(0), depth=2, hidden=8))
    loss = classifier_loss(graphdef)
    optimizer = optax.sgd(0.1)
    losses, finals = {}, {}
    for g in ("moonwalk", "backprop"):
        step = make_train_step(loss, optimizer, grad=g)
        p, s, out = params, optimizer.init(params), []
        for i in range(6):
            sl = slice(16 * i, 16 * (i + 1))
            p, s, value = step(p, s, data.x_train[sl], data.y_train[sl])
            out.append(float(value))
        losses[g], finals[g] = out, p
    np.testing.assert_allclose(losses["moonwalk"], losses["backprop"], rtol=LOSS_RTOL)
    assert np.mean(losses["moonwalk"][-2:]) < np.mean(losses["moonwalk"][:2])  # it learns
    for a, b in zip(leaves(finals["moonwalk"]), leaves(finals["backprop"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_checkpoint_restore_continues_exactly_like_uninterrupted_training(tmp_path):
    data = synthetic()
    whole = fit(TrainConfig(epochs=3, **TINY), data)
    ckpt = str(tmp_path / "ckpt")
    first = fit(TrainConfig(epochs=2, checkpoint=ckpt, **TINY), data)
    assert os.path.exists(os.path.join(ckpt, "train_state.msgpack"))
    resumed = fit(TrainConfig(epochs=3, checkpoint=ckpt, **TINY), data)
    assert resumed.start_epoch == 2
    assert first.step_losses + resumed.step_losses == pytest.approx(whole.step_losses, rel=0, abs=0)
    for a, b in zip(leaves(resumed.params), leaves(whole.params), strict=True):
        np.testing.assert_array_equal(a, b)
    metrics = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]
    assert metrics(resumed.history) == metrics(whole.history)  # restored epochs included
    # nothing left to do: restores, trains nothing
    again = fit(TrainConfig(epochs=3, checkpoint=ckpt, **TINY), data)
    assert again.step_losses == [] and len(again.history) == 3


def test_checkpoint_of_another_model_or_a_corrupt_file_is_a_clear_error(tmp_path):
    data = synthetic()
    ckpt = tmp_path / "ckpt"
    fit(TrainConfig(epochs=1, checkpoint=str(ckpt), **TINY), data)
    with pytest.raises(CheckpointError, match="depth: checkpoint 2, now 3"):
        fit(TrainConfig(epochs=2, checkpoint=str(ckpt), **{**TINY, "depth": 3}), data)
    (ckpt / "train_state.msgpack").write_bytes(b"not msgpack at all")
    with pytest.raises(CheckpointError, match="not a"):
        fit(TrainConfig(epochs=2, checkpoint=str(ckpt), **TINY), data)


def _save(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize(
    "arrays, message",
    [
        (None, "no such file"),
        ("garbage", "not a readable .npz"),
        (dict(x=np.zeros((10, 4))), r"missing array\(s\) y"),
        (dict(inputs=np.zeros((10, 4)), labels=np.zeros(10)), r"missing array\(s\) x, y"),
        (dict(x=np.zeros((10, 4)), y=np.zeros(9, int)), r"shape \(10,\)"),
        (dict(x=np.zeros((10, 4)), y=np.full(10, 0.5)), "integer class labels"),
        (dict(x=np.zeros((10, 4)), y=-np.ones(10, int)), "negative labels"),
        (dict(x=np.zeros((10,)), y=np.zeros(10, int)), r"\(N, features\)"),
        (dict(x=np.full((10, 4), np.nan), y=np.arange(10) % 2), "NaN"),
        (dict(x=np.zeros((10, 4)), y=np.zeros(10, int)), "at least two"),
        (dict(x=np.zeros((10, 4)), y=np.arange(10) % 2, x_test=np.zeros((3, 4))), "both"),
        (
            dict(
                x=np.zeros((10, 4)), y=np.arange(10) % 2, x_test=np.zeros((3, 5)), y_test=[0, 1, 0]
            ),
            r"x_test examples have shape \(5,\), x examples \(4,\)",
        ),
        (dict(x=np.zeros((10, 4, 4, 4, 1)), y=np.arange(10) % 2), r"got shape \(10, 4, 4, 4, 1\)"),
    ],
)
def test_bad_data_file_is_a_clear_error(tmp_path, arrays, message):
    path = tmp_path / "data.npz"
    if arrays == "garbage":
        path.write_bytes(b"this is not a zip file")
    elif arrays is not None:
        _save(path, **arrays)
    with pytest.raises(DataError, match=message):
        load_dataset(str(path))


def test_cli_reports_a_bad_data_file_and_returns_2(tmp_path, capsys):
    path = _save(tmp_path / "bad.npz", x=np.zeros((10, 4)))
    assert main(["train", "--data", path, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "moonjax train: error:" in err and "missing array(s) y" in err


def test_npz_data_with_its_own_test_split(tmp_path):
    toy = synthetic()
    path = _save(
        tmp_path / "toy.npz",
        x=toy.x_train,
        y=toy.y_train,
        x_test=toy.x_test,
        y_test=toy.y_test.astype(np.float64),
    )  # whole-number float labels are fine
    data = load_dataset(path)
    assert data.input_shape == (6,) and data.num_classes == 3
    assert len(data.x_train) == 96 and len(data.x_test) == 32
    np.testing.assert_allclose(data.x_train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(data.x_train.std(0), 1, atol=1e-5)
    result = fit(TrainConfig(data=path, epochs=1, max_steps=2, **TINY))
    assert len(result.step_losses) == 2 and np.isfinite(result.step_losses).all()
    assert result.history[-1]["steps"] == 2


def test_npz_images_get_a_channel_axis(tmp_path):
    rng = np.random.default_rng(0)
    path = _save(tmp_path / "img.npz", x=rng.normal(size=(40, 4, 4)), y=np.arange(40) % 3)
    data = load_dataset(path, test_fraction=0.25)
    assert data.input_shape == (4, 4, 1) and data.num_classes == 3
    assert (len(data.x_train), len(data.x_test)) == (30, 10)


@pytest.mark.slow
def test_training_on_npz_images(tmp_path):
    rng = np.random.default_rng(0)
    path = _save(tmp_path / "img.npz", x=rng.normal(size=(40, 4, 4, 2)), y=np.arange(40) % 3)
    result = fit(TrainConfig(data=path, epochs=1, max_steps=2, **TINY))
    assert len(result.step_losses) == 2 and np.isfinite(result.step_losses).all()


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(ConfigError, match="grad must be one of"):
        TrainConfig(grad="adjoint")
    with pytest.raises(ConfigError, match="mode must be one of"):
        TrainConfig(mode="sideways")
    with pytest.raises(DataError, match="fewer than one batch"):
        fit(TrainConfig(**{**TINY, "batch_size": 512}), synthetic())
    with pytest.raises(ConfigError, match="device"):
        fit(TrainConfig(devices=len(jax.devices()) + 1, **TINY), synthetic())


def test_cli_train_smoke(tmp_path, capsys):
    toy = synthetic()
    data = _save(
        tmp_path / "toy.npz",
        x=np.concatenate([toy.x_train, toy.x_test]),
        y=np.concatenate([toy.y_train, toy.y_test]),
    )
    out = tmp_path / "run.json"
    code = main(
        [
            "train",
            "--data",
            data,
            "--epochs",
            "1",
            "--depth",
            "2",
            "--hidden",
            "8",
            "--batch-size",
            "16",
            "--max-steps",
            "3",
            "--no-progress",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "toy.npz" in printed and "XLA temp memory" in printed
    summary = json.loads(out.read_text())
    assert summary["steps"] == 3 and summary["temp_bytes_per_step"] > 0
    assert len(summary["step_losses"]) == 3 and len(summary["history"]) == 1
    assert 0.0 <= summary["test_accuracy"] <= 1.0


@pytest.mark.slow
def test_cli_train_on_digits(tmp_path):
    pytest.importorskip("sklearn")
    assert main(["train", "--epochs", "1", "--depth", "1", "--max-steps", "3", "--quiet"]) == 0


def test_digits_loads_standardised_and_split():
    pytest.importorskip("sklearn")
    data = load_dataset()
    assert data.input_shape == (64,) and data.num_classes == 10
    assert len(data.x_train) + len(data.x_test) == 1797
    assert abs(len(data.x_test) - 0.2 * 1797) < 1
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32


def test_defaults_reach_95_percent_on_digits_and_follow_backprop():
    """The README's main job, ``moonjax train``: its defaults, Moonwalk and backprop."""
    pytest.importorskip("sklearn")
    runs = {g: fit(TrainConfig(grad=g, verbose=False)) for g in ("moonwalk", "backprop")}
    mw, bp = (np.array(runs[g].step_losses) for g in ("moonwalk", "backprop"))
    assert len(mw) == len(bp) == 20 * 22 and np.isfinite(mw).all()
    assert mw[0] == bp[0]  # same seed: same parameters, same first batch
    # the first epoch step by step (measured: 1.3e-4; later, float32 rounding in the
    # gradients makes the two Adam trajectories drift apart, see docs/training.md)
    np.testing.assert_allclose(mw[:22], bp[:22], rtol=1e-3)
    assert runs["moonwalk"].test_accuracy >= 0.95  # measured: 98.3 %
    assert runs["backprop"].test_accuracy >= 0.95
    assert runs["moonwalk"].temp_bytes < runs["backprop"].temp_bytes  # measured: 2.5x less


def test_one_blas_thread_limits_openblas_inside_the_block_only(monkeypatch):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from moonjax.train import one_blas_thread

    def blas_threads():
        info = threadpoolctl.threadpool_info()
        return {d["num_threads"] for d in info if d["user_api"] == "blas"}

    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        with one_blas_thread():
            assert blas_threads() == {1}
        assert blas_threads() == {2}  # restored on exit
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
        with one_blas_thread():
            assert blas_threads() == {2}  # the user's setting wins


# -- data parallel: 8 simulated CPU devices, in a subprocess (XLA_FLAGS before JAX starts) --

SHARDED = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    import moonjax
    from moonjax.models import RevNetClassifier, classifier_loss
    from moonjax.train import ConfigError, Dataset, TrainConfig, data_mesh, fit
    from moonjax.train._step import batch_sharded, replicated

    assert len(jax.devices()) == 8, jax.devices()
    out = {}
    rng = np.random.default_rng(0)

    def rel(a, b):
        a, b = ([np.asarray(u) for u in jax.tree.leaves(t)] for t in (a, b))
        return (max(float(np.max(np.abs(u - v))) for u, v in zip(a, b))
                / max(float(np.max(np.abs(v))) for v in b))

    # 1. moonwalk gradients in float64: batch sharded over 8 devices == one device
    config = dict(depth=2, hidden=8)
    graphdef, params = nnx.split(RevNetClassifier(12, 5, rngs=nnx.Rngs(0), **config))
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        loss = classifier_loss(graphdef)
        x = jnp.asarray(rng.normal(size=(32, 12)))
        y = jnp.asarray(rng.integers(0, 5, 32))
        grad = moonjax.moonwalk_grad(loss)
        single = jax.jit(grad)(params, x, y)
        mesh = data_mesh()
        rep, batch = replicated(mesh), batch_sharded(mesh)
        sharded_grad = jax.jit(grad, in_shardings=(rep, batch, batch), out_shardings=rep)
        xs = jax.device_put(x, batch)
        out["x_shards"] = len(xs.addressable_shards)
        sharded = sharded_grad(params, xs, y)
        out["grad_dtype"] = str(jax.tree.leaves(sharded)[0].dtype)
        out["grad_rel_err_f64"] = rel(sharded, single)
        out["grad_vs_backprop_f64"] = rel(sharded, jax.grad(loss)(params, x, y))

    # 2. float32 train steps through the whole loop: 8 devices == 1 device
    xd = rng.normal(size=(96, 12)).astype(np.float32)
    yd = rng.integers(0, 5, 96).astype(np.int32)
    data = Dataset("toy", xd[:64], yd[:64], xd[64:], yd[64:], 5)
    cfg = dict(epochs=1, max_steps=2, batch_size=32, lr=1e-2, verbose=False, **config)
    r8 = fit(TrainConfig(devices=8, **cfg), data)
    r1 = fit(TrainConfig(devices=1, **cfg), data)
    out["devices"] = [r8.devices, r1.devices]
    out["losses"] = [r8.step_losses, r1.step_losses]
    out["step_params_rel_err_f32"] = rel(r8.params, r1.params)
    leaf = jax.tree.leaves(r8.params)[0]
    out["params_devices"] = len(leaf.sharding.device_set)
    out["params_replicated"] = leaf.sharding.is_fully_replicated
    out["test_accuracy_diff"] = abs(r8.test_accuracy - r1.test_accuracy)
    try:
        fit(TrainConfig(devices=8, **{**cfg, "batch_size": 12}), data)
    except ConfigError as e:
        out["indivisible"] = str(e)
    print("RESULT " + json.dumps(out))
""")


def test_data_parallel_over_8_devices_matches_one_device():
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        OPENBLAS_NUM_THREADS="1",
    )
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT ") :])
    assert out["x_shards"] == 8 and out["grad_dtype"] == "float64"
    # float64: the same gradient up to the order of the cross-device sums
    assert out["grad_rel_err_f64"] <= 1e-12
    assert out["grad_vs_backprop_f64"] <= 1e-9
    # float32, two Adam steps at lr 1e-2 (measured: ~1e-7)
    assert out["devices"] == [8, 1]
    np.testing.assert_allclose(*out["losses"], rtol=1e-5)
    assert out["step_params_rel_err_f32"] <= 1e-5
    assert out["params_devices"] == 8 and out["params_replicated"]
    assert out["test_accuracy_diff"] == 0.0
    assert "multiple of the number of devices (8)" in out["indivisible"]


@pytest.mark.slow
def test_depth_64_trains_like_backprop_on_under_half_its_memory():
    """``moonjax train --depth 64 --epochs 5``: the default gradient within 3 points of
    backprop's test accuracy (measured: 33.98 % against 33.70 %) at under half its temp
    memory (2.08 MiB against 6.00 MiB). Forced reversible mode inverts the LU-dense,
    leaky-ReLU blocks by Newton steps, anchored every 4: it trains like backprop, or
    refuses once its inversion loses the digits, never trains on noise."""
    pytest.importorskip("sklearn")
    runs = {g: fit(TrainConfig(grad=g, depth=64, epochs=5, verbose=False))
            for g in ("moonwalk", "backprop")}
    assert abs(runs["moonwalk"].test_accuracy - runs["backprop"].test_accuracy) <= 0.03
    assert runs["moonwalk"].temp_bytes <= 0.5 * runs["backprop"].temp_bytes
    try:
        forced = fit(TrainConfig(depth=64, epochs=1, mode="reversible", verbose=False))
    except Exception as e:  # noqa: BLE001 - the refusal arrives through the jitted step
        assert "inaccurate gradient" in str(e)
        assert "mode='reversible' rebuilds every layer's input" in str(e)
    else:
        one = fit(TrainConfig(grad="backprop", depth=64, epochs=1, verbose=False))
        assert abs(forced.test_accuracy - one.test_accuracy) <= 0.03


@pytest.mark.slow
@pytest.mark.parametrize("unrolled", [False, pytest.param(True, marks=pytest.mark.skipif(
    not os.environ.get("MOONJAX_REPORT"), reason="about 4 minutes: MOONJAX_REPORT=1"))],
    ids=["scanned", "unrolled"])
def test_a_deep_nnx_coupling_stack_at_default_init_trains_as_jax_grad_does(unrolled,
                                                                          monkeypatch):
    # 64 Flax NNX additive couplings at their default init (output ~1e6 at first), 2,000
    # Adam steps on a regression, float32: float32 training itself strays from float64
    # by a few 1e-2 (chaos, not the gradient); moonwalk's losses stray no further than
    # jax.grad's (measured at the end: scanned 2.6e-2 vs 3.1e-2, unrolled 1.1e-2 vs
    # 8.8e-3) and no call refuses (a DriftError would raise here)
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp
    import test_default_init as T

    import moonjax

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((256, T.WIDTH)), jnp.float32)
    y = jnp.tanh(x @ jnp.asarray(rng.standard_normal((T.WIDTH, T.WIDTH)) / 4, jnp.float32))
    monkeypatch.setattr(T, "_head", lambda h: jnp.mean((h - y) ** 2))  # a regression
    regression, params0 = (T.nnx_unrolled if unrolled else T.nnx_scanned)(64, 0, False)
    opt = optax.adam(1e-3)

    def losses(value_and_grad, dtype):
        @jax.jit
        def step(params, state, x):
            value, g = value_and_grad(params, x)
            updates, state = opt.update(g, state, params)
            return optax.apply_updates(params, updates), state, value

        params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params0)
        state, out = opt.init(params), []
        for _ in range(2000):
            params, state, value = step(params, state, x.astype(dtype))
            out.append(float(value))
        return np.array(out)

    exact = losses(jax.value_and_grad(regression), jnp.float64)
    backprop = np.abs(losses(jax.value_and_grad(regression), jnp.float32) - exact) / exact
    moonwalk = np.abs(losses(moonjax.moonwalk_value_and_grad(regression), jnp.float32)
                      - exact) / exact
    assert moonwalk[-1] <= 2 * max(backprop[-1], 1e-3), (moonwalk[-1], backprop[-1])
    assert moonwalk.max() <= 2 * max(backprop.max(), 1e-3), (moonwalk.max(), backprop.max())
