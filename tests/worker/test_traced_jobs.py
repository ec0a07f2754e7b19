"""A refresh job's trace links to the request that enqueued it, through the real queue."""

from __future__ import annotations

from typing import Any

import aiohttp
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.conftest import Emulator
from tests.support import backdate, get, refresh_events, wait_for
from tests.worker.conftest import SERVICE_KEY, run_worker_burst

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


async def test_a_stale_reads_refresh_job_links_to_the_callers_trace(
    spans: InMemorySpanExporter,
    start_sidecar: Any,
    refresh_settings: Any,
    emulator: Emulator,
    http: aiohttp.ClientSession,
) -> None:
    settings = refresh_settings()
    sidecar = await start_sidecar(settings)
    cid = (await emulator.create(SERVICE_KEY))["id"]
    url = f"{sidecar.url}/openai/v1/containers/{cid}"
    auth = {"Authorization": f"Bearer {SERVICE_KEY}"}
    await get(http, url, auth)
    await backdate(settings, cid, 0.35)  # stale: the next read enqueues a refresh
    caller = {**auth, "traceparent": f"00-{TRACE_ID}-b7ad6b7169203331-01"}
    _, body, _ = await get(http, url, caller)
    assert body["extra_fields"]["cache_debug"]["cache_hit"] is True
    # The enqueue runs in the background of the request.
    await wait_for(lambda: refresh_events(sidecar.app, "enqueued") == 1)
    await run_worker_burst(settings)
    assert emulator.retrieves(cid) == 2
    job = next(span for span in spans.get_finished_spans() if span.name == "refresh_batch")
    assert job.parent is None  # a trace of its own...
    (link,) = job.links  # ...linked to the request's, which continued the caller's
    assert f"{link.context.trace_id:032x}" == TRACE_ID
    server = [s for s in spans.get_finished_spans() if s.context.trace_id == link.context.trace_id]
    assert any(s.context.span_id == link.context.span_id for s in server)
