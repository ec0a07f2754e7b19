"""Settings: validated once, failing loudly with the variable's name, secrets hidden."""

from __future__ import annotations

import pytest

from sidecar.settings import SettingsError, load_settings

BASE = {"SIDECAR_UPSTREAM_URL": "http://gateway:8080"}


def test_defaults_and_typed_values() -> None:
    settings = load_settings(
        {**BASE, "SIDECAR_PORT": "9000", "SIDECAR_FRESH_TTL_S": "2.5", "SIDECAR_ACCESS_LOG": "no"}
    )
    assert settings.port == 9000
    assert settings.fresh_ttl_s == 2.5
    assert settings.access_log is False
    assert settings.upstream_kind == "bifrost"
    assert settings.container_providers == {"openai", "azure"}


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"SIDECAR_PORT": "eighty"}, "SIDECAR_PORT"),
        ({"SIDECAR_PORT": "70000"}, "SIDECAR_PORT"),
        ({"SIDECAR_FRESH_TTL_S": "0"}, "SIDECAR_FRESH_TTL_S"),
        ({"SIDECAR_UPSTREAM_KIND": "grpc"}, "SIDECAR_UPSTREAM_KIND"),
        ({"SIDECAR_UPSTREAM_URL": "gateway:8080"}, "SIDECAR_UPSTREAM_URL"),
        ({"SIDECAR_UPSTREAM_URL": ""}, "SIDECAR_UPSTREAM_URL"),
        ({"SIDECAR_REDIS_URL": "localhost:6379"}, "SIDECAR_REDIS_URL"),
        ({"SIDECAR_FRESHNESS_THRESHOLD": "1.5"}, "SIDECAR_FRESHNESS_THRESHOLD"),
        ({"SIDECAR_CONTAINER_PROVIDERS": "openai,no pe"}, "SIDECAR_CONTAINER_PROVIDERS"),
        ({"SIDECAR_CONTAINER_PROVIDERS": "openai,../x"}, "SIDECAR_CONTAINER_PROVIDERS"),
        ({"SIDECAR_FRESH_TTL": "5"}, "SIDECAR_FRESH_TTL"),
        ({"SIDECAR_SERVICE_API_KEY_NOPE": "x"}, "SIDECAR_SERVICE_API_KEY_NOPE"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({**BASE, **env})
    assert str(caught.value).startswith(variable + ":")


def test_openai_kind_defaults_to_the_public_api() -> None:
    settings = load_settings({"SIDECAR_UPSTREAM_KIND": "openai"})
    assert settings.upstream_url == ""


def test_secrets_never_show_in_a_repr() -> None:
    settings = load_settings(
        {
            **BASE,
            "SIDECAR_KEY_SECRET": "hmac-secret-1",
            "SIDECAR_SERVICE_API_KEY": "sk-service-2",
            "SIDECAR_SERVICE_API_KEY_AZURE": "az-key-3",
            "SIDECAR_ADMIN_TOKEN": "admin-4",
        }
    )
    text = repr(settings) + str(settings)
    for secret in ("hmac-secret-1", "sk-service-2", "az-key-3", "admin-4"):
        assert secret not in text
    assert settings.service_key_for("azure").reveal() == "az-key-3"  # type: ignore[union-attr]
    assert settings.service_key_for("openai").reveal() == "sk-service-2"  # type: ignore[union-attr]


def test_unrelated_environment_is_ignored() -> None:
    assert load_settings({**BASE, "PATH": "/bin", "OTHER_PORT": "x"}).port == 8080
