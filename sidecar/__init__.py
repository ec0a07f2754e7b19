"""A caching sidecar for Bifrost / OpenAI container retrievals."""

__version__ = "0.1.0"
