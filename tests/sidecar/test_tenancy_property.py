"""Tenancy under random operations: the sidecar never shows a credential what the upstream
would refuse it.

Hypothesis drives list, create, delete and retrieve through two sidecar replicas (one keeping
local copies, one not) on a real Redis, with single, duplicated and mixed credential headers,
revocations, pauses that make entries stale, and real arq workers draining the refresh queue
with a service credential of one project. The oracle is the emulator itself, asked directly
with the same credential headers: a 200 from the sidecar must be a 200 from the upstream for
the same container, and never a container of another project.

Some steps run several operations at once (deletes through the pass-through, lists that seed
the cache, retrieves with cache controls, by credentials of the owner's and another project),
the upstream's answers to reads held back on their way (``Holdback``) so that a fill made
before a delete arrives after it: once a DELETE has been answered
2xx, nothing is served from the cache for that container again, whatever was under way. A
newcomer's look at a container another project has cached reads like its look at an id nobody
has (``Cache-Status`` modulo ``stored``).

Run time is set by the ``tenancy-ci`` profile (derandomized, about 30-40 s on two busy cores);
``TENANCY_PROFILE=tenancy-deep`` explores more (random seed, several minutes).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import threading
import time
from collections.abc import Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    multiple,
    rule,
    run_state_machine_as_test,
)
from yarl import URL

from emulator import EMULATOR_STATE, EmulatorConfig, create_emulator_app
from sidecar.app import create_app
from sidecar.runner import SidecarRunner
from sidecar.settings import Settings, load_settings
from tests.conftest import RedisServer
from tests.support import background_idle, wait_for
from tests.worker.conftest import run_worker_burst

T = TypeVar("T")

# Projects of the emulated upstream. The service credential (what the workers refresh with)
# belongs to alpha, as a real deployment's would belong to one project.
ALPHA = ("sk-bf-prop-alpha-1", "sk-bf-prop-alpha-2")
BETA = ("sk-bf-prop-beta-1", "sk-bf-prop-beta-2")
GAMMA = ("sk-bf-prop-gamma-1",)
SERVICE_KEY = "sk-bf-prop-service"
STRANGER = "sk-bf-prop-stranger"  # in no configured project: a project of its own
# Never used through the sidecar: they tell the test which project owns a container.
PROBES = {
    "alpha": "sk-bf-prop-alpha-probe",
    "beta": "sk-bf-prop-beta-probe",
    "gamma": "sk-bf-prop-gamma-probe",
    "stranger": STRANGER,
}
PROJECT_OF = {
    **dict.fromkeys((*ALPHA, SERVICE_KEY, PROBES["alpha"]), "alpha"),
    **dict.fromkeys((*BETA, PROBES["beta"]), "beta"),
    **dict.fromkeys((*GAMMA, PROBES["gamma"]), "gamma"),
    STRANGER: "stranger",
}
CALLER_KEYS = (*ALPHA, *BETA, *GAMMA, STRANGER)
REVOCABLE = (ALPHA[1], BETA[1])

FRESH_TTL_S = 0.15
GRANT_TTL_S = 0.6
# README: a credential keeps what it was granted for SIDECAR_GRANT_TTL_S; a revoked key may be
# served from cache that long after its revocation, and not a moment (plus scheduling) longer.
REVOCATION_GRACE_S = GRANT_TTL_S + 0.25

# The gateway's credential headers, spelled as clients spell them.
SPELLINGS = {
    "authorization": ("Authorization", "authorization", "AUTHORIZATION"),
    "x-api-key": ("x-api-key", "X-Api-Key"),
    "x-goog-api-key": ("x-goog-api-key", "X-Goog-Api-Key"),
    "x-bf-vk": ("x-bf-vk", "X-BF-VK"),
}
#: Every spelling of every credential header, Authorization most often (as clients send it).
ALL_SPELLINGS = (*SPELLINGS["authorization"], *(s for v in SPELLINGS.values() for s in v))
#: What a cache may serve: stale (any age, or up to 10 minutes), from the cache only, or never.
CACHE_CONTROLS = (None, None, "max-stale", "max-stale=600", "only-if-cached",
                  "only-if-cached, max-stale=600", "no-cache")  # fmt: skip
#: The strongest ask for anything stored: a deleted container must not come back even so.
ANYTHING_STORED = "only-if-cached, max-stale=600"
RETRIEVE_ROUTES = (
    "/openai/v1/containers/{cid}",
    "/openai/containers/{cid}",
    "/v1/containers/{cid}?provider=openai",
)
PREFIXES = ("/openai/v1", "/openai")

settings.register_profile(
    "tenancy-ci",
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    derandomize=True,
    database=None,
    # No shrinking: a failing run of real processes replays slowly; the failure message lists
    # the operations that led to it instead.
    phases=(Phase.explicit, Phase.generate),
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "tenancy-deep",
    max_examples=300,
    stateful_step_count=30,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile(os.environ.get("TENANCY_PROFILE", "tenancy-ci"))

Credential = tuple[tuple[str, str], ...]
"""A request's credential headers as (spelling, key) pairs, in the order they are sent."""


