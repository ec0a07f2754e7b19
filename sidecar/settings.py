"""One validated settings object, loaded once from the environment (``SIDECAR_`` prefix).

Every field below is read from ``SIDECAR_<FIELD NAME IN UPPER CASE>``. A malformed value, an
unknown ``SIDECAR_`` variable or a missing required one stops start-up with a message that names
the variable. Secrets are wrapped in :class:`Secret`, whose repr never shows the value.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

__all__ = [
    "CONTAINER_PROVIDERS",
    "PROVIDERS",
    "PROVIDER_NAME",
    "Secret",
    "Settings",
    "SettingsError",
    "load_settings",
]

ENV_PREFIX = "SIDECAR_"

#: The gateway's provider enum, as published in the endpoint's reference page.
PROVIDERS: frozenset[str] = frozenset(
    (
        "openai", "azure", "anthropic", "bedrock", "cohere", "vertex", "vllm", "mistral",
        "ollama", "groq", "sgl", "parasail", "perplexity", "replicate", "cerebras", "gemini",
        "openrouter", "elevenlabs", "huggingface", "nebius", "xai", "runway", "fireworks",
    )
)  # fmt: skip
#: Providers that implement the containers API in current gateway versions.
CONTAINER_PROVIDERS: frozenset[str] = frozenset({"openai", "azure"})

Seconds = Annotated[float, msgspec.Meta(gt=0)]
NonNegSeconds = Annotated[float, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Fraction = Annotated[float, msgspec.Meta(ge=0, le=1)]
Positive = Annotated[int, msgspec.Meta(gt=0)]


class SettingsError(ValueError):
    """A setting is missing, unknown or malformed; the message names the variable."""


class Secret:
    """A string that never shows itself in a repr, a log line or an exception."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret value, for the one place that needs it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """The sidecar's and the worker's configuration. Field docs are the operator's reference."""

    # -- serving
    host: str = "0.0.0.0"
    """Address the sidecar listens on."""
    port: Port = 8080
    """Port the sidecar listens on."""
    access_log: bool = True
    """One log line per request with its status and duration."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level of the sidecar and the worker."""
    log_format: Literal["text", "json"] = "text"
    """``text``: one readable line per event; ``json``: one JSON object per line (for Loki,
    Elasticsearch...)."""
    shutdown_timeout_s: Seconds = 10.0
    """How long in-flight requests may take to finish after SIGTERM."""
    client_header_timeout_s: Seconds = 15.0
    """How long a client may take to send a whole request head, from its connection or from
    its previous answer on a keep-alive connection; then the connection is closed. An idle
    keep-alive connection is closed after it too."""

    # -- upstream
    upstream_kind: Literal["bifrost", "openai"] = "bifrost"
    """``bifrost``: a Bifrost gateway; ``openai``: an OpenAI-compatible API (``/v1/containers``)."""
    upstream_url: str = ""
    """Base URL of the gateway or API, e.g. ``http://bifrost:8080`` (required)."""
    upstream_timeout_s: Seconds = 10.0
    """Total time allowed for one upstream call."""
    upstream_connect_timeout_s: Seconds = 2.0
    """Time allowed to open a connection to the upstream."""
    upstream_max_connections: Positive = 100
    """Size of the upstream connection pool."""
    container_providers: frozenset[str] = CONTAINER_PROVIDERS
    """Providers whose containers API exists upstream, custom ones included (comma-separated).
    Their answers are cached and refreshed and they get their own metric labels; with
    ``upstream_kind=openai`` other providers get 400, with ``bifrost`` the gateway decides."""

    # -- cache
    redis_url: str = ""
    """Redis for the cache (``redis://``, ``rediss://``, ``unix://``). Empty: embedded store."""
    redis_cluster: bool = False
    """Treat ``redis_url`` as a Redis Cluster seed node."""
    redis_socket_timeout_s: Seconds = 0.25
    """Per-command Redis timeout; past it the request is served from upstream (fail-open)."""
    redis_connect_timeout_s: Seconds = 0.25
    """Redis connect timeout."""
    redis_retry_after_s: Seconds = 1.0
    """After a Redis failure, how long to serve from upstream before trying Redis again."""
    key_prefix: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{1,32}$")] = "bcs"
    """Prefix of every Redis key the sidecar writes."""
    key_secret: Secret | None = None
    """HMAC key for credential fingerprints; share it across replicas so grants are shared."""
    fresh_ttl_s: Seconds = 10.0
    """How long a cached container is fresh."""
    max_stale_s: NonNegSeconds = 60.0
    """How long past freshness a container is still served at once while it is refreshed."""
    stale_if_error_s: NonNegSeconds = 300.0
    """How long past ``max_stale_s`` a container is served while the upstream fails."""
    error_backoff_s: Seconds = 5.0
    """After the upstream fails for a container (5xx, timeout, unreachable: its own trouble,
    not one caller's), how long nobody calls it again for that container: callers get the
    stale-if-error copy or the sidecar's own 503 meanwhile. Doubles with each failure in a row,
    up to ``error_backoff_max_s``."""
    error_backoff_max_s: Seconds = 5.0
    """The longest back-off after failures in a row: the longest a container may wait for a
    recovered upstream."""
    negative_ttl_s: NonNegSeconds = 5.0
    """How long an upstream 404 is cached (0 disables negative caching)."""
    terminal_ttl_s: Seconds = 3600.0
    """How long a container in a terminal status (not ``running``) stays fresh."""
    grant_ttl_s: Seconds = 60.0
    """How long an upstream answer for a credential lets that credential read the cache."""
    freshness_threshold: Fraction = 0.0
    """Lowest freshness (``cache_debug.similarity``) served without revalidating."""
    local_ttl_s: NonNegSeconds = 60.0
    """The longest a process serves its own copy of a record (0: no copies, always ask Redis).
    A copy serves only while the record is fresh and the caller's grant lasts, and is replaced
    or dropped as soon as another process announces a change."""
    local_max_entries: Positive = 10_000
    """At most this many local copies of records, and as many of grants, per process (the
    oldest go first): about 1 KiB a record."""
    lock_age_s: Seconds = 5.0
    """How long a replica waits for another's fetch of the same container and credential before
    it fetches too (a holder that dies frees the lock within a second)."""

    # -- background refresh (worker)
    queue_redis_url: str = ""
    """Redis for the arq job queue; empty: the cache's Redis. Must not be a cluster."""
    queue_name: str = "bcs:queue"
    """arq queue name."""
    service_api_key: Secret | None = None
    """Credential the workers use upstream; empty: no background refresh."""
    service_api_keys: Mapping[str, Secret] = msgspec.field(default_factory=dict)
    """Per-provider service credentials, from ``SIDECAR_SERVICE_API_KEY_<PROVIDER>``."""
    hot_window_s: Seconds = 120.0
    """Entries read within this window are refreshed ahead of going stale."""
    refresh_tick_s: Annotated[int, msgspec.Meta(ge=1, le=60)] = 1
    """How often the refresh-ahead scan runs (whole seconds dividing 60)."""
    refresh_lead_s: NonNegSeconds = 0.3
    """At most this long before an entry goes stale refresh-ahead renews it: twice the
    upstream's recent p95 call time before (at least 50 ms), no earlier than this."""
    provider_concurrency: Positive = 200
    """Concurrent upstream calls per provider, shared by all workers."""
    retry_after_default_s: Seconds = 5.0
    """Back-off after a 429 without Retry-After."""
    retry_after_max_s: Seconds = 120.0
    """The longest wait an upstream's ``Retry-After`` may impose (longer ones are cut to it)."""
    worker_max_jobs: Positive = 500
    """Concurrent jobs per worker process."""
    worker_metrics_port: Port = 9090
    """Port of the worker's metrics and health endpoint (0: off)."""

    # -- operations
    admin_token: Secret | None = None
    """Bearer token of the admin endpoints (``/api/cache/...``); empty: endpoints off."""

    # -- relay (every request the cache does not answer)
    relay_max_connections: Positive = 256
    """Connections the relay may hold to the upstream at once, a pool of its own: relayed
    traffic never takes the retrievals' connections. A websocket holds one for its life."""
    relay_queue_timeout_s: Seconds = 1.0
    """How long a relayed request waits for a connection when all are busy; then 503."""
    relay_idle_timeout_s: Seconds = 600.0
    """The longest silence allowed in a relayed exchange: the upstream's answer (before its
    first byte or between two), the client's request body, a client not reading the answer.
    No total limit: a healthy stream lasts as long as it needs. A stalled body gets 408."""

    @property
    def refresh_enabled(self) -> bool:
        """True when some provider has a service credential: workers refresh in background."""
        return self.service_api_key is not None or bool(self.service_api_keys)

    def service_key_for(self, provider: str) -> Secret | None:
        """The service credential for ``provider``, per-provider override first."""
        return self.service_api_keys.get(provider, self.service_api_key)


