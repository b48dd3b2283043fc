"""Smoke tests: every script in examples/ runs end to end with tiny flags."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["train_digits", "flow_2d", "char_transformer"])
def test_every_example_has_a_docstring_saying_what_it_shows(name):
    doc = load(name).__doc__
    assert doc and "What it shows" in doc


def test_train_digits_example(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 6)).astype(np.float32)
    data = tmp_path / "toy.npz"
    np.savez(data, x=x, y=(x[:, 0] > 0).astype(np.int32))
    out = tmp_path / "run.json"
    code = load("train_digits").main(
        [
            "--data",
            str(data),
            "--epochs",
            "1",
            "--depth",
            "2",
            "--hidden",
            "8",
            "--batch-size",
            "16",
            "--max-steps",
            "2",
            "--no-progress",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    assert json.loads(out.read_text())["steps"] == 2
    assert "XLA temp memory" in capsys.readouterr().out


def test_flow_2d_example_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "flow.png"
    # float32 as in a plain run: the test session enables x64 globally, and under x64
    # GlowFlow.initialize on float32 data changes the scan carry's dtype (moonjax.nn)
    with jax.enable_x64(False):
        code = load("flow_2d").main(
            [
                "--steps",
                "2",
                "--depth",
                "2",
                "--hidden",
                "8",
                "--grid",
                "16",
                "--batch-size",
                "32",
                "--out",
                str(png),
            ]
        )
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "held-out nll" in capsys.readouterr().out


def test_char_transformer_example_trains_and_samples(capsys):
    code = load("char_transformer").main(
        [
            "--steps",
            "2",
            "--depth",
            "1",
            "--d-model",
            "16",
            "--heads",
            "2",
            "--seq-len",
            "12",
            "--batch-size",
            "4",
            "--sample",
            "5",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "max relative difference" in out and "sample:" in out
    err = float(out.split("max relative difference ")[1].split()[0])
    assert err < 1e-3  # moonwalk's gradient equals jax.grad's up to float rounding
