"""Training with Moonwalk gradients: the loop behind ``moonjax train``.

``fit`` trains a ``moonjax.models.RevNetClassifier`` on scikit-learn's digits or
a ``.npz`` of your own, with ``optax.adam``, a jitted train step sharded over all devices
(batch split, parameters replicated), checkpoints and a progress display.
``make_train_step`` is that step for any ``loss(params, x, y)`` and optimizer.

Example::

    from moonjax import train

    result = train.fit(train.TrainConfig(grad="moonwalk", epochs=20))
    print(result.test_accuracy, result.temp_bytes)
"""

from moonjax.nn import ConfigError
from moonjax.train._data import Dataset, load_dataset
from moonjax.train._errors import CheckpointError, DataError
from moonjax.train._loop import TrainConfig, TrainResult, fit, one_blas_thread
from moonjax.train._step import data_mesh, make_train_step

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "Dataset",
    "TrainConfig",
    "TrainResult",
    "data_mesh",
    "fit",
    "load_dataset",
    "make_train_step",
    "one_blas_thread",
]
