"""Fuzzing the sidecar's HTTP surface on a raw socket: whatever a client sends, the answer is
HTTP, every error the sidecar makes itself is JSON in the gateway's error shape, no answer is a
500 or carries a traceback, client input never makes a 5xx, and the log has neither tracebacks
nor credentials.

A real ``sidecar serve`` process (its real log configuration and access log) runs in front of the
emulator (``sidecar emulate``), so the upstream always answers: a 5xx cannot be blamed on an
unreachable upstream. Cases are generated from a fixed seed (a few hundred, a few seconds): bad
paths (traversal, ``%00``, over-long, unicode, ``//``), queries, headers (bad characters, long
lines, too many, duplicated credentials, CRLF injection, obs-fold), methods and request lines,
and random mutations of valid requests. Every credential a case sends is a recognisable fake
secret (``sk-bf-FUZZSECRET...``); so are the sidecar's own service key, HMAC key and admin token.
Then every route the sidecar has (retrievals, the container API it passes through, operations,
admin, paths it has no route for) under every method gets malformed and duplicated headers,
8 KB hostile values for every header it parses, and odd queries (``%23``, ``%25xx``, a repeated
``provider``), in front of a gateway and straight against OpenAI.

Whose words an answer is, is not guessed: a tap between the sidecar and the emulator keeps every
answer the upstream made. An answer the sidecar relayed byte for byte keeps the upstream's shape
and status (the emulator's ``/v1`` face answers in OpenAI's envelope), but must still be JSON
with ``error.message``; every other error is the sidecar's own and must be in the gateway's
``BifrostError`` shape (``sidecar.wire.error_body``).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import random
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from sidecar.controls import CONTROL_HEADERS
from sidecar.settings import PROVIDERS
from tests.conftest import RedisServer, free_port
from tests.support import BIN, wait_until

SEED = 20261123
MARKER = "FUZZSECRET"
OWNER_KEY = "sk-bf-FUZZSECRETOWNER0000000000"  # the project that owns the real containers
OTHER_KEY = "sk-bf-FUZZSECRETOTHER0000000000"  # a project of its own
SIDECAR_SECRETS = {
    "SIDECAR_SERVICE_API_KEY": "sk-bf-FUZZSECRETSERVICE000000000",
    "SIDECAR_KEY_SECRET": "FUZZSECRETHMAC00000000000000",
    "SIDECAR_ADMIN_TOKEN": "FUZZSECRETADMIN0000000000000",
}
CRED_HEADERS = ("Authorization", "x-api-key", "x-goog-api-key", "x-bf-vk")
PROVIDER_JUNK = ("fzq", "OPENAI", "open ai", "openai\x00", "fz" * 200, "fz\u202eai", "fz%zz",
                 "../openai", "openai;azure", "fz\u00e9", "anthropic", "my-openai-eu", "")  # fmt: skip


# -- the pieces ------------------------------------------------------------------------------------


_HOP_BY_HOP = frozenset({"host", "connection", "keep-alive", "content-length", "transfer-encoding",
                         "te", "trailer", "upgrade"})  # fmt: skip


class Tap:
    """Between the sidecar and the emulator, in a thread of its own: relays every request as it
    came and keeps every answer the upstream made (status and body)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.url = ""
        self._answers: list[tuple[int, bytes]] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    def __enter__(self) -> Tap:
        self._thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def take(self) -> list[tuple[int, bytes]]:
        """The upstream's answers since the last call."""
        with self._lock:
            answers, self._answers = self._answers, []
        return answers

    async def _start(self) -> str:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._relay)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        return f"http://{host}:{port}"

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _relay(self, request: web.Request) -> web.Response:
        assert self._session is not None
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP]
        body = await request.read()
        try:
            async with self._session.request(
                request.method, URL(self.target + request.raw_path, encoded=True),
                headers=headers, data=body or None, allow_redirects=False,
            ) as upstream:  # fmt: skip
                status, raw = upstream.status, await upstream.read()
                relayed = [(k, v) for k, v in upstream.headers.items()
                           if k.lower() not in _HOP_BY_HOP]  # fmt: skip
        except (aiohttp.ClientError, ValueError) as exc:  # what the tap could not relay
            status, relayed = 502, [("Content-Type", "application/json")]
            raw = json.dumps({"error": {"message": f"tap: {type(exc).__name__}"}}).encode()
        with self._lock:
            self._answers.append((status, raw))
        return web.Response(body=raw, status=status, headers=relayed)


@dataclass
class Stack:
    """The emulator and the sidecar, as processes (the tap between them); the sidecar's log in
    a file."""

    sidecar_port: int
    emulator_url: str
    log: Path
    sidecar: subprocess.Popen[bytes]
    containers: list[str]
    tap: Tap
    offset: int = 0

    def new_log(self, settle_s: float = 0.0) -> str:
        """Log text written since the last call; waits up to ``settle_s`` for an access-log line
        (written once the answer is sent), so that a case's lines are read with that case."""
        deadline = time.monotonic() + settle_s
        data = b""
        while True:
            with self.log.open("rb") as sink:
                sink.seek(self.offset + len(data))
                data += sink.read()
            if b"sidecar.access" in data or time.monotonic() >= deadline:
                break
            time.sleep(0.002)
        self.offset += len(data)
        return data.decode("utf-8", "replace")


