"""``sidecar emulate``'s flags and the configuration they make."""

from __future__ import annotations

import argparse

import pytest

from emulator import EmulatorConfig
from emulator.cli import add_arguments, config_from_args
from tests.emulator.support import MakeClient, bearer, create, get


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


async def test_flags_configure_projects_keys_and_expiry(make_client: MakeClient) -> None:
    ns = parse("--project", "k-1, k-2", "--project", "k-3", "--revoked-key", "k-gone-123456",
               "--default-expires-minutes", "3", "--latency-ms", "1.5",
               "--stream-delay-ms", "40")  # fmt: skip
    assert (ns.host, ns.port) == ("127.0.0.1", 8090)
    config = config_from_args(ns)
    assert (config.latency_ms, config.stream_delay_ms) == (1.5, 40)
    assert "k-gone" not in repr(config)
    client = await make_client(config)
    assert (await (await client.get("/_emulator/streams")).json())["delay_ms"] == 40

    shared = await create(client, "k-1")
    assert shared["expires_after"]["minutes"] == 3
    assert (await get(client, f"/v1/containers/{shared['id']}", "k-2"))[0] == 200
    assert (await get(client, f"/v1/containers/{shared['id']}", "k-3"))[0] == 404
    assert (await get(client, "/v1/containers", "k-gone-123456"))[0] == 401


async def test_gateway_flags(make_client: MakeClient) -> None:
    defaults = config_from_args(parse())
    assert (defaults.virtual_keys, defaults.gateway_version) == ("required", "current")
    assert defaults.custom_providers == ()
    assert defaults.container_providers == frozenset({"openai", "azure"})

    config = config_from_args(parse(
        "--custom-provider", "my-openai-eu=openai", "--custom-provider", "my-claude = anthropic",
        "--container-providers", "openai", "--optional-virtual-keys",
        "--gateway-key", "sk-gw-000000001", "--project", "sk-gw-000000001,k-1",
        "--gateway-version", "legacy",
    ))  # fmt: skip
    assert config.custom_providers == (("my-openai-eu", "openai"), ("my-claude", "anthropic"))
    assert config.container_providers == frozenset({"openai"})
    assert (config.virtual_keys, config.gateway_version) == ("optional", "legacy")
    assert (defaults.v1_face, config_from_args(parse("--v1-as-gateway")).v1_face) == (
        "openai", "gateway",
    )  # fmt: skip
    assert "sk-gw-000000001" not in repr(config)
    client = await make_client(config)

    mine = await create(client, "k-1")
    response = await client.get(f"/openai/v1/containers/{mine['id']}?provider=my-openai-eu")
    assert response.status == 200  # anonymous, served with the gateway's key, k-1's project
    response = await client.get(f"/openai/containers/{mine['id']}?provider=azure",
                                headers=bearer("k-1"))  # fmt: skip
    assert response.status == 500  # legacy: unsupported operations are 500


@pytest.mark.parametrize(
    "argv",
    [
        ["--default-expires-minutes", "0"],
        ["--latency-ms", "-1"],
        ["--custom-provider", "my-openai-eu"],
        ["--custom-provider", "x=nope"],
        ["--container-providers", "openai,nope"],
        ["--gateway-version", "ancient"],
    ],
)
def test_bad_flags_stop_with_a_usage_error(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse(*argv)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"custom_providers": (("openai", "openai"),)}, "must be a new"),
        ({"custom_providers": (("x", "nope"),)}, "unknown base provider"),
        ({"custom_providers": (("x", "openai"), ("x", "azure"))}, "named once"),
        ({"projects": (("k",), ("k",))}, "one project only"),
        ({"gateway_key": ""}, "gateway_key"),
    ],
)
def test_bad_configs_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EmulatorConfig(**overrides)  # type: ignore[arg-type]
