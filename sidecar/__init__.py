"""A caching sidecar for Bifrost / OpenAI container retrievals."""

__version__ = "0.1.0"

#: The operations endpoints (``sidecar.health``): not logged, traced or counted as answers.
OPS_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
