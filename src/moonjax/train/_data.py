"""Data sets for ``moonjax train``: scikit-learn's digits, or a user ``.npz``."""

from __future__ import annotations

import dataclasses
import os
import zipfile

import numpy as np

from moonjax.train._errors import DataError


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A classification data set split into train and test, ready for training.

    Inputs are float32 and standardised per feature with the training split's mean and
    standard deviation; labels are int32 in ``[0, num_classes)``.

    Attributes:
      name: where the data came from (``"digits"`` or the ``.npz`` path).
      x_train: ``(n_train, *input_shape)`` float32.
      y_train: ``(n_train,)`` int32.
      x_test: ``(n_test, *input_shape)`` float32.
      y_test: ``(n_test,)`` int32.
      num_classes: number of classes.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example: ``(features,)`` or ``(H, W, C)``."""
        return tuple(self.x_train.shape[1:])


def load_dataset(
    path: str | os.PathLike | None = None, *, test_fraction: float = 0.2, split_seed: int = 0
) -> Dataset:
    """Load scikit-learn's digits (``path=None``) or a ``.npz`` file, split and standardised.

    The ``.npz`` holds ``x`` (``(N, features)``, ``(N, H, W)`` or ``(N, H, W, C)`` images)
    and ``y`` (``(N,)`` integer labels from 0); a held-out split is drawn from them with
    ``test_fraction``, unless the file also holds ``x_test`` and ``y_test``. Digits are
    the 1,797 8x8 grey images of ``sklearn.datasets.load_digits``, flattened to 64
    features; they ship with scikit-learn (``pip install 'moonjax[examples]'``).

    Args:
      path: a ``.npz`` file, or ``None`` for digits.
      test_fraction: share of the examples held out for testing when the data has no
        test split of its own.
      split_seed: seed of the train/test split (fixed, so that runs with different
        training seeds are scored on the same examples).

    Returns:
      A ``Dataset``.

    Raises:
      DataError: the file is missing or unreadable, or its arrays do not fit.

    Example:
      >>> data = load_dataset()
      >>> data.input_shape, data.num_classes, len(data.x_train), len(data.x_test)
      ((64,), 10, 1438, 359)
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1); got {test_fraction}")
    if path is None:
        name = "digits"
        x, y, test = *_digits(), None
    else:
        name = os.fspath(path)
        x, y, test = _npz(name)
    if test is None:
        n_test = int(round(len(x) * test_fraction))
        if n_test < 1 or len(x) - n_test < 1:
            raise DataError(
                f"{name}: {len(x)} example(s) cannot be split into train and test with "
                f"test_fraction={test_fraction}; add examples or pass x_test, y_test"
            )
        order = np.random.default_rng(split_seed).permutation(len(x))
        test_ix, train_ix = order[:n_test], order[n_test:]
        x_train, y_train, x_test, y_test = x[train_ix], y[train_ix], x[test_ix], y[test_ix]
    else:
        x_train, y_train = x, y
        x_test, y_test = test
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    if num_classes < 2:
        raise DataError(f"{name}: labels must take at least two values; got only {num_classes}")
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    # constant features (the digits' blank corners) are centred but not scaled up
    scale = np.where(std > 1e-6, std, 1.0)
    x_train = ((x_train - mean) / scale).astype(np.float32)
    x_test = ((x_test - mean) / scale).astype(np.float32)
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataError(
            "the digits data set needs scikit-learn: pip install 'moonjax[examples]' "
            "(or pass --data PATH.npz with arrays x and y)"
        ) from e
    digits = load_digits()
    return digits.data.astype(np.float32), digits.target.astype(np.int32)


def _npz(path: str):
    if not os.path.exists(path):
        raise DataError(f"--data {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(
            f"--data {path}: not a readable .npz file ({type(e).__name__}: {e}); save one "
            "with numpy.savez(path, x=inputs, y=labels)"
        ) from e
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(
            f"--data {path}: missing array(s) {', '.join(missing)}; found "
            f"{sorted(arrays) or 'none'}. Expected x (N, features) or (N, H, W[, C]) inputs "
            "and y (N,) integer labels"
        )
    x, y = _check_xy(path, arrays["x"], arrays["y"], "x", "y")
    test = None
    if "x_test" in arrays or "y_test" in arrays:
        if not ("x_test" in arrays and "y_test" in arrays):
            raise DataError(f"--data {path}: give both x_test and y_test, or neither")
        xt, yt = _check_xy(path, arrays["x_test"], arrays["y_test"], "x_test", "y_test")
        if xt.shape[1:] != x.shape[1:]:
            raise DataError(
                f"--data {path}: x_test examples have shape {xt.shape[1:]}, x examples "
                f"{x.shape[1:]}"
            )
        test = (xt, yt)
    return x, y, test


def _check_xy(path, x, y, xname, yname):
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"--data {path}: {xname} must be numeric; got dtype {x.dtype}")
    if x.ndim == 3:  # (N, H, W) grey images
        x = x[..., None]
    if x.ndim not in (2, 4):
        raise DataError(
            f"--data {path}: {xname} must be (N, features), (N, H, W) or (N, H, W, C); "
            f"got shape {x.shape}"
        )
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(
            f"--data {path}: {yname} must be one label per example, shape ({len(x)},); got "
            f"shape {y.shape}"
        )
    if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"--data {path}: {yname} must hold integer class labels 0..K-1; got dtype {y.dtype}"
        )
    if len(y) and y.min() < 0:
        raise DataError(f"--data {path}: {yname} has negative labels (min {y.min()})")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise DataError(f"--data {path}: {xname} contains NaN or Inf")
    if len(x) == 0:
        raise DataError(f"--data {path}: {xname} is empty")
    return x, y.astype(np.int32)
