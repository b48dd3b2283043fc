"""Checkpoints: parameters, optimizer state and progress in one msgpack file.

The file is ``DIR/train_state.msgpack``, written with ``flax.serialization``'s msgpack
encoding. Pytrees (an ``nnx.State``, an optax state) are stored as flat dictionaries
keyed by their leaves' paths (``jax.tree_util.keystr``), so restoring needs only a
template of the same structure — a freshly initialised model and optimizer — and any
mismatch is reported by path.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from moonjax.train._errors import CheckpointError
from moonjax.train._step import to_host

FILENAME = "train_state.msgpack"
FORMAT = "moonjax-train/1"


def checkpoint_path(directory: str | os.PathLike) -> str:
    return os.path.join(os.fspath(directory), FILENAME)


def _flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): to_host(leaf) for path, leaf in leaves}


def save(
    directory: str | os.PathLike,
    *,
    params,
    opt_state,
    epoch: int,
    step: int,
    meta: dict[str, Any],
    history: list[dict[str, float]],
) -> str:
    """Write the checkpoint atomically (a temporary file, then ``os.replace``); returns its path.

    Under ``jax.distributed`` only process 0 writes; the others return at once.
    """
    path = checkpoint_path(directory)
    state = {
        "format": FORMAT,
        "meta": meta,
        "epoch": int(epoch),
        "step": int(step),
        "history": list(history),
        "params": _flat(params),
        "opt_state": _flat(opt_state),
    }
    if jax.process_index() != 0:
        return path
    os.makedirs(os.fspath(directory), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(serialization.msgpack_serialize(state))
    os.replace(tmp, path)
    return path


def load(directory: str | os.PathLike, meta: dict[str, Any]) -> dict | None:
    """Read the checkpoint in ``directory``; ``None`` if there is none yet.

    Raises:
      CheckpointError: the file is unreadable, or was written for another model, data
        shape or optimizer (its ``meta`` differs from ``meta``).
    """
    path = checkpoint_path(directory)
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            state = serialization.msgpack_restore(f.read())
    except Exception as e:  # msgpack raises several unrelated types on corrupt input
        raise CheckpointError(
            f"{path}: not a readable moonjax checkpoint ({type(e).__name__}: {e}); delete it "
            "or choose another --checkpoint directory"
        ) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint")
    saved = state["meta"]
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, now {v!r}"
        for k, v in meta.items()
        if _plain(saved.get(k)) != _plain(v)
    ]
    if diffs:
        raise CheckpointError(
            f"{path} was written for another run ({'; '.join(diffs)}). Use the flags it was "
            "written with, or another --checkpoint directory"
        )
    state["path"] = path
    return state


def restore(state: dict, *, params, opt_state):
    """Put a ``load`` ed checkpoint into templates shaped like ``params``, ``opt_state``.

    Returns ``(params, opt_state, epoch, step, history)``.

    Raises:
      CheckpointError: the stored arrays do not fit the templates.
    """
    path = state["path"]
    params = _unflat(path, "params", state["params"], params)
    opt_state = _unflat(path, "opt_state", state["opt_state"], opt_state)
    return params, opt_state, int(state["epoch"]), int(state["step"]), list(state["history"])


def _plain(v):
    """Lists and tuples compare equal after a msgpack round trip."""
    return [_plain(u) for u in v] if isinstance(v, (list, tuple)) else v


def _unflat(path: str, what: str, stored: dict, template):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    out, problems = [], []
    for key_path, leaf in leaves:
        key = jax.tree_util.keystr(key_path)
        value = stored.get(key)
        if value is None:
            problems.append(f"{what}{key} is missing")
            continue
        value = np.asarray(value)
        if value.shape != np.shape(leaf) or value.dtype != jnp.result_type(leaf):
            problems.append(
                f"{what}{key} is {value.dtype}{list(value.shape)}, expected "
                f"{jnp.result_type(leaf)}{list(np.shape(leaf))}"
            )
        out.append(jnp.asarray(value))
    extra = set(stored) - {jax.tree_util.keystr(p) for p, _ in leaves}
    problems += [f"{what}{key} is not in this model" for key in sorted(extra)]
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        raise CheckpointError(f"{path} does not fit this run: {shown}")
    return jax.tree_util.tree_unflatten(treedef, out)
