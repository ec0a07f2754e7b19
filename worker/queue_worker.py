"""arq's worker, made to ride out Redis outages and to hold its jobs on short, renewed leases.

Two things about ``arq.Worker`` do not suit a fleet of refresh workers:

- Its main loop lets the first Redis error out (a failed poll, heart beat or health record), so
  the process exits when Redis restarts. Here a failed poll is an outage: logged once when it
  starts and once when it ends, retried after a back-off (0.1 s doubling to 2 s), never fatal.
- A started job holds a lease (arq's in-progress key) for the longest job timeout plus 10 s, so
  a job whose worker died waits that long to run again. Here the lease is ``lease_s`` (3 s),
  renewed every third of it while the job runs: a dead worker's jobs run again within seconds.

It also takes at most ``max_batches`` refresh-ahead batches at a time, leaving the rest to the
other workers, so that one worker does not sit on a whole tick's worth of renewals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import Any

from arq.connections import create_pool, log_redis_info
from arq.constants import in_progress_key_prefix
from arq.utils import poll, timestamp_ms
from arq.worker import Worker
from redis.exceptions import ResponseError, WatchError

from sidecar.queue import BATCH_JOB_PREFIX
from sidecar.store import REDIS_ERRORS

__all__ = ["LEASE_S", "Outage", "QueueWorker", "QuietJobStarts"]

log = logging.getLogger(__name__)

LEASE_S = 3.0


class Outage:
    """An outage of something the worker needs: logged once when it starts and once when it
    ends; the delay before each retry doubles from ``base_s`` to ``cap_s``."""

    def __init__(self, what: str, base_s: float = 0.1, cap_s: float = 2.0) -> None:
        self._what = what
        self._base_s = base_s
        self._cap_s = cap_s
        self._since: float | None = None
        self._delay_s = base_s

    @property
    def ongoing(self) -> bool:
        """True from a failure until the next success."""
        return self._since is not None

    def failed(self, exc: BaseException) -> float:
        """Note a failure; how long to wait before trying again."""
        if self._since is None:
            self._since = time.monotonic()
            self._delay_s = self._base_s
            log.warning("%s unreachable (%s: %s): waiting for it, jobs resume when it is back",
                        self._what, type(exc).__name__, exc)  # fmt: skip
            return self._delay_s
        self._delay_s = min(self._cap_s, self._delay_s * 2)
        return self._delay_s

    def recovered(self) -> None:
        """Note a success; the end of an outage is logged."""
        if self._since is not None:
            log.info("%s reachable again after %.1fs", self._what, time.monotonic() - self._since)
            self._since = None


class QuietJobStarts(logging.Filter):
    """Drops arq's job-start lines (``→ job(...)``): the end line says what happened and how
    long it took, one line a job. Kept at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a job-start line, unless DEBUG logging is on."""
        if record.levelno == logging.INFO and str(record.msg).startswith("%6.2fs → "):
            return logging.getLogger("worker").isEnabledFor(logging.DEBUG)
        return True


class QueueWorker(Worker):
    """``arq.Worker`` that survives Redis outages and holds short leases on its jobs."""

    def __init__(self, *args: Any, lease_s: float = LEASE_S, max_batches: int = 8, **kw: Any):
        super().__init__(*args, **kw)
        self.in_progress_timeout_s = lease_s
        self.max_batches = max_batches
        self.outage = Outage("refresh queue (redis)")

    async def main(self) -> None:
        """Connect (waiting for Redis if need be), start up, then poll for jobs until stopped."""
        while self._pool is None:
            assert self.redis_settings is not None
            try:
                self._pool = await create_pool(
                    self.redis_settings,
                    retry=self.redis_settings.conn_retries,  # one try: the waiting is ours
                    job_deserializer=self.job_deserializer,
                    job_serializer=self.job_serializer,
                    default_queue_name=self.queue_name,
                    expires_extra_ms=self.expires_extra_ms,
                )
            except REDIS_ERRORS as exc:
                await asyncio.sleep(self.outage.failed(exc))
        self.outage.recovered()
        logging.getLogger("arq.worker").info(
            "Starting worker for %d functions: %s", len(self.functions), ", ".join(self.functions)
        )
        with contextlib.suppress(*REDIS_ERRORS):
            await log_redis_info(self.pool, logging.getLogger("arq.worker").info)
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        leases = asyncio.ensure_future(self._hold_leases())
        try:
            async for _ in poll(self.poll_delay_s):
                await self._poll_iteration()
                if self.burst and await self._burst_done():
                    return
        finally:
            leases.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await leases

    async def _burst_done(self) -> bool:
        if 0 <= self.max_burst_jobs <= self._jobs_started():
            await asyncio.gather(*self.tasks.values())
            return True
        try:
            queued = await self.pool.zcard(self.queue_name)
        except REDIS_ERRORS:
            return False
        if queued == 0:
            await asyncio.gather(*self.tasks.values())
            return True
        return False

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except REDIS_ERRORS as exc:
            await asyncio.sleep(self.outage.failed(exc))
        else:
            self.outage.recovered()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's, but a Redis error cannot leak a job slot, a job running here is not started
        again, and batches are capped."""
        batches = self._batches()
        for raw_id in job_ids:
            job_id = raw_id.decode()
            batch = job_id.startswith(BATCH_JOB_PREFIX)
            if batch and batches >= self.max_batches:
                continue  # for another worker, or for this one once a batch is done
            running = self.tasks.get(job_id)
            if running is not None and not running.done():
                continue
            await self.sem.acquire()
            if self.job_counter >= self.max_jobs:
                self.sem.release()
                return
            self.job_counter += 1
            try:
                score = await self._lease(job_id)
            except BaseException:
                self._release_sem_dec_counter_on_complete()
                raise
            if score is None:
                self._release_sem_dec_counter_on_complete()
                continue
            task = self.loop.create_task(self.run_job(job_id, score))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task
            batches += batch

    def _batches(self) -> int:
        return sum(
            1 for job_id, task in self.tasks.items()
            if job_id.startswith(BATCH_JOB_PREFIX) and not task.done()
        )  # fmt: skip

    async def _lease(self, job_id: str) -> int | None:
        """Take the job's lease; its score, or None if it runs elsewhere or is not due."""
        key = in_progress_key_prefix + job_id
        async with self.pool.pipeline(transaction=True) as pipe:
            await pipe.watch(key)
            running = await pipe.exists(key)
            score = await pipe.zscore(self.queue_name, job_id)
            if running or not score or score > timestamp_ms():
                return None
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.psetex(key, int(self.in_progress_timeout_s * 1000), b"1")
            try:
                await pipe.execute()
            except (ResponseError, WatchError):
                return None
        return int(score)

    async def _hold_leases(self) -> None:
        """Renew the leases of the jobs running here, every third of a lease."""
        lease_ms = int(self.in_progress_timeout_s * 1000)
        while True:
            await asyncio.sleep(self.in_progress_timeout_s / 3)
            running = [job_id for job_id, task in self.tasks.items() if not task.done()]
            if not running:
                continue
            with contextlib.suppress(*REDIS_ERRORS):
                async with self.pool.pipeline(transaction=False) as pipe:
                    for job_id in running:
                        pipe.pexpire(in_progress_key_prefix + job_id, lease_ms)
                    await pipe.execute()

    async def run_job(self, job_id: str, score: int) -> None:
        """arq's; a Redis error around the job ends it quietly (its lease lapses, and it runs
        again elsewhere) instead of reaching the poll loop."""
        try:
            await super().run_job(job_id, score)
        except REDIS_ERRORS as exc:
            log.debug("job %s could not be finished: %s: %s", job_id, type(exc).__name__, exc)

    async def close(self) -> None:
        """arq's, bounded: a Redis that is down or hung does not hold up the exit."""
        if not self._handle_signals:
            self.handle_sig(signal.SIGUSR1)
        if not self._pool:
            return
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        with contextlib.suppress(*REDIS_ERRORS, asyncio.TimeoutError):
            await asyncio.wait_for(self.pool.delete(self.health_check_key), 1.0)
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        with contextlib.suppress(*REDIS_ERRORS):
            await self.pool.aclose(close_connection_pool=True)
        self._pool = None