def header_value(spelling: str, key: str) -> str:
    return f"Bearer {key}" if spelling.lower() == "authorization" else key


def wire_headers(credential: Credential) -> list[tuple[str, str]]:
    return [(spelling, header_value(spelling, key)) for spelling, key in credential]


def describe(credential: Credential) -> str:
    return " + ".join(f"{spelling}: {key}" for spelling, key in credential)


def is_duplicated(credential: Credential) -> bool:
    names = [spelling.lower() for spelling, _ in credential]
    return len(names) != len(set(names))


def is_conflicting(credential: Credential) -> bool:
    """Two credential headers naming different keys (the same header twice, or two headers)."""
    return len({key for _, key in credential}) > 1


# -- the pieces, served from an event loop of their own ----------------------------------------


@dataclass
class Answer:
    status: int
    body: Any
    raw: bytes
    headers: dict[str, str] = field(default_factory=dict)
    """Lower-case names."""


_CONNECTIONS: dict[str, http.client.HTTPConnection] = {}


def close_connections() -> None:
    while _CONNECTIONS:
        _CONNECTIONS.popitem()[1].close()


def request(
    base: str,
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | None = None,
) -> Answer:
    """One HTTP/1.1 request with http.client, which sends repeated headers as given (aiohttp's
    client merges them), on a kept-alive connection per server."""
    conn = _CONNECTIONS.get(base)
    if conn is None:
        parts = urlsplit(base)
        conn = _CONNECTIONS[base] = http.client.HTTPConnection(
            parts.hostname or "", parts.port, timeout=10
        )
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        raw = response.read()
    except (OSError, http.client.HTTPException):
        conn.close()  # the next request opens a new connection
        raise
    if response.will_close:
        conn.close()
    try:
        document = json.loads(raw) if raw else None
    except ValueError:
        document = None
    names = {name.lower(): value for name, value in response.getheaders()}
    return Answer(response.status, document, raw, names)


@dataclass
class Call:
    """One operation of a concurrent step, as sent; what it was, for the checks and the trail."""

    kind: str  # "delete", "list" or "retrieve"
    replica: str
    target: str
    credential: Credential
    delay_s: float
    cache_control: str | None = None

    @property
    def method(self) -> str:
        return "DELETE" if self.kind == "delete" else "GET"


@dataclass
class Timed:
    """A concurrent call's answer, with when it was sent and when its answer was read."""

    call: Call
    answer: Answer
    started: float
    ended: float


_HOP_BY_HOP = frozenset({"host", "connection", "keep-alive", "content-length", "transfer-encoding"})


class Holdback:
    """Between the sidecars and the emulator: the upstream's answers to reads (lists and
    retrieves) are held back ``hold_s`` after the emulator made them, so that an answer made
    before a delete reaches the sidecar after it (a fill that began before the delete)."""

    def __init__(self, target: str, session: aiohttp.ClientSession) -> None:
        self.target = target
        self.session = session
        self.hold_s = 0.0

    async def forward(self, request: web.Request) -> web.Response:
        """Relay one request as it came; hold a read's answer back."""
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP]
        body = await request.read()
        url = URL(self.target + request.raw_path, encoded=True)
        async with self.session.request(request.method, url, headers=headers, data=body or None,
                                        allow_redirects=False) as upstream:  # fmt: skip
            raw = await upstream.read()
            status = upstream.status
            relayed = [(k, v) for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP]
        if request.method == "GET" and self.hold_s:
            await asyncio.sleep(self.hold_s)
        return web.Response(body=raw, status=status, headers=relayed)


#: A server stops within milliseconds; longer means a request of its own is stuck.
STOP_WITHIN_S = 20.0


def pending_tasks() -> str:
    """The running loop's tasks, each with the chain of coroutines it is waiting in."""
    lines = []
    for task in asyncio.all_tasks():
        chain: list[str] = []
        awaiting: Any = task.get_coro()
        while awaiting is not None and len(chain) < 12:
            frame = getattr(awaiting, "cr_frame", None) or getattr(awaiting, "gi_frame", None)
            if frame is None:
                chain.append(type(awaiting).__name__)
                break
            chain.append(f"{frame.f_code.co_qualname}:{frame.f_lineno}")
            awaiting = getattr(awaiting, "cr_await", None) or getattr(
                awaiting, "gi_yieldfrom", None
            )
        lines.append(" > ".join(chain))
    return "\n  ".join(["", *sorted(lines)])