_FIELDS = {f.name: f for f in msgspec.structs.fields(Settings)}
_SECRETS = ("key_secret", "service_api_key", "admin_token")
_PER_PROVIDER_KEY = re.compile(r"SIDECAR_SERVICE_API_KEY_[A-Z0-9_]+")
#: What Kubernetes injects for a Service named ``sidecar...`` in the pod's namespace (service
#: links): never ours, whatever the Service is called. ``SIDECAR_PORT=tcp://...`` (a Service
#: named ``sidecar``) collides with a setting and is explained in ``_parse``.
_SERVICE_LINK = re.compile(
    r"^SIDECAR(_[A-Z0-9_]+)?_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT_\d+_(TCP|UDP|SCTP)"
    r"(_PROTO|_PORT|_ADDR)?)$"
)
#: A provider name as the gateway may know it (its enum, or a custom provider's name).
PROVIDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True,
             "0": False, "false": False, "no": False, "off": False}  # fmt: skip


def _env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _dec_hook(tp: type, obj: Any) -> Any:
    if tp is Secret and isinstance(obj, str):
        return Secret(obj)
    raise NotImplementedError


def load_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Read and validate the settings from ``env`` (default ``os.environ``) plus overrides."""
    raw: dict[str, Any] = {}
    per_provider: dict[str, str] = {}  # SIDECAR_SERVICE_API_KEY_<PROVIDER> variables
    for name, value in (os.environ if env is None else env).items():
        if not name.startswith(ENV_PREFIX):
            continue
        field = name[len(ENV_PREFIX) :].lower()
        if field in _FIELDS and field != "service_api_keys":
            raw[field] = _parse(field, value)
        elif _PER_PROVIDER_KEY.fullmatch(name):
            per_provider[name] = value
        elif _SERVICE_LINK.match(name) or (
            name.endswith("_PORT") and value.startswith(("tcp://", "udp://", "sctp://"))
        ):
            continue
        elif name == "SIDECAR_REFRESH_MAX_TRIES":
            # Harmless to leave set: a failed refresh is now retried after the fleet-wide
            # back-off for as long as callers read the container.
            logging.getLogger("sidecar").warning("%s: no longer used (ignored)", name)
        elif name == "SIDECAR_SERVE_PROCESSES":
            raise SettingsError(
                f"{name}: removed: the sidecar serves with one process per container; scale "
                "it with replicas (see README, 'Running it')"
            )
        else:
            raise SettingsError(f"{name}: unknown setting (see README, 'Configuration')")
    raw["service_api_keys"] = {
        spelling: key for name, key in per_provider.items() for spelling in _spellings(name)
    }
    try:
        settings = msgspec.convert({**raw, **overrides}, Settings, strict=False, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise SettingsError(_explain(exc)) from None
    _check(settings, per_provider)
    return settings


def _spellings(variable: str) -> tuple[str, str]:
    """``SIDECAR_SERVICE_API_KEY_MY_OPENAI_EU`` is the key of provider my_openai_eu or
    my-openai-eu: both spellings are kept, and a provider looks up its own name."""
    suffix = variable.removeprefix("SIDECAR_SERVICE_API_KEY_").lower()
    return suffix, suffix.replace("_", "-")


def _parse(field: str, value: str) -> Any:
    if field == "port" and value.startswith("tcp://"):
        raise SettingsError(
            f"SIDECAR_PORT: {value!r} is a Kubernetes service link (a Service named 'sidecar' "
            "in this namespace), not a port: set 'enableServiceLinks: false' on the pod, or "
            "SIDECAR_PORT explicitly"
        )
    if field == "container_providers":
        return [part.strip() for part in value.split(",") if part.strip()]
    if _FIELDS[field].type is bool:
        return _BOOLEANS.get(value.strip().lower(), value)
    if field in _SECRETS and not value.strip():
        return None  # an empty secret is no secret
    return value.strip()


def _explain(exc: msgspec.ValidationError) -> str:
    message = str(exc)
    match = re.search(r"at `\$\.(\w+)", message)
    if not match:
        return message
    name = match.group(1)
    variable = _env_name(name) if name != "service_api_keys" else "SIDECAR_SERVICE_API_KEY_*"
    return f"{variable}: {message.split(' - at ')[0]}"


def _check(settings: Settings, per_provider: Mapping[str, str]) -> None:
    if not settings.upstream_url:
        if settings.upstream_kind == "bifrost":
            raise SettingsError(
                "SIDECAR_UPSTREAM_URL: required (the gateway's base URL, e.g. http://bifrost:8080)"
            )
    elif not re.match(r"^https?://[^/\s]+", settings.upstream_url):
        raise SettingsError(
            f"SIDECAR_UPSTREAM_URL: expected an http(s) URL, got {settings.upstream_url!r}"
        )
    for url_field in ("redis_url", "queue_redis_url"):
        url = getattr(settings, url_field)
        if url and not re.match(r"^(rediss?|unix|redis\+sentinel)://", url):
            raise SettingsError(
                f"{_env_name(url_field)}: expected a redis://, rediss://, unix:// or "
                "redis+sentinel:// URL (credentials in it are never logged)"
            )
    if 60 % settings.refresh_tick_s:
        raise SettingsError(
            f"SIDECAR_REFRESH_TICK_S: must divide 60 (1, 2, 3, 4, 5, 6, 10, 12, 15, 20 or 30), "
            f"got {settings.refresh_tick_s}"
        )
    bad = sorted(p for p in settings.container_providers if not PROVIDER_NAME.fullmatch(p))
    if bad:
        raise SettingsError(
            f"SIDECAR_CONTAINER_PROVIDERS: not a provider name: {', '.join(bad)} (letters, digits, "
            "'-', '_' and '.', at most 64)"
        )
    if not settings.container_providers:
        raise SettingsError("SIDECAR_CONTAINER_PROVIDERS: name at least one provider")
    for variable in per_provider:
        if not settings.container_providers.intersection(_spellings(variable)):
            raise SettingsError(
                f"{variable}: no such provider in SIDECAR_CONTAINER_PROVIDERS "
                f"({', '.join(sorted(settings.container_providers))})"
            )


def cache_provider(settings: Settings, provider: str) -> str:
    """The provider a container is cached under: what the upstream keys it by. Straight
    against OpenAI every provider name reaches the same API, so all are one."""
    return "openai" if settings.upstream_kind == "openai" else provider


def upstream_base(settings: Settings) -> str:
    """The upstream base URL without a trailing slash (OpenAI's public API by default)."""
    return (settings.upstream_url or "https://api.openai.com").rstrip("/")
