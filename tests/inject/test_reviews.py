"""Reviews the injector cannot use are answered, never with a 500; the real server over TLS; the
metrics; the command."""

from __future__ import annotations

import json
import re
import ssl
import subprocess
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from sidecar.inject import INJECTED, REFUSED, SKIPPED, Template
from sidecar.webhook import MAX_REVIEW_BYTES, CertificateFiles, create_injector_app
from tests.conftest import Running, stop_app
from tests.inject.support import Injector, Object, deployment_review, review_of
from tests.support import run


def _without(*path: str) -> Object:
    review = deployment_review()
    parent = review
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    return review


def _with(value: object, *path: str) -> Object:
    review = deployment_review()
    parent = review
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return review


def _env_of_strings(pod: Object) -> None:
    pod["spec"]["containers"][0]["env"] = ["OPENAI_BASE_URL=http://bifrost:8080/openai/v1"]


# Reviews that carry a uid: answered 200, allowed, unchanged, with a warning.
UNUSABLE = {
    "v1beta1": _with("admission.k8s.io/v1beta1", "apiVersion"),
    "a-deployment": _with(
        {"group": "apps", "version": "v1", "kind": "Deployment"}, "request", "kind"
    ),
    "an-update": _with("UPDATE", "request", "operation"),
    "no-object": _with(None, "request", "object"),
    "no-spec": _without("request", "object", "spec"),
    "containers-not-a-list": _with({"app": {}}, "request", "object", "spec", "containers"),
    "env-of-strings": review_of(_env_of_strings),
    "annotations-not-strings": _with(
        {"bifrost-container-sidecar/inject": True}, "request", "object", "metadata", "annotations"
    ),
}


@pytest.mark.parametrize("review", UNUSABLE.values(), ids=UNUSABLE.keys())
async def test_a_review_it_cannot_use_is_allowed_unchanged_with_a_warning(
    injector: Injector, review: Object
) -> None:
    answer = await injector.send(review)
    assert answer.status == 200
    assert answer.response["uid"] == review["request"]["uid"]
    assert answer.patch == []
    (warning,) = answer.warnings
    assert warning.startswith("bifrost-container-sidecar: ")
    assert "allowed unchanged" in warning or "not injected" in warning


NO_UID = {
    "not-json": b"{not json",
    "empty": b"",
    "a-list": b"[]",
    "no-request": json.dumps(
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}
    ).encode(),
    "no-uid": json.dumps(_without("request", "uid")).encode(),
    "uid-not-a-string": json.dumps(_with(42, "request", "uid")).encode(),
}


@pytest.mark.parametrize("body", NO_UID.values(), ids=NO_UID.keys())
async def test_a_body_without_a_uid_to_answer_gets_a_400(injector: Injector, body: bytes) -> None:
    answer = await injector.send(body)
    assert answer.status == 400
    assert "request.uid" in answer.body["text"]


async def test_a_review_over_the_bound_is_refused_before_it_is_parsed(injector: Injector) -> None:
    answer = await injector.send(b"x" * (MAX_REVIEW_BYTES + 1))
    assert answer.status == 413
    assert 'sidecar_injector_pods_total{outcome="refused",reason="too-large"} 1.0' in (
        await injector.metrics()
    )


async def test_metrics_count_pods_by_outcome_and_reason_from_closed_sets(
    injector: Injector,
) -> None:
    await injector.send(deployment_review())
    await injector.send(UNUSABLE["an-update"])
    await injector.send(b"{not json")
    metrics = await injector.metrics()
    found = dict(re.findall(r'^sidecar_injector_pods_total\{(outcome="\w+",reason="[\w-]+")\} (\S+)$',
                            metrics, re.M))  # fmt: skip
    expected = {
        f'outcome="{outcome}",reason="{reason}"'
        for outcome, reasons in (("injected", INJECTED), ("skipped", SKIPPED), ("refused", REFUSED))
        for reason in reasons
    }
    assert found.keys() == expected, "every label value exists from the start, and no other"
    assert found['outcome="injected",reason="annotation"'] == "1.0"
    assert found['outcome="refused",reason="malformed"'] == "1.0"
    assert found['outcome="refused",reason="no-uid"'] == "1.0"
    assert sum(float(v) for v in found.values()) == 3


def _certificate(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert),
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


async def test_the_server_answers_a_review_over_tls_and_takes_a_renewed_certificate(
    tmp_path: Path, template: Template
) -> None:
    first_cert, key = _certificate(tmp_path, "first")
    served_cert, served_key = tmp_path / "tls.crt", tmp_path / "tls.key"
    served_cert.write_bytes(first_cert.read_bytes())
    served_key.write_bytes(key.read_bytes())
    files = CertificateFiles(str(served_cert), str(served_key))
    runner = web.AppRunner(create_injector_app(template, files), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=files.context)
    await site.start()
    port = runner.addresses[0][1]
    running = Running(f"https://localhost:{port}", runner.app, runner)
    try:
        # As the API server does: it trusts the CA of the webhook's caBundle, and only that.
        trusting_first = ssl.create_default_context(cafile=str(first_cert))
        async with aiohttp.ClientSession() as http:
            review = deployment_review()
            async with http.post(
                running.url + "/mutate", json=review, ssl=trusting_first
            ) as response:
                assert response.status == 200
                answer = await response.json()
            assert answer["response"]["uid"] == review["request"]["uid"]
            assert answer["response"]["patchType"] == "JSONPatch"
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await http.get(running.url + "/healthz", ssl=ssl.create_default_context())

            # cert-manager renews the Secret; the kubelet updates the files.
            second_cert, second_key = _certificate(tmp_path, "second")
            served_key.write_bytes(second_key.read_bytes())
            served_cert.write_bytes(second_cert.read_bytes())
            assert files.reload()
            assert not files.reload(), "unchanged files are not loaded again"
            trusting_second = ssl.create_default_context(cafile=str(second_cert))
            async with http.get(running.url + "/readyz", ssl=trusting_second) as response:
                assert response.status == 200
    finally:
        await stop_app(running)


def test_the_command_takes_its_tls_files_port_and_template() -> None:
    result = run("sidecar", "inject", "--help")
    assert result.returncode == 0
    for flag in ("--cert-file", "--key-file", "--port", "--template", "--image"):
        assert flag in result.stdout
    assert "inject" in run("sidecar", "--help").stdout


def test_the_command_stops_naming_a_missing_template(tmp_path: Path) -> None:
    cert, key = _certificate(tmp_path, "tls")
    result = run("sidecar", "inject", "--cert-file", str(cert), "--key-file", str(key),
                 "--template", str(tmp_path / "missing.json"))  # fmt: skip
    assert result.returncode == 2
    assert "missing.json" in result.stderr