class World:
    """The emulator, two sidecars and Redis, run in a background event loop.

    Hypothesis rules are synchronous: they make their requests with http.client from the test's
    thread, and hand lifecycle work (start, stop, revoke, a worker burst) to the loop here.
    """

    def __init__(self, redis: RedisServer) -> None:
        self.redis = redis
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners: list[web.AppRunner] = []
        self.emulator_app: web.Application | None = None
        self.emulator_url = ""
        self.sidecars: dict[str, str] = {}
        self.apps: list[web.Application] = []
        self.settings: Settings | None = None
        self.session: aiohttp.ClientSession | None = None
        self.holdback: Holdback | None = None

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def reset(self) -> None:
        """Fresh emulator state, empty Redis, new sidecars."""
        close_connections()
        self.run(self._stop())
        self.redis.client().flushall()
        self.run(self._start())

    def close(self) -> None:
        close_connections()
        try:
            self.run(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    async def _serve(self, app: web.Application) -> str:
        runner = SidecarRunner(app, access_log=None)  # production's: hits take the hit lane
        await runner.setup()
        self.runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    async def _start(self) -> None:
        config = EmulatorConfig(
            projects=(
                (*ALPHA, SERVICE_KEY, PROBES["alpha"]),
                (*BETA, PROBES["beta"]),
                (*GAMMA, PROBES["gamma"]),
            )
        )
        self.emulator_app = create_emulator_app(config)
        self.emulator_url = await self._serve(self.emulator_app)
        self.session = aiohttp.ClientSession(auto_decompress=False)
        self.holdback = Holdback(self.emulator_url, self.session)
        relay = web.Application()
        relay.router.add_route("*", "/{tail:.*}", self.holdback.forward)
        upstream_url = await self._serve(relay)
        common: dict[str, Any] = {
            "upstream_kind": "bifrost",
            "upstream_url": upstream_url,
            "redis_url": self.redis.url,
            "key_secret": "tenancy-property-secret",
            "key_prefix": "prop",
            "service_api_key": SERVICE_KEY,
            "queue_name": "prop:queue",
            "fresh_ttl_s": FRESH_TTL_S,
            "max_stale_s": 30.0,
            "grant_ttl_s": GRANT_TTL_S,
            "negative_ttl_s": 0.5,
            "refresh_lead_s": 0.05,
            "upstream_timeout_s": 2.0,
            "worker_metrics_port": 0,
        }
        self.settings = load_settings({}, **common)
        # Deletes go through "local", which drops its own copy at once; "shared" keeps no
        # copies, so no answer depends on how fast a change announcement travels (README,
        # "Known limits": a copy elsewhere may live up to SIDECAR_LOCAL_TTL_S).
        self.apps = [
            create_app(self.settings),
            create_app(load_settings({}, **common, local_ttl_s=0)),
        ]
        self.sidecars = {
            "local": await self._serve(self.apps[0]),
            "shared": await self._serve(self.apps[1]),
        }

    async def _stop(self) -> None:
        while self.runners:
            runner = self.runners.pop()
            cleanup = asyncio.ensure_future(runner.cleanup())
            if not (await asyncio.wait({cleanup}, timeout=STOP_WITHIN_S))[0]:
                raise AssertionError(f"a server did not stop within {STOP_WITHIN_S}s (it waits "
                                     f"for requests in progress): {pending_tasks()}")  # fmt: skip
        if self.session is not None:
            await self.session.close()

    def gather(self, calls: Sequence[Call], hold_ms: float) -> list[Timed]:
        """Send ``calls`` at once (each after its delay), the upstream's answers to reads held
        back ``hold_ms``, so that what one call starts another overlaps."""
        assert self.holdback is not None
        holdback = self.holdback

        async def gather() -> list[Timed]:
            holdback.hold_s = hold_ms / 1000
            try:
                # A session per step: the sidecars' ports change when the world is reset.
                async with aiohttp.ClientSession() as session:
                    return await asyncio.gather(*(self._timed(session, call) for call in calls))
            finally:
                holdback.hold_s = 0.0

        return self.run(gather())

    async def _timed(self, session: aiohttp.ClientSession, call: Call) -> Timed:
        await asyncio.sleep(call.delay_s)
        headers = wire_headers(call.credential)
        if call.cache_control:
            headers.append(("Cache-Control", call.cache_control))
        started = time.monotonic()
        async with session.request(call.method, self.sidecars[call.replica] + call.target,
                                   headers=headers) as response:  # fmt: skip
            raw = await response.read()
            ended = time.monotonic()
        try:
            document = json.loads(raw) if raw else None
        except ValueError:
            document = None
        names = {name.lower(): value for name, value in response.headers.items()}
        return Timed(call, Answer(response.status, document, raw, names), started, ended)

    # Operations on the pieces.

    def emulator_calls(self) -> int:
        stats = request(self.emulator_url, "GET", "/_emulator/stats").body
        return int(stats["total"])

    def revoke(self, key: str) -> None:
        assert self.emulator_app is not None
        state = self.emulator_app[EMULATOR_STATE]

        async def revoke() -> None:
            state.revoke_key(key)

        self.run(revoke())

    def refresh(self) -> None:
        """A real arq worker drains the refresh jobs the sidecars have queued (once the
        enqueues their reads set going in the background have run)."""
        assert self.settings is not None
        self.run(wait_for(lambda: all(background_idle(app) for app in self.apps)))
        self.run(run_worker_burst(self.settings))

    def container_keys(self) -> set[bytes]:
        """Every per-container key in Redis (records, grants, negatives, locks)."""
        return set(self.redis.client().scan_iter(match="prop:{*", count=1000))

    def owner(self, cid: str) -> str | None:
        """The project whose key the upstream answers 200 for this container, if any."""
        for project, probe in PROBES.items():
            answer = request(self.emulator_url, "GET", f"/openai/v1/containers/{cid}",
                             [("Authorization", f"Bearer {probe}")])  # fmt: skip
            if answer.status == 200:
                return project
        return None


@pytest.fixture(scope="module")
def world(redis_server: RedisServer) -> Iterator[World]:
    running = World(redis_server)
    try:
        running.reset()
        yield running
    finally:
        running.close()


# -- strategies ----------------------------------------------------------------------------------

keys = st.sampled_from(CALLER_KEYS)
# Most clients send Authorization; the other headers are exercised less often.
names = st.sampled_from(("authorization", "authorization", "authorization", *sorted(SPELLINGS)[1:]))
single = st.tuples(names, keys).flatmap(
    lambda nk: st.sampled_from(SPELLINGS[nk[0]]).map(lambda spelling: ((spelling, nk[1]),))
)
duplicated = st.tuples(names, keys, keys).flatmap(
    lambda nkk: st.tuples(st.sampled_from(SPELLINGS[nkk[0]]), st.sampled_from(SPELLINGS[nkk[0]]))
    .map(lambda ss: ((ss[0], nkk[1]), (ss[1], nkk[2])))
)  # fmt: skip
mixed = st.tuples(st.lists(names, min_size=2, max_size=2, unique=True), keys, keys).map(
    lambda n: ((SPELLINGS[n[0][0]][0], n[1]), (SPELLINGS[n[0][1]][0], n[2]))
)
credentials = st.one_of(single, single, duplicated, mixed)
replicas = st.sampled_from(("local", "shared"))

# Concurrent steps: who calls is drawn relative to the container (a key of its owner's project,
# or of another), resolved when the step runs.
Who = tuple[str, int, str]
"""(``owner`` or ``other``, which key of that side, the header's spelling)."""
whos = st.tuples(
    st.sampled_from(("owner", "owner", "other")), st.integers(0, 7), st.sampled_from(ALL_SPELLINGS)
)
delays = st.sampled_from((0.0, 0.0, 0.01, 0.03, 0.08))
#: The container API's routes a concurrent step deletes and lists by (the native /v1 one too).
DELETE_ROUTES = (*(f"{prefix}/containers/{{cid}}" for prefix in PREFIXES),
                 "/v1/containers/{cid}?provider=openai")  # fmt: skip
LIST_ROUTES = (*(f"{prefix}/containers?limit=100" for prefix in PREFIXES),
               "/v1/containers?provider=openai&limit=100")  # fmt: skip
deleters = st.tuples(whos, st.sampled_from(DELETE_ROUTES), delays)
readers = st.tuples(whos, replicas, st.sampled_from(RETRIEVE_ROUTES), st.sampled_from(CACHE_CONTROLS),
                    delays)  # fmt: skip
listers = st.tuples(whos, replicas, st.sampled_from(LIST_ROUTES), delays)


# -- the machine -------------------------------------------------------------------------------


@dataclass
class Model:
    """What the test knows: container owners, deletions, revocations."""

    owners: dict[str, str] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    revoked_at: dict[str, float] = field(default_factory=dict)
    newcomers: int = 0
    upstream_failed: bool = False
    """A call of the sidecar's to the upstream failed (timed out): shielding is expected."""
    """Credentials made up so far, each a project of its own that never asked anything."""

    def in_grace(self, key: str) -> bool:
        """A revoked key may still be served from cache: within its grant's lifetime."""
        revoked = self.revoked_at.get(key)
        return revoked is not None and time.monotonic() - revoked < REVOCATION_GRACE_S


class TenancyMachine(RuleBasedStateMachine):
    """Random operations through the sidecars; every answer is checked against the upstream's."""

    world: World  # set by the test before the run

    containers = Bundle("containers")

    def __init__(self) -> None:
        super().__init__()
        self.world.reset()
        self.model = Model()
        self.trail: list[str] = []
        self.seen: set[tuple[str, str]] = set()
        """Every (header, key) that has reached a sidecar: audited against every container."""

    def note(self, line: str, credential: Credential = ()) -> None:
        self.trail.append(line)
        self.seen.update((spelling.lower(), key) for spelling, key in credential)

    def fail(self, message: str) -> None:
        trail = "\n  ".join(self.trail[-24:])
        raise AssertionError(f"{message}\n  last operations:\n  {trail}")

    def sidecar(self, replica: str) -> str:
        return self.world.sidecars[replica]

    # Containers.

    @initialize(target=containers)
    def some_containers(self) -> Any:
        """Two containers per project, made on the upstream directly (the sidecars never saw them)."""
        made = []
        for project in ("alpha", "beta", "gamma", "stranger"):
            for _ in range(2):
                answer = request(self.world.emulator_url, "POST", "/v1/containers",
                                 [("Authorization", f"Bearer {PROBES[project]}")],
                                 b'{"name": "property"}')  # fmt: skip
                assert answer.status == 200, answer.raw
                self.model.owners[answer.body["id"]] = project
                made.append(answer.body["id"])
        return multiple(*made)

    @rule(target=containers, credential=credentials, replica=replicas,
          prefix=st.sampled_from(PREFIXES))  # fmt: skip
    def create(self, credential: Credential, replica: str, prefix: str) -> Any:
        answer = request(self.sidecar(replica), "POST", f"{prefix}/containers",
                         wire_headers(credential), b'{"name": "property"}')  # fmt: skip
        self.note(
            f"create via {replica} {prefix} [{describe(credential)}] -> {answer.status}", credential
        )
        if answer.status != 200:
            # The bundle grows by one either way: hypothesis replays draws, not outcomes.
            return "cntr_never_created"
        cid = answer.body["id"]
        owner = self.world.owner(cid)
        assert owner is not None, f"created {cid} but no project sees it"
        self.model.owners[cid] = owner
        self.check_projects(f"create answered container {cid}", owner, credential)
        self.audit(((spelling.lower(), key) for spelling, key in credential), replica)
        return cid

    @rule(cid=containers, credential=credentials, prefix=st.sampled_from(PREFIXES))
    def delete(self, cid: str, credential: Credential, prefix: str) -> None:
        answer = request(self.sidecar("local"), "DELETE", f"{prefix}/containers/{cid}",
                         wire_headers(credential))  # fmt: skip
        self.note(f"delete {cid} via local [{describe(credential)}] -> {answer.status}", credential)
        if answer.status == 200:
            self.check_projects(f"delete of {cid} succeeded", self.model.owners[cid], credential)
            self.model.deleted.add(cid)

    @rule(credential=credentials, replica=replicas, prefix=st.sampled_from(PREFIXES))
    def list_containers(self, credential: Credential, replica: str, prefix: str) -> None:
        answer = request(self.sidecar(replica), "GET", f"{prefix}/containers?limit=100",
                         wire_headers(credential))  # fmt: skip
        self.note(
            f"list via {replica} {prefix} [{describe(credential)}] -> {answer.status}", credential
        )
        if answer.status != 200:
            return
        for item in answer.body.get("data", []):
            owner = self.model.owners.get(item["id"]) or self.world.owner(item["id"])
            self.check_projects(f"list showed {item['id']}", owner, credential)
        self.audit(((spelling.lower(), key) for spelling, key in credential), replica)

    # Reads, checked against the upstream.

    @rule(
        cid=st.one_of(containers, st.just("cntr_never_created")),
        credential=credentials,
        replica=replicas,
        route=st.sampled_from(RETRIEVE_ROUTES),
        cache_control=st.sampled_from(CACHE_CONTROLS),
    )
    def retrieve(
        self, cid: str, credential: Credential, replica: str, route: str, cache_control: str | None
    ) -> None:
        answer = self.read(cid, credential, replica, route, cache_control)
        debug = ((answer.body or {}).get("extra_fields") or {}).get("cache_debug") or {}
        self.note(f"retrieve {cid} via {replica} {route.split('/{')[0]} {cache_control or ''} "
                  f"[{describe(credential)}] -> {answer.status} hit={debug.get('cache_hit')}",
                  credential)  # fmt: skip
        self.judge(cid, credential, answer)

    def teardown(self) -> None:
        self.audit(self.seen, "local")

    def audit(self, credentials: Iterable[tuple[str, str]], replica: str) -> None:
        """What the cache would show each of these credentials, for every container: a list or
        a create seeds the cache with what the upstream returned, for the caller that asked."""
        for name, key in sorted(set(credentials)):
            credential = ((name, key),)
            for cid in sorted(self.model.owners):
                answer = self.read(cid, credential, replica, RETRIEVE_ROUTES[0], ANYTHING_STORED)
                self.judge(cid, credential, answer, f"audit via {replica} of [{name}: {key}]: ")

    def read(
        self, cid: str, credential: Credential, replica: str, route: str, cache_control: str | None
    ) -> Answer:
        headers = wire_headers(credential)
        if cache_control:
            headers.append(("Cache-Control", cache_control))
        return request(self.sidecar(replica), "GET", route.format(cid=cid), headers)

    def judge(self, cid: str, credential: Credential, answer: Answer, context: str = "") -> None:
        """A 200 must be what the upstream answers one of the request's credentials."""
        self.check_scope(answer, context)
        if answer.status != 200:
            return
        debug = (answer.body.get("extra_fields") or {}).get("cache_debug") or {}
        if answer.body.get("id") != cid:
            self.fail(f"{context}asked for {cid}, answered container {answer.body.get('id')!r}")
        owner = self.model.owners.get(cid)
        self.check_projects(f"{context}retrieve answered {cid}", owner, credential)
        # The oracle: the upstream, asked with each presented credential on its own.
        verdicts = {}
        for spelling, key in credential:
            direct = request(self.world.emulator_url, "GET", f"/openai/v1/containers/{cid}",
                             [(spelling, header_value(spelling, key))])  # fmt: skip
            verdicts[key] = direct.status
        if any(status == 200 for status in verdicts.values()):
            return
        if all(self.model.in_grace(key) for key in verdicts):
            return  # revoked moments ago: its grant has not lapsed yet (documented)
        self.fail(
            f"{context}LEAK: the sidecar answered 200 with {cid} (project {owner}, "
            f"{'deleted' if cid in self.model.deleted else 'not deleted'}, cache_hit="
            f"{debug.get('cache_hit')}) to [{describe(credential)}], which the upstream "
            f"refuses: {verdicts}"
        )

    def check_scope(self, answer: Answer, context: str) -> None:
        """The upstream here never fails on its own: an error of the upstream's kind (5xx, 429)
        is another caller's answer leaking, unless a call of ours did time out on a loaded
        machine (then the upstream is shielded for everyone, as it should be)."""
        error = (answer.body or {}).get("error") if isinstance(answer.body, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        if answer.status in (502, 504) and code in ("upstream_timeout", "upstream_unavailable"):
            self.model.upstream_failed = True
            return
        expected = (answer.status == 504 and code == "only_if_cached") or (
            answer.status == 503 and code == "upstream_backing_off" and self.model.upstream_failed
        )
        if (answer.status >= 500 or answer.status == 429) and not expected:
            self.fail(f"{context}SCOPE: answered {answer.status} {answer.raw[:200]!r}, yet "
                          "the upstream never failed")  # fmt: skip

    def check_projects(self, what: str, owner: str | None, credential: Credential) -> None:
        """A container shown to a request belongs to the project of one of its credentials."""
        projects = {PROJECT_OF[key] for _, key in credential}
        if owner not in projects:
            self.fail(
                f"LEAK: {what}, a container of project {owner}, to [{describe(credential)}] "
                f"(projects {sorted(projects)})"
            )

    # Concurrent steps.

    def key_of(self, cid: str, who: Who) -> Credential:
        """The credential ``who`` names for a step on ``cid``."""
        side, index, spelling = who
        owner = self.model.owners.get(cid)
        mine = [key for key in CALLER_KEYS if PROJECT_OF[key] == owner]
        others = [key for key in CALLER_KEYS if PROJECT_OF[key] != owner]
        pool = mine if side == "owner" and mine else others
        return ((spelling, pool[index % len(pool)]),)

    @rule(
        cid=containers,
        deleter=st.one_of(st.none(), deleters),
        reads=st.lists(readers, min_size=1, max_size=4),
        lists=st.lists(listers, max_size=2),
        hold_ms=st.sampled_from((0, 20, 50)),
    )
    def interleave(
        self,
        cid: str,
        deleter: tuple[Who, str, float] | None,
        reads: list[tuple[Who, str, str, str | None, float]],
        lists: list[tuple[Who, str, str, float]],
        hold_ms: int,
    ) -> None:
        """A delete, lists and retrieves of one container at once; nothing deleted comes back."""
        calls = [Call("retrieve", replica, route.format(cid=cid), self.key_of(cid, who), delay,
                      cache_control)
                 for who, replica, route, cache_control, delay in reads]  # fmt: skip
        calls += [Call("list", replica, route, self.key_of(cid, who), delay)
                  for who, replica, route, delay in lists]  # fmt: skip
        if deleter is not None:
            who, route, delay = deleter
            # Through "local", which drops its own copy (see World._start).
            calls.append(Call("delete", "local", route.format(cid=cid), self.key_of(cid, who),
                              delay))  # fmt: skip
        deleted_before = cid in self.model.deleted
        self.note(f"step of {len(calls)} calls at once on {cid}, reads' answers held {hold_ms} ms:")
        timed = self.world.gather(calls, hold_ms)
        for one in sorted(timed, key=lambda t: t.started):
            call, answer = one.call, one.answer
            debug = ((answer.body or {}).get("extra_fields") or {}).get("cache_debug") or {}
            self.note(f"  [{one.started:.3f}-{one.ended:.3f}] {call.kind} {call.target} via "
                      f"{call.replica} {call.cache_control or ''} [{describe(call.credential)}] -> "
                      f"{answer.status} hit={debug.get('cache_hit')}", call.credential)  # fmt: skip
        deleted_at = min((one.ended for one in timed
                          if one.call.kind == "delete" and 200 <= one.answer.status < 300),
                         default=None)  # fmt: skip
        for one in timed:
            # Which interleavings ran (``--hypothesis-show-statistics``).
            when = (
                "no delete"
                if deleted_at is None
                else ("after the delete" if one.started > deleted_at else "during the delete")
            )
            event(f"concurrent {one.call.kind} {when}: {one.answer.status}")
            self.check_concurrent(cid, one, deleted_before, deleted_at)
        if deleted_at is not None:
            self.model.deleted.add(cid)
            self.check_gone(cid)

    def check_concurrent(
        self, cid: str, one: Timed, deleted_before: bool, deleted_at: float | None
    ) -> None:
        """What one call of a concurrent step may have been answered."""
        call, answer = one.call, one.answer
        what = f"{call.kind} {call.target} via {call.replica} {call.cache_control or ''}"
        self.check_scope(answer, f"{what}: ")
        if answer.status != 200:
            return
        if call.kind == "delete":
            self.check_projects(f"{what} succeeded", self.model.owners.get(cid), call.credential)
        elif call.kind == "list":
            for item in answer.body.get("data", []):
                owner = self.model.owners.get(item["id"]) or self.world.owner(item["id"])
                self.check_projects(f"{what} showed {item['id']}", owner, call.credential)
        elif deleted_before or (deleted_at is not None and one.started > deleted_at):
            debug = (answer.body.get("extra_fields") or {}).get("cache_debug") or {}
            self.fail(f"DELETED: {what} [{describe(call.credential)}] sent after {cid}'s DELETE "
                      f"was answered got 200, cache_hit={debug.get('cache_hit')}")  # fmt: skip
        elif deleted_at is not None:
            # Under way when the delete landed: the upstream may have answered it first.
            if answer.body.get("id") != cid:
                self.fail(f"{what}: answered container {answer.body.get('id')!r}")
            self.check_projects(f"{what} answered {cid}", self.model.owners.get(cid),
                                call.credential)  # fmt: skip
        else:
            self.judge(cid, call.credential, answer, f"{what}: ")

    def check_gone(self, cid: str) -> None:
        """After a DELETE answered 2xx: no credential, replica or cache control gets it back."""
        owner = self.model.owners.get(cid)
        askers = sorted({*(key for key in CALLER_KEYS if PROJECT_OF[key] == owner), BETA[0]})
        for replica in ("local", "shared"):
            for cache_control in (ANYTHING_STORED, "max-stale=600", None, "no-cache"):
                for key in askers:
                    credential = (("Authorization", key),)
                    answer = self.read(cid, credential, replica, RETRIEVE_ROUTES[0], cache_control)
                    self.check_scope(answer, f"after the delete of {cid}: ")
                    if answer.status == 200:
                        debug = (answer.body.get("extra_fields") or {}).get("cache_debug") or {}
                        self.fail(f"DELETED: {cid} served after its DELETE was answered, via "
                                  f"{replica} {cache_control} [{key}], cache_hit="
                                  f"{debug.get('cache_hit')}")  # fmt: skip

    @rule(
        cid=containers,
        replica=replicas,
        route=st.sampled_from(RETRIEVE_ROUTES),
        cache_control=st.sampled_from(CACHE_CONTROLS),
        spelling=st.sampled_from(ALL_SPELLINGS),
    )
    def newcomer(
        self, cid: str, replica: str, route: str, cache_control: str | None, spelling: str
    ) -> None:
        """Whether another project has a container cached does not show to a newcomer."""
        owner_keys = [key for key in CALLER_KEYS if PROJECT_OF[key] == self.model.owners.get(cid)]
        if owner_keys:  # its owner has it cached now (unless it is gone)
            self.read(cid, (("Authorization", owner_keys[0]),), replica, route, None)
        self.model.newcomers += 1
        serial = self.model.newcomers
        # A key the upstream has never seen is a project of its own (see the emulator).
        credential = ((spelling, f"sk-bf-prop-newcomer-{serial}"),)
        cached = self.read(cid, credential, replica, route, cache_control)
        unknown = self.read(f"cntr_never_seen_{serial}", credential, replica, route, cache_control)
        self.note(f"newcomer {serial} looks at {cid} via {replica} {cache_control or ''} -> "
                  f"{cached.status}; at a never-seen id -> {unknown.status}")  # fmt: skip
        self.judge(cid, credential, cached, "newcomer: ")
        seen = [(answer.status, self.cache_status(answer), self.error_said(answer, named))
                for answer, named in ((cached, cid), (unknown, f"cntr_never_seen_{serial}"))]  # fmt: skip
        if seen[0] != seen[1]:
            self.fail(f"SHOWS: a newcomer's look at {cid} (cached by project "
                      f"{self.model.owners.get(cid)}) reads {seen[0]}, at an id nobody has "
                      f"{seen[1]}")  # fmt: skip

    @staticmethod
    def error_said(answer: Answer, cid: str) -> tuple[object, ...] | None:
        """What an error answer says, the container id it names left out."""
        error = (answer.body or {}).get("error") if isinstance(answer.body, dict) else None
        if not isinstance(error, dict):
            return None
        message = str(error.get("message", "")).replace(cid, "<id>")
        return message, error.get("type"), error.get("code")

    @staticmethod
    def cache_status(answer: Answer) -> str | None:
        """An answer's Cache-Status, less ``stored`` (whether a negative was kept)."""
        value = answer.headers.get("cache-status")
        return None if value is None else re.sub(r";\s*stored\b", "", value)

    # Time, revocation and the workers.

    @rule(key=st.sampled_from(REVOCABLE))
    def revoke(self, key: str) -> None:
        if key in self.model.revoked_at:
            return
        self.world.revoke(key)
        self.model.revoked_at[key] = time.monotonic()
        self.note(f"revoke {key}")

    @rule(seconds=st.sampled_from((0.03, 0.16)))
    def wait(self, seconds: float) -> None:
        """Let entries go stale (fresh for 0.15 s), grants lapse and revocations take effect.
        Kept: real time for the model too (it notes revocations with time.monotonic)."""
        time.sleep(seconds)
        self.note(f"wait {seconds}s")

    @rule()
    def refresh(self) -> None:
        self.world.refresh()
        self.note("worker burst")


def test_no_credential_ever_sees_what_the_upstream_refuses_it(world: World) -> None:
    TenancyMachine.world = world
    run_state_machine_as_test(TenancyMachine, settings=PROFILE)


# -- duplicated and conflicting credential headers ------------------------------------------------

OPERATIONS = (
    ("GET", "/openai/v1/containers/{cid}"),
    ("GET", "/openai/containers/{cid}"),
    ("GET", "/v1/containers/{cid}?provider=openai"),
    ("GET", "/openai/v1/containers"),
    ("GET", "/openai/containers?limit=5"),
    ("POST", "/openai/v1/containers"),
    ("DELETE", "/openai/v1/containers/{cid}"),
    ("GET", "/openai/v1/containers/{cid}/files"),
)
same_header_twice = st.tuples(names, st.lists(keys, min_size=2, max_size=2, unique=True)).flatmap(
    lambda nk: st.tuples(st.sampled_from(SPELLINGS[nk[0]]), st.sampled_from(SPELLINGS[nk[0]]))
    .map(lambda ss: ((ss[0], nk[1][0]), (ss[1], nk[1][1])))
)  # fmt: skip
two_headers_two_keys = st.tuples(
    st.lists(names, min_size=2, max_size=2, unique=True),
    st.lists(keys, min_size=2, max_size=2, unique=True),
).map(lambda nk: ((SPELLINGS[nk[0][0]][0], nk[1][0]), (SPELLINGS[nk[0][1]][0], nk[1][1])))
CONFLICTS = {"same-header-twice": same_header_twice, "two-headers-two-keys": two_headers_two_keys}


@pytest.mark.parametrize("kind", sorted(CONFLICTS))
def test_duplicated_or_conflicting_credentials_are_refused_before_anything_is_forwarded(
    world: World, kind: str
) -> None:
    world.reset()
    owned: dict[str, str] = {}

    def container_of(project: str) -> str:
        """A container of ``project`` (made anew if an earlier example's request deleted it)."""
        if project not in owned or world.owner(owned[project]) != project:
            answer = request(world.emulator_url, "POST", "/v1/containers",
                             [("Authorization", f"Bearer {PROBES[project]}")], b'{"name": "dup"}')  # fmt: skip
            owned[project] = answer.body["id"]
        return owned[project]

    @settings(PROFILE, max_examples=40, stateful_step_count=1)
    @given(
        credential=CONFLICTS[kind],
        operation=st.sampled_from(OPERATIONS),
        project=st.sampled_from(("alpha", "beta")),
        replica=replicas,
    )
    def refused(
        credential: Credential, operation: tuple[str, str], project: str, replica: str
    ) -> None:
        method, route = operation
        cid = container_of(project)
        before_calls, before_keys = world.emulator_calls(), world.container_keys()
        body = b'{"name": "dup"}' if method == "POST" else None
        answer = request(world.sidecars[replica], method, route.format(cid=cid),
                         wire_headers(credential), body)  # fmt: skip
        where = f"{method} {route} [{describe(credential)}] -> {answer.status} {answer.raw[:300]!r}"
        assert answer.status == 400, f"not refused: {where}"
        assert isinstance(answer.body, dict), f"not JSON: {where}"
        assert answer.body.get("is_bifrost_error") is False, where
        assert isinstance((answer.body.get("error") or {}).get("message"), str), where
        assert world.emulator_calls() == before_calls, f"forwarded upstream: {where}"
        assert world.container_keys() == before_keys, f"cached something: {where}"
        assert world.owner(cid) == project, f"the container is gone: {where}"

    refused()
