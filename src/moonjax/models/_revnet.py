"""An i-RevNet-style classifier: an invertible body and a small contracting head."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moonjax.nn import (
    MLP,
    AdditiveCoupling,
    ConfigError,
    ConvNet,
    InvertibleConv1x1,
    InvertibleDense,
    LeakyReLU,
    Sequential,
    ShapeError,
    Squeeze,
    Stack,
)


class RevNetClassifier(nnx.Module):
    """An i-RevNet-style classifier: invertible features, then a full-rank linear head.

    The body is a bijection from the (zero-padded) input to the features:

    * **flat input** ``(batch, in_features)``: pad with zeros to ``width``, then an
      ``InvertibleDense``;
    * **image input** ``(batch, H, W, C)``: ``Squeeze`` (space-to-depth,
      factor 2), pad channels with zeros to ``width``, then an
      ``InvertibleDense`` over channels.

    then a ``Stack`` of ``depth`` blocks
    ``AdditiveCoupling -> InvertibleDense (1x1 conv on images) -> LeakyReLU``
    (images use a 3x3 ``ConvNet`` as the coupling's side network).
    The head is a dense ``width -> num_classes`` layer, which contracts with a full-rank
    Jacobian because ``width >= num_classes``; on images it runs per pixel and the logits
    are mean-pooled over the spatial axes (the same as pooling first, since the head is
    linear). ``__call__`` returns logits; ``features`` and
    ``invert_features`` expose the invertible body.

    Args:
      input_shape: ``in_features`` (an int) for flat data, or ``(H, W, C)`` for images.
      num_classes: number of classes.
      rngs: random streams.
      width: feature width of the body (even, ``>=`` the input width after the stem and
        ``>= num_classes``); default: the smallest such width.
      depth: number of stacked blocks.
      hidden: hidden width of the coupling side networks.
      negative_slope: slope of the leaky ReLUs (``> 0``).
      param_dtype: dtype of the parameters.

    Example:
      >>> model = RevNetClassifier(8, 3, rngs=nnx.Rngs(0))
      >>> graphdef, params = nnx.split(model)
      >>> loss = classifier_loss(graphdef)
      >>> loss(params, jnp.ones((4, 8)), jnp.array([0, 1, 2, 0])).shape
      ()
    """

    def __init__(
        self,
        input_shape: int | Sequence[int],
        num_classes: int,
        *,
        rngs: nnx.Rngs,
        width: int | None = None,
        depth: int = 2,
        hidden: int = 32,
        negative_slope: float = 0.5,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        if isinstance(input_shape, int):
            self.input_shape = (input_shape,)
            stem_width = input_shape
            self.squeeze = None
        else:
            self.input_shape = tuple(int(s) for s in input_shape)
            if len(self.input_shape) != 3:
                raise ConfigError(
                    "RevNetClassifier input_shape must be an int (flat features) or "
                    f"(H, W, C); got {input_shape!r}"
                )
            h, w, c = self.input_shape
            if h % 2 or w % 2:
                raise ShapeError(
                    f"RevNetClassifier squeezes images 2x2, so H and W must be even; got "
                    f"H={h}, W={w}"
                )
            self.squeeze = Squeeze(2)
            stem_width = 4 * c
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"num_classes must be an integer >= 2; got {num_classes!r}")
        if width is None:
            width = max(stem_width, num_classes)
            width += width % 2
        if width < stem_width or width % 2 or width < num_classes:
            raise ConfigError(
                f"RevNetClassifier width must be even, >= the input width after the stem "
                f"({stem_width}) and >= num_classes ({num_classes}) so the head is "
                f"full-rank; got width={width}"
            )
        self.width = width
        self.pad = width - stem_width
        self.num_classes = num_classes
        image = self.squeeze is not None
        kw = dict(param_dtype=param_dtype)

        def block(r: nnx.Rngs) -> Sequential:
            side = ConvNet(width // 2, hidden, width // 2, rngs=r, **kw) if image else None
            mix = (
                InvertibleConv1x1(width, rngs=r, **kw)
                if image
                else InvertibleDense(width, rngs=r, **kw)
            )
            if side is None:  # a random output layer, as the published figures were trained
                side = MLP(width // 2, hidden, width // 2, rngs=r, **kw)
            return Sequential(
                AdditiveCoupling(width, hidden, rngs=r, side=side, **kw),
                mix,
                LeakyReLU(negative_slope),
            )

        self.stem = InvertibleDense(width, rngs=rngs, **kw)
        self.body = Stack(block, depth, rngs=rngs)
        self.head = nnx.Linear(width, num_classes, rngs=rngs, **kw)

    def _check_input(self, x: jax.Array) -> None:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ShapeError(
                f"RevNetClassifier expects input of shape (batch, *{self.input_shape}); got "
                f"{tuple(x.shape)}"
            )

    def features(self, x: jax.Array) -> jax.Array:
        """The invertible body: ``x -> h`` (before pooling and the head)."""
        self._check_input(x)
        if self.squeeze is not None:
            x = self.squeeze(x)
        if self.pad:
            x = jnp.concatenate([x, jnp.zeros((*x.shape[:-1], self.pad), x.dtype)], axis=-1)
        return self.body(self.stem(x))

    def invert_features(self, h: jax.Array) -> jax.Array:
        """Recover the input from ``features`` (drops the zero padding)."""
        x = self.stem.inverse(self.body.inverse(h))
        x = x[..., : self.width - self.pad]
        return x if self.squeeze is None else self.squeeze.inverse(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        logits = self.head(self.features(x))
        # Images: the dense head runs per pixel and the logits are mean-pooled. This equals
        # pooling first (the head is linear) but keeps the parameter-free pooling in the
        # loss head, after the last layer Moonwalk sweeps.
        return logits if self.squeeze is None else jnp.mean(logits, axis=(1, 2))


def classifier_loss(
    graphdef: nnx.GraphDef,
) -> Callable[[nnx.State, jax.Array, jax.Array], jax.Array]:
    """The mean softmax cross-entropy ``loss(params, x, labels)`` of a classifier.

    ``params`` is the ``nnx.State`` from ``graphdef, params = nnx.split(model)``; the model
    is rebuilt inside with ``nnx.merge``. This is the form ``jax.grad`` and
    ``moonjax.moonwalk_grad`` (``argnums=0``; ``x`` and ``labels`` are the stream) expect.

    Example:
      >>> model = RevNetClassifier(8, 3, rngs=nnx.Rngs(0))
      >>> graphdef, params = nnx.split(model)
      >>> x, labels = jnp.ones((4, 8)), jnp.array([0, 1, 2, 0])
      >>> grads = jax.grad(classifier_loss(graphdef))(params, x, labels)
    """

    def loss(params: nnx.State, x: jax.Array, labels: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, params)
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return loss