def control(base: str, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> Any:  # fmt: skip
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return json.loads(response.read() or b"null")
    finally:
        conn.close()


def wait_ready(port: int, process: subprocess.Popen[bytes], path: str) -> None:
    def ready() -> bool:
        assert process.poll() is None, f"exited with {process.returncode}"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            control(f"http://127.0.0.1:{port}", "GET", path)
            return True
        return False

    wait_until(ready, 20, f"{path} answering")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@contextlib.contextmanager
def run_stack(redis: RedisServer, workdir: Path, kind: str) -> Iterator[Stack]:
    """The emulator, the tap and a sidecar in front of them (``SIDECAR_UPSTREAM_KIND=kind``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    emulator_port, sidecar_port = free_port(), free_port()
    with (workdir / "emulator.log").open("wb") as sink:
        emulator = subprocess.Popen(
            [str(BIN / "sidecar"), "emulate", "--port", str(emulator_port)],
            env=env, stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    sidecar = None
    try:
        wait_ready(emulator_port, emulator, "/_emulator/healthz")
        emulator_url = f"http://127.0.0.1:{emulator_port}"
        containers = [
            control(emulator_url, "POST", "/v1/containers", b'{"name": "fuzz"}',
                    {"Authorization": f"Bearer {OWNER_KEY}",
                     "Content-Type": "application/json"})["id"]
            for _ in range(3)
        ]  # fmt: skip
        log = workdir / "sidecar.log"
        with Tap(emulator_url) as tap, log.open("wb") as sink:
            sidecar = subprocess.Popen(
                [str(BIN / "sidecar"), "serve"],
                env={
                    **env,
                    **SIDECAR_SECRETS,
                    "SIDECAR_UPSTREAM_KIND": kind,
                    "SIDECAR_UPSTREAM_URL": tap.url,
                    "SIDECAR_REDIS_URL": redis.url,
                    "SIDECAR_KEY_PREFIX": f"fuzz-{kind}",
                    "SIDECAR_QUEUE_NAME": f"fuzz-{kind}:queue",
                    "SIDECAR_HOST": "127.0.0.1",
                    "SIDECAR_PORT": str(sidecar_port),
                    "SIDECAR_UPSTREAM_TIMEOUT_S": "5",
                },
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
            wait_ready(sidecar_port, sidecar, "/healthz")
            yield Stack(sidecar_port, emulator_url, log, sidecar, containers, tap)
            stop(sidecar)
    finally:
        if sidecar is not None:
            stop(sidecar)
        stop(emulator)


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with run_stack(redis_server, tmp_path_factory.mktemp("fuzz"), "bifrost") as running:
        yield running


# -- cases -----------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    data: bytes
    method: str = "GET"
    only_if_cached: bool = False
    """``Cache-Control: only-if-cached``: a 504 is the answer RFC 9111 (5.2.1.7) prescribes."""


@dataclass
class Maker:
    """Builds a category's cases from one seeded random generator."""

    rng: random.Random
    containers: list[str]
    cases: list[Case] = field(default_factory=list)
    serial: int = 0

    def secret(self) -> str:
        self.serial += 1
        return f"sk-bf-{MARKER}{self.serial:04d}{self.rng.getrandbits(48):012x}"

    def credential(self, header: str | None = None) -> tuple[bytes, bytes]:
        header = header or self.rng.choice(CRED_HEADERS)
        secret = self.rng.choice((self.secret(), self.secret(), OWNER_KEY, OTHER_KEY))
        value = f"Bearer {secret}" if header == "Authorization" else secret
        return header.encode(), value.encode()

    def cid(self) -> str:
        return self.rng.choice([*self.containers, "cntr_fuzz_absent"])

    def add(
        self,
        name: str,
        target: bytes | str = b"",
        *,
        method: bytes | str = b"GET",
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes = b"",
        version: bytes = b"HTTP/1.1",
        raw: bytes | None = None,
        credential: bool = True,
        close: bool = True,
    ) -> None:
        """A request from parts (``raw`` instead, when the framing itself is the test)."""
        method = method.encode("latin-1") if isinstance(method, str) else method
        if raw is None:
            target = target.encode() if isinstance(target, str) else target
            if not target:
                target = f"/openai/v1/containers/{self.cid()}".encode()
            lines = [method + b" " + target + b" " + version, b"Host: 127.0.0.1"]
            if credential:
                lines.append(b": ".join(self.credential()))
            lines += [k + b": " + v for k, v in headers or ()]
            if body:
                lines.append(b"Content-Length: " + str(len(body)).encode())
            if close:
                lines.append(b"Connection: close")
            raw = b"\r\n".join(lines) + b"\r\n\r\n" + body
        only_if_cached = b"only-if-cached" in raw.lower()
        self.cases.append(Case(name, raw, method.decode("latin-1", "replace"), only_if_cached))


def retrieve_targets(m: Maker) -> list[str]:
    cid = m.cid()
    return [f"/openai/v1/containers/{cid}", f"/openai/containers/{cid}",
            f"/v1/containers/{cid}?provider=openai"]  # fmt: skip


def path_cases(m: Maker) -> None:
    cid = m.containers[0]
    tricky = [
        "/openai/v1/containers/../../metrics", "/openai/v1/containers/..%2f..%2fmetrics",
        "/openai/v1/containers/%2e%2e/%2e%2e/metrics", "/openai/v1/containers/..%5c..%5cmetrics",
        f"/openai/v1/containers/{cid}/..", f"/openai/v1/containers/{cid}/../{cid}",
        "/openai/v1/containers/%2e%2e", "/openai/v1/containers/.", "/openai/v1/containers/..",
        "/../../../../etc/passwd", "/openai/v1/containers/%00", f"/openai/v1/containers/{cid}%00",
        f"/openai/v1/containers/{cid}%00.json", "/openai/v1/containers/%zz", "/openai/v1/containers/%",
        "/openai/v1/containers/%c0%ae%c0%ae", "/openai/v1/containers/%ff%fe", "/openai/v1/containers/%e2%80%ae",
        "/openai/v1/containers/caf%C3%A9", "/openai/v1/containers/%F0%9F%92%A5",
        f"//openai/v1/containers/{cid}", f"/openai//v1/containers/{cid}",
        f"/openai/v1/containers//{cid}", f"/openai/v1/containers/{cid}/", "/openai/v1//containers//",
        "//", "/", "", "/openai", "/openai/v1", "/openai/v1/containers/",
        f"/openai/v1/containers/{cid};jsessionid=1", f"/openai/v1/containers/{cid}#frag",
        f"/openai/v1/containers/{cid}%23frag", f"/openai/v1/containers/{cid}%3Fprovider=azure",
        f"/openai/v1/containers/{cid}%2Ffiles", f"/openai/v1/containers/{cid}/files/%2e%2e",
        f"/openai/v1/containers/{cid}/files/..%2f..%2f..%2fmetrics/content",
        f"/openai/v1/containers/{cid}/files/cfile_x/content/extra",
        "/openai/v1/containers/" + "a" * 129, "/openai/v1/containers/" + "a" * 2000,
        "/openai/v1/containers/" + "a" * 7900, "/openai/v1/containers/" + "a" * 9000,
        "/openai/v1/containers/" + "%41" * 1500, "/openai/v1/containers/-leading",
        "/openai/v1/containers/_leading", "/openai/v1/containers/ws%20space", "/openai/v1/containers/a+b",
        "/api/cache/clear/../../metrics", "/api/cache/clear/%00", "/api/cache/clear-by-key/" + "x" * 3000,
        "/api/cache/stats/..", "/metrics/../healthz", "/_emulator/stats", "/healthz%00",
        "/OPENAI/V1/CONTAINERS/" + cid, "/openai/v2/containers/" + cid, "/v1/containers/" + cid,
    ]  # fmt: skip
    for path in tricky:
        m.add(f"path {path[:60]!r}", path)
    for text in (
        "é",
        "💥",
        "\u202e",
        "\u00a0",
        "\uff4f\uff50\uff45\uff4e\uff41\uff49",
        "\ufeff",
        "\u0000",
    ):
        m.add(f"raw unicode path {text!r}", ("/openai/v1/containers/x" + text).encode())
    m.add("raw invalid utf-8 path", b"/openai/v1/containers/\xff\xfe\xc0\xaf")
    alphabet = "abc/_-.%~:@!$&'()*+,;=\\^`{}|[]<>\"" + "0123456789"
    for _ in range(12):
        path = "/openai/v1/containers/" + "".join(
            m.rng.choice(alphabet) for _ in range(m.rng.randint(1, 40))
        )
        m.add(f"random path {path!r}", path)


def query_cases(m: Maker) -> None:
    cid = m.containers[0]
    routes = [f"/openai/v1/containers/{cid}", f"/v1/containers/{cid}", "/openai/v1/containers",
              f"/openai/v1/containers/{cid}/files", f"/openai/containers/{cid}"]  # fmt: skip
    for provider in PROVIDER_JUNK:
        encoded = quote(provider, safe="-%;./")
        for route in routes:
            m.add(f"provider {provider[:30]!r} on {route[:30]}", f"{route}?provider={encoded}")
    for query in ("provider=openai&provider=azure", "provider[]=openai", "provider", "=", "&&&",
                  "%", "%zz=1", "provider=%00", "limit=-1", "limit=1000000000000000000000",
                  "limit=abc&after=" + "x" * 500, "order=sideways", "after=%00", "provider=" + "fz" * 3000,
                  "a=" + "b" * 9000, "provider=openai#frag", "provider=op%0d%0aX-Injected:%201"):  # fmt: skip
        for route in routes[:3]:
            m.add(f"query {query[:40]!r} on {route[:30]}", f"{route}?{query}")
    m.add("raw unicode query", f"/openai/v1/containers/{cid}?provider=é".encode())
    m.add("raw space-split query", f"/openai/v1/containers/{cid}?provider=open ai".encode())


def header_cases(m: Maker) -> None:
    secret = m.secret
    auth = lambda s: (b"Authorization", f"Bearer {s}".encode())  # noqa: E731
    bad_values = [
        b"\x00",
        b"\x01",
        b"\x7f",
        b"\x1b[31m",
        b"\x80\xff",
        b"\xc3\xa9",
        b"\t",
        b"\x0b",
        b"\x0c",
    ]
    for bad in bad_values:
        m.add(f"bad char {bad!r} in Authorization", credential=False,
              headers=[(b"Authorization", f"Bearer {secret()}".encode() + bad + b"x")])  # fmt: skip
        m.add(f"bad char {bad!r} in x-api-key", credential=False,
              headers=[(b"x-api-key", secret().encode() + bad)])  # fmt: skip
        m.add(f"bad char {bad!r} in another header", headers=[(b"X-Custom", b"a" + bad + b"b")])
    for name in (b"Auth orization", b"Authorization ", b"X(y)", b"X@y", b"", b"X\x00", b"\xc3\xa9t\xc3\xa9",
                 b"X:Y", b"[x]", b"x\ty"):  # fmt: skip
        m.add(f"bad header name {name!r}", headers=[(name, f"Bearer {secret()}".encode())])
    for size in (4000, 8100, 8200, 9000, 20000):
        m.add(f"long Authorization ({size})", credential=False,
              headers=[(b"Authorization", f"Bearer {secret()}".encode() + b"A" * size)])  # fmt: skip
        m.add(f"long other header ({size})", headers=[(b"X-Long", b"v" * size)])
    for count in (90, 101, 128, 300, 2000):
        m.add(f"{count} headers", headers=[(f"X-H{i}".encode(), b"1") for i in range(count)])
    m.add("CRLF injection: header line inside a value", credential=False,
          headers=[(b"X-Note", b"a\r\nAuthorization: Bearer " + secret().encode())])  # fmt: skip
    m.add("bare CR inside Authorization", credential=False,
          headers=[(b"Authorization", b"Bearer " + secret().encode() + b"\rX-Injected: 1")])  # fmt: skip
    m.add("bare LF inside Authorization", credential=False,
          headers=[(b"Authorization", b"Bearer " + secret().encode() + b"\nX-Injected: 1")])  # fmt: skip
    m.add("CR LF CR LF inside a value (request smuggling)", credential=False,
          headers=[(b"X-Note", b"a\r\n\r\nGET /metrics HTTP/1.1\r\nAuthorization: Bearer " + secret().encode())])  # fmt: skip
    m.add("obs-fold after Authorization", credential=False,
          headers=[(b"Authorization", b"Bearer " + secret().encode() + b"\r\n folded")])  # fmt: skip
    m.add("obs-fold with a tab", credential=False,
          headers=[(b"x-api-key", secret().encode() + b"\r\n\tcontinued")])  # fmt: skip
    m.add("obs-fold as the first header", credential=False,
          headers=[(b" leading", b"space"), auth(secret())])  # fmt: skip
    for value in (b"-1", b"abc", b"5, 6", b"+5", b" 5", b"99999999999999999999", b"0x10"):
        m.add(f"Content-Length {value!r}", headers=[(b"Content-Length", value)])
    m.add("two different Content-Length", headers=[(b"Content-Length", b"0"), (b"Content-Length", b"5")],
          body=b"")  # fmt: skip
    m.add("Content-Length and Transfer-Encoding", headers=[(b"Content-Length", b"3"),
          (b"Transfer-Encoding", b"chunked")])  # fmt: skip
    for te in (b"chunked, gzip", b"xchunked", b"identity", b"chunked\x00"):
        m.add(f"Transfer-Encoding {te!r}", headers=[(b"Transfer-Encoding", te)])
    m.add("bad chunk size", method="POST", target="/openai/v1/containers",
          headers=[(b"Transfer-Encoding", b"chunked")], raw=None)  # fmt: skip
    m.cases[-1].data = m.cases[-1].data + b"zz\r\nabc\r\n0\r\n\r\n"
    for cc in (b"max-age=-1", b"max-age=99999999999999999999999", b"no-cache, no-store, only-if-cached",
               b"max-stale=abc", b"min-fresh=1e309", b"\xc3\xa9", b"max-age=1, max-age=2", b"=",
               b",,,", b"only-if-cached"):  # fmt: skip
        m.add(f"Cache-Control {cc!r}", headers=[(b"Cache-Control", cc)])
    for name, value in ((b"x-bf-cache-threshold", b"nan"), (b"x-bf-cache-threshold", b"-inf"),
                        (b"x-bf-cache-threshold", b"1e309"), (b"x-bf-cache-threshold", b"abc"),
                        (b"x-bf-cache-ttl", b"-5s"), (b"x-bf-cache-ttl", b"1h1h1h"),
                        (b"x-bf-cache-ttl", b"99999999999999999h"), (b"x-bf-cache-ttl", b"\xc3\xa9"),
                        (b"x-bf-cache-type", b"semantic"), (b"x-bf-cache-type", b"fz"),
                        (b"x-bf-cache-no-store", b"TRUE"), (b"Pragma", b"no-cache, fz")):  # fmt: skip
        m.add(f"{name.decode()}: {value!r}", headers=[(name, value)])
    m.add("no Host", raw=b"GET /openai/v1/containers/" + m.cid().encode() + b" HTTP/1.1\r\n"
          + b": ".join(auth(secret())) + b"\r\nConnection: close\r\n\r\n")  # fmt: skip
    m.add("two Hosts", headers=[(b"Host", b"evil.example")])
    m.add("Host with junk", headers=[(b"Host", b"a b\x01c")])
    m.add("Expect: 100-continue", method="POST", target="/openai/v1/containers",
          headers=[(b"Expect", b"100-continue"), (b"Content-Type", b"application/json")],
          body=b'{"name":"fz"}')  # fmt: skip
    m.add("Upgrade: websocket", headers=[(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")],
          close=False)  # fmt: skip
    m.add("Upgrade: h2c", headers=[(b"Connection", b"Upgrade, HTTP2-Settings"), (b"Upgrade", b"h2c"),
          (b"HTTP2-Settings", b"AAMAAABkAARAAAAAAAIAAAAA")], close=False)  # fmt: skip
    for value in (b"Basic Zm9vOmJhcg==", b"Bearer", b"Bearer ", b"bearer " + secret().encode(),
                  b"Bearer  " + secret().encode() + b"  ", b"Token " + secret().encode(),
                  b"Bearer " + secret().encode() + b" extra words"):  # fmt: skip
        m.add(
            f"Authorization {value[:20]!r}", credential=False, headers=[(b"Authorization", value)]
        )


def credential_cases(m: Maker) -> None:
    """Duplicated and conflicting credential headers, on every kind of route."""
    cid = m.containers[0]
    targets = [
        ("GET", f"/openai/v1/containers/{cid}"), ("GET", f"/v1/containers/{cid}?provider=openai"),
        ("GET", "/openai/v1/containers"), ("GET", "/openai/containers?limit=3"),
        ("POST", "/openai/v1/containers"), ("DELETE", "/openai/v1/containers/cntr_fuzz_absent"),
        ("GET", f"/openai/v1/containers/{cid}/files"), ("GET", "/api/cache/stats"),
    ]  # fmt: skip
    for method, target in targets:
        for header in CRED_HEADERS:
            first, second = m.credential(header), m.credential(header)
            spelled = (second[0].upper(), second[1])
            for label, pair in (
                ("same spelling", [first, second]),
                ("other case", [first, spelled]),
            ):
                body = b'{"name":"fz"}' if method == "POST" else b""
                extra = [(b"Content-Type", b"application/json")] if body else []
                m.add(f"{header} twice ({label}) on {method} {target[:30]}", target, method=method,
                      credential=False, headers=[*pair, *extra], body=body)  # fmt: skip
        mixed = [m.credential("Authorization"), m.credential("x-api-key"), m.credential("x-bf-vk")]
        m.add(f"three credential headers on {method} {target[:30]}", target, method=method,
              credential=False, headers=mixed)  # fmt: skip
        m.add(f"Authorization twice, one empty on {method} {target[:30]}", target, method=method,
              credential=False, headers=[(b"Authorization", b""), m.credential("Authorization")])  # fmt: skip


def method_cases(m: Maker) -> None:
    for method in ("BREW", "PROPFIND", "FOO", "get", "GeT", "HEAD", "OPTIONS", "PATCH", "PUT",
                   "TRACE", "DELETE", "POST", "A" * 100, "A" * 5000, "G@T", "GE\x00T", '"GET"',
                   "GET\t", "M-SEARCH", "QUERY", "\u00c9T", "1GET", "G/T"):  # fmt: skip
        for target in [*retrieve_targets(m)[:2], "/openai/v1/containers"]:
            m.add(f"method {method[:20]!r} on {target[:30]}", target, method=method)
    m.add("CONNECT authority-form", "127.0.0.1:443", method="CONNECT")
    m.add("OPTIONS *", "*", method="OPTIONS")
    m.add(
        "empty method",
        raw=b" /openai/v1/containers/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )


def request_line_cases(m: Maker) -> None:
    cid = m.containers[0]
    target = f"/openai/v1/containers/{cid}".encode()
    cred = b": ".join(m.credential())
    tail = b"\r\nHost: 127.0.0.1\r\n" + cred + b"\r\nConnection: close\r\n\r\n"
    lines = [
        b"GET " + target, b"GET " + target + b" HTTP/1.0", b"GET " + target + b" HTTP/2.0",
        b"GET " + target + b" HTTP/1.2", b"GET " + target + b" HTTP/9.9", b"GET " + target + b" http/1.1",
        b"GET " + target + b" HTTP/1.1 extra", b"GET  " + target + b"  HTTP/1.1", b"GET\t" + target + b"\tHTTP/1.1",
        b"GET http://127.0.0.1" + target + b" HTTP/1.1", b"GET http://evil.example" + target + b" HTTP/1.1",
        b"GET https://127.0.0.1:1" + target + b" HTTP/1.1", b"GET 127.0.0.1:80 HTTP/1.1", b"GET * HTTP/1.1",
        b"GET  HTTP/1.1", b"GET openai/v1/containers/x HTTP/1.1", b"GET http:// HTTP/1.1",
        b"GET http://[::1 HTTP/1.1", b"GET http://a:b:c/ HTTP/1.1", b"GET /\x00 HTTP/1.1",
        b"GET /" + b"a" * 9000 + b" HTTP/1.1", b"GET " + target + b" HTTP/1.1\x00", b"GET " + target + b" HTTP/",
        b"GET " + target + b" HTTP/1.1 ", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    ]  # fmt: skip
    for line in lines:
        m.add(f"request line {line[:50]!r}", raw=line + tail)
    m.add("leading empty lines", raw=b"\r\n\r\nGET " + target + b" HTTP/1.1" + tail)
    m.add(
        "LF line endings",
        raw=b"GET " + target + b" HTTP/1.1\nHost: a\n" + cred + b"\nConnection: close\n\n",
    )
    m.add("HTTP/2 preface", raw=b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    for _ in range(8):
        junk = bytes(m.rng.getrandbits(8) for _ in range(m.rng.randint(4, 200)))
        m.add(f"binary junk {junk[:16]!r}", raw=junk.replace(b"\r\n\r\n", b"") + b"\r\n\r\n")
    m.add("HTTP/1.0 without Host", raw=b"GET " + target + b" HTTP/1.0\r\n" + cred + b"\r\n\r\n")


def mutation_cases(m: Maker) -> None:
    """Valid requests with a few bytes replaced or inserted (never a line break, so the request
    stays framed)."""
    pool = b"\x00\x01\x7f\xff\x80 :%/\t\"'\\;,=?#@[]{}<>|^`~\xc3\xa9" + bytes(range(0x21, 0x7F))
    for i in range(60):
        target = m.rng.choice([*retrieve_targets(m), "/openai/v1/containers"]).encode()
        header = m.credential()
        extra = m.rng.choice(
            [b"Cache-Control: max-age=5", b"x-bf-cache-threshold: 0.5", b"Accept: */*"]
        )
        lines = [b"GET " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b": ".join(header), extra]
        for _ in range(m.rng.randint(1, 3)):
            row = m.rng.randrange(len(lines))
            line = bytearray(lines[row])
            at = m.rng.randrange(len(line) + 1)
            byte = bytes([m.rng.choice(pool)])
            if m.rng.random() < 0.5 and at < len(line):
                line[at : at + 1] = byte
            else:
                line[at:at] = byte
            lines[row] = bytes(line)
        raw = b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"
        m.add(f"mutation {i}: {lines[0][:40]!r}", raw=raw)


#: Every header the sidecar parses or reads: cache controls, credentials, trace context, body.
PARSED_HEADERS = sorted({*(str(name) for name in CONTROL_HEADERS), "cache-control", "pragma",
                         *(name.lower() for name in CRED_HEADERS), "x-bf-direct-key", "x-bf-api-key",
                         "x-bf-eh-openai-organization", "traceparent", "tracestate", "content-type",
                         "accept-encoding", "x-bf-send-back-raw-response"})  # fmt: skip
#: 8 KB values built to trip a backtracking parser: long runs of what a pattern repeats, ended by
#: what makes it fail (as tests/sidecar/test_hostile_input.py feeds each parser directly).
HOSTILE_UNITS = ("1", "1.", "0", ".", "e1", "1s", "1.5h", "a=", '"', '\\"', ",", "=", " ", "-",
                 "sk-", "bearer ", "00-", "@", "max-age=1,", "no-cache ")  # fmt: skip
HOSTILE_ENDINGS = ("", "x", "!", '"', ".", "e", "_")
ODD_QUERIES = ("provider=openai%23x", "%23", "%23=provider", "provider=%2523", "provider=%25xx",
               "provider=%2541zure", "provider=openai&provider=azure",
               "provider=azure&provider=openai", "provider=openai&provider=openai", "provider=%zz",
               "limit=5%23&after=%25", "provider=" + "%25" * 2000)  # fmt: skip
ODD_METHODS = ("BREW", "PATCH", "PUT", "OPTIONS", "TRACE", "HEAD", "get", "DELETE", "POST")
ADMIN_TOKEN = SIDECAR_SECRETS["SIDECAR_ADMIN_TOKEN"]


def every_route(m: Maker) -> list[tuple[str, str]]:
    """(method, target) of every route the sidecar has, and of some it does not: deletes aim at
    ids nobody has, so that the upstream's state stays as the other cases expect."""
    cid, absent = m.containers[0], "cntr_fuzz_absent"
    routes = []
    for prefix in ("/openai/v1", "/openai", "/v1"):
        query = "?provider=openai" if prefix == "/v1" else ""
        base = f"{prefix}/containers"
        routes += [("GET", f"{base}/{cid}{query}"), ("GET", base + query), ("POST", base + query),
                   ("DELETE", f"{base}/{absent}{query}"), ("GET", f"{base}/{cid}/files{query}"),
                   ("POST", f"{base}/{cid}/files{query}"),
                   ("GET", f"{base}/{cid}/files/cfile_fuzz{query}"),
                   ("GET", f"{base}/{cid}/files/cfile_fuzz/content{query}"),
                   ("DELETE", f"{base}/{cid}/files/cfile_fuzz_absent{query}")]  # fmt: skip
    routes += [("GET", "/metrics"), ("GET", "/healthz"), ("HEAD", "/healthz"), ("GET", "/readyz"),
               ("HEAD", "/readyz"), ("GET", "/api/cache/stats"),
               ("DELETE", "/api/cache/clear/00000000-0000-4000-8000-000000000000"),
               ("DELETE", f"/api/cache/clear-by-key/{absent}"), ("GET", "/nowhere"),
               ("POST", "/v1/chat/completions"), ("GET", "/openai/v1/models"), ("GET", "/v1/files"),
               ("GET", f"/openai/v1/containers/{cid}/nowhere")]  # fmt: skip
    return routes


def hostile(m: Maker) -> bytes:
    """One 8 KB value of a run and an ending that make a backtracking pattern fail."""
    unit, end = m.rng.choice(HOSTILE_UNITS), m.rng.choice(HOSTILE_ENDINGS)
    return ((unit * (8000 // len(unit) + 1))[: 8000 - len(end)] + end).encode()


def with_query(target: str, query: str) -> str:
    return target + ("&" if "?" in target else "?") + query


def route_cases(m: Maker) -> None:
    """Every route under malformed and duplicated headers, hostile values of every header the
    sidecar parses, odd queries and every method."""
    for method, target in every_route(m):
        route_variants(m, method, target)
    # A hundred 8 KB lines of one control header: each read once, or refused whole.
    cid = m.containers[0]
    lines = [(b"x-bf-cache-threshold", b"1" * 7999 + b"x")] * 100
    for target in (f"/openai/v1/containers/{cid}", "/openai/v1/containers"):
        m.add(f"100 hostile x-bf-cache-threshold lines on {target[:40]}", target, headers=lines)


def route_variants(m: Maker, method: str, target: str) -> None:
    """The cases of one route."""
    where = f"{method} {target[:48]}"
    body, extra = b"", []
    if method == "POST":
        creates = target.endswith(("/containers", "=openai"))
        body = b'{"name":"fz"}' if creates else b'{"file_id":"file_fuzz"}'
        extra = [(b"Content-Type", b"application/json")]

    def add(name: str, **kwargs: Any) -> None:
        kwargs.setdefault("method", method)
        kwargs.setdefault("body", body)
        kwargs["headers"] = [*extra, *kwargs.get("headers", [])]
        m.add(f"{name} on {where}", kwargs.pop("target", target), **kwargs)

    add("plain")
    add("no credential", credential=False)
    add("the admin token", credential=False,
        headers=[(b"Authorization", f"Bearer {ADMIN_TOKEN}".encode())])  # fmt: skip
    add("Authorization twice", credential=False,
        headers=[m.credential("Authorization"), m.credential("Authorization")])  # fmt: skip
    add("Authorization and x-api-key", credential=False,
        headers=[m.credential("Authorization"), m.credential("x-api-key")])  # fmt: skip
    add("empty Authorization", credential=False, headers=[(b"Authorization", b"")])
    add("control byte in Authorization", credential=False,
        headers=[(b"Authorization", b"Bearer " + m.secret().encode() + b"\x01")])  # fmt: skip
    add("space in a header name", headers=[(b"Cache Control", b"no-cache")])
    add("Cache-Control twice", headers=[(b"Cache-Control", b"max-age=1"),
                                        (b"Cache-Control", b"no-cache, only-if-cached")])  # fmt: skip
    add("Content-Length junk", headers=[(b"Content-Length", b"12abc")], body=b"")
    identity = {h.lower() for h in CRED_HEADERS}
    for name in PARSED_HEADERS:
        value = hostile(m)
        if name == "authorization" and m.rng.random() < 0.5:
            value = b"Bearer " + value
        # A hostile credential is the request's only one; other headers come with a valid one.
        alone = name in identity or name.startswith("x-bf-")
        add(f"8 KB {name}: {value[:6]!r}...{value[-2:]!r}", credential=not alone,
            headers=[(name.encode(), value)])  # fmt: skip
    for query in ODD_QUERIES:
        add(f"query {query[:30]!r}", target=with_query(target, query))
    for odd in ODD_METHODS:
        if odd != method:
            add(f"method {odd}", method=odd, body=b"")


CATEGORIES: dict[str, Callable[[Maker], None]] = {
    "paths": path_cases,
    "queries": query_cases,
    "headers": header_cases,
    "credentials": credential_cases,
    "methods": method_cases,
    "request-lines": request_line_cases,
    "mutations": mutation_cases,
}


# -- sending and judging ---------------------------------------------------------------------------


@dataclass
class Reply:
    status: int | None
    headers: dict[str, str]
    body: bytes
    problem: str = ""


def send(port: int, case: Case) -> Reply:
    """Send the bytes as they are; read one HTTP response."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=3)
    with sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(case.data)
        try:
            start = sock.recv(80, socket.MSG_PEEK)
        except OSError as exc:
            return Reply(None, {}, b"", f"no answer: {type(exc).__name__}: {exc}")
        if not start:
            return Reply(None, {}, b"", "closed the connection without an answer")
        response = http.client.HTTPResponse(sock, method="HEAD" if case.method == "HEAD" else "GET")
        try:
            response.begin()
            body = response.read()
        except (http.client.HTTPException, OSError) as exc:
            return Reply(None, {}, b"", f"not HTTP: {type(exc).__name__}, answer {start!r}")
        finally:
            response.close()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, body)


@dataclass
class Verdicts:
    """What went wrong, per case; and how many errors were the sidecar's own, how many relayed."""

    problems: list[tuple[str, str]] = field(default_factory=list)
    own_errors: int = 0
    relayed_errors: int = 0

    def add(self, case: Case, problem: str) -> None:
        self.problems.append((case.name, problem))

    def summary(self) -> str:
        """Counts by kind, then up to four examples of each kind."""
        by_kind: dict[str, list[str]] = {}
        for name, problem in self.problems:
            by_kind.setdefault(re.sub(r" *[(].*", "", problem), []).append(f"{name}: {problem}")
        lines = [f"{len(self.problems)} problems ({self.own_errors} errors of the sidecar's own, "
                 f"{self.relayed_errors} relayed): "
                 + ", ".join(f"{kind} x{len(rows)}" for kind, rows in by_kind.items())]  # fmt: skip
        for rows in by_kind.values():
            lines += [f"  {row[:300]}" for row in rows[:4]]
        return "\n".join(lines)


def judge(case: Case, reply: Reply, upstream: list[tuple[int, bytes]], verdicts: Verdicts) -> None:
    """One answer. ``upstream``: the answers the upstream made while the case ran."""
    if reply.status is None:
        verdicts.add(case, f"no HTTP answer ({reply.problem})")
        return
    relayed = (reply.status, reply.body) in upstream
    if reply.status == 500:
        verdicts.add(case, f"500 ({'relayed' if relayed else 'own'}: {reply.body[:160]!r})")
    if b"Traceback" in reply.body:
        verdicts.add(case, f"traceback in the answer ({reply.body[:160]!r})")
    # 505 is the answer RFC 9110 (15.6.6) gives a request in a version the server does not
    # speak (HTTP/2.0 over an HTTP/1 connection), as Go's server (the gateway) answers it.
    prescribed = (reply.status == 504 and case.only_if_cached) or reply.status == 505
    if reply.status >= 500 and not relayed and not prescribed:
        verdicts.add(case, f"5xx for client input ({reply.status}: {reply.body[:160]!r})")
    if MARKER.encode() in reply.body:
        verdicts.add(case, "credential echoed in the answer's body")
    if reply.status < 400:
        return
    if relayed:
        verdicts.relayed_errors += 1
    else:
        verdicts.own_errors += 1
    if case.method == "HEAD":  # no body to judge; still JSON, as the GET's would be
        if not relayed and "json" not in reply.headers.get("content-type", ""):
            verdicts.add(
                case, f"error not JSON ({reply.status} {reply.headers.get('content-type')})"
            )
        return
    if "json" not in reply.headers.get("content-type", ""):
        verdicts.add(case, f"error not JSON ({reply.status} {reply.headers.get('content-type')}: "
                           f"{reply.body[:120]!r})")  # fmt: skip
        return
    try:
        document = json.loads(reply.body)
    except ValueError:
        verdicts.add(case, f"error body does not parse as JSON ({reply.body[:120]!r})")
        return
    error = document.get("error") if isinstance(document, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        verdicts.add(case, f"error without error.message ({reply.body[:160]!r})")
    elif not relayed:
        gateway_shape(case, reply.status, document, verdicts)


def gateway_shape(case: Case, status: int, document: dict[str, Any], verdicts: Verdicts) -> None:
    """The gateway's ``BifrostError``: ``is_bifrost_error``, ``status_code`` if given equal to
    the HTTP status, ``error`` fields as strings, ``extra_fields`` an object."""
    error = document["error"]
    if not isinstance(document.get("is_bifrost_error"), bool):
        verdicts.add(case, f"error without is_bifrost_error ({json.dumps(document)[:160]})")
    if document.get("status_code", status) != status:
        verdicts.add(case, f"status_code {document.get('status_code')} on an HTTP {status}")
    odd = {k: v for k, v in error.items() if v is not None and not isinstance(v, (str, int))}
    if odd:
        verdicts.add(case, f"error fields not strings ({odd!r:.160})")
    if not isinstance(document.get("extra_fields", {}), dict):
        verdicts.add(case, f"extra_fields not an object ({json.dumps(document)[:160]})")


def judge_log(case: Case, text: str, verdicts: Verdicts) -> None:
    lines = text.splitlines()
    for at, line in enumerate(lines):
        if "Traceback" in line:
            rest = [row for row in lines[at + 1 :] if row and not row.startswith(" ")]
            verdicts.add(case, f"traceback in the log ({rest[0][:160] if rest else line[:160]})")
    for line in text.splitlines():
        if MARKER in line:
            verdicts.add(case, f"credential in the log ({line.strip()[:200]!r})")


def run_cases(stack: Stack, cases: list[Case]) -> Verdicts:
    """Send each case on its own connection and judge its answer and its log lines."""
    verdicts = Verdicts()
    stack.new_log()
    stack.tap.take()
    for case in cases:
        reply = send(stack.sidecar_port, case)
        judge(case, reply, stack.tap.take(), verdicts)
        judge_log(case, stack.new_log(settle_s=0.02), verdicts)
        assert stack.sidecar.poll() is None, f"the sidecar died on {case.name}: {case.data[:200]!r}"
    # Kept: the last access-log lines may still be on their way; no event says none is.
    time.sleep(0.2)
    judge_log(cases[-1], stack.new_log(), verdicts)
    return verdicts


@pytest.mark.parametrize("category", list(CATEGORIES))
def test_whatever_a_client_sends_the_answer_is_gateway_shaped_and_the_log_clean(
    stack: Stack, category: str
) -> None:
    maker = Maker(random.Random(f"{SEED}:{category}"), stack.containers)
    CATEGORIES[category](maker)
    verdicts = run_cases(stack, maker.cases)
    assert not verdicts.problems, f"{category}: {len(maker.cases)} cases\n{verdicts.summary()}"
    assert verdicts.own_errors > 0, "no error of the sidecar's own was judged"


@pytest.fixture(scope="module")
def openai_stack(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The same stack, the sidecar straight against OpenAI (the emulator's ``/v1`` face)."""
    with run_stack(redis_server, tmp_path_factory.mktemp("fuzz-openai"), "openai") as running:
        yield running


@pytest.mark.parametrize("kind", ["bifrost", "openai"])
def test_every_route_answers_its_own_errors_in_the_gateway_shape(
    request: pytest.FixtureRequest, kind: str
) -> None:
    running: Stack = request.getfixturevalue("stack" if kind == "bifrost" else "openai_stack")
    maker = Maker(random.Random(f"{SEED}:routes:{kind}"), running.containers)
    route_cases(maker)
    verdicts = run_cases(running, maker.cases)
    assert not verdicts.problems, f"routes ({kind}): {len(maker.cases)} cases\n{verdicts.summary()}"
    assert verdicts.own_errors > 0, "no error of the sidecar's own was judged"


def test_metric_labels_come_from_closed_sets_whatever_clients_sent(stack: Stack) -> None:
    """After the fuzzing above: no label value was taken from a request."""
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection("127.0.0.1", stack.sidecar_port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    values: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for name, value in sample.labels.items():
                values.setdefault(name, set()).add(value)
    problems = []
    unknown = values.get("provider", set()) - PROVIDERS - {"other"}
    if unknown:
        problems.append(f"provider labels from client input: {sorted(v[:40] for v in unknown)[:10]} "
                        f"({len(unknown)} values)")  # fmt: skip
    for name, seen in values.items():
        odd = {v for v in seen if "fz" in v or not v.isprintable() or len(v) > 80}
        if odd:
            problems.append(f"{name} labels from client input: {sorted(v[:40] for v in odd)[:5]}")
        if len(seen) > 40:
            problems.append(f"{name} has {len(seen)} values: not a closed set")
    assert not problems, "\n".join(problems)


def test_redis_keys_come_from_closed_sets_whatever_clients_sent(
    stack: Stack, openai_stack: Stack, redis_server: RedisServer
) -> None:
    """After the fuzzing above: no Redis key, and no member of the refresh index, names a
    provider a client made up (none of them is one the upstream has)."""
    client = redis_server.client()
    problems = []
    for kind in ("bifrost", "openai"):
        prefix = f"fuzz-{kind}:"
        for raw in client.scan_iter(match=prefix + "*", count=1000):
            # Per-container keys are hashed (``{tag}``): only the others could name anything.
            kind_of, _, named = raw.decode("utf-8", "replace").removeprefix(prefix).partition(":")
            closed = named in PROVIDERS if kind_of in ("backoff", "sem") else (
                kind_of.startswith("{") or kind_of in ("changes", "stats", "due", "queue"))  # fmt: skip
            if not closed:
                problems.append(f"key {raw[:80]!r}")
        for raw in cast("list[bytes]", client.zrange(prefix + "due", 0, -1)):
            provider = raw.decode("utf-8", "replace").partition("/")[0]
            if provider not in PROVIDERS:
                problems.append(f"refresh index member {raw[:80]!r}")
    client.close()
    assert not problems, f"{len(problems)} keys from client input: {problems[:10]}"
