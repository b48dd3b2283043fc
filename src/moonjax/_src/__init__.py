"""moonjax's implementation; the public API is ``moonjax``."""

from moonjax._src import scan as _scan  # noqa: F401  (registers the sweep of lax.scan)
