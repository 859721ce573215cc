"""The delivery worker: claim due conversions, batch them per pixel, send to TikTok, record the outcome."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from bridge.enrich import Prepared, prepare
from bridge.logs import get_logger
from bridge.pacing import Pacer
from bridge.retry import HELD_PIXEL_RETRY, Backoff
from bridge.runtime import Runtime
from bridge.store import (
    DELIVERED,
    DELIVERED_DRY_RUN,
    EXPIRED,
    FAILED,
    PENDING,
    UNMATCHED,
    Outcome,
)
from bridge.tiktok import Answer, Kind, TikTokClient, build_payload

log = get_logger("bridge.worker")

# A claimed event is leased for this long; a crash (or a stuck cycle) makes it due again after it.
LEASE_SECONDS = 300.0
# After a wake-up, wait this long so events arriving in a burst share one request.
LINGER_SECONDS = 0.1
# Sleep at most this long when nothing is due, so a clock jump or a missed wake-up costs little.
IDLE_SECONDS = 1.0
# On SIGTERM, in-flight requests get this long to finish before their leases are released.
STOP_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class Item:
    row: Any  # sqlite3.Row of the conversion
    prepared: Prepared


class Worker:
    def __init__(
        self,
        runtime: Runtime,
        session: aiohttp.ClientSession,
        *,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.runtime = runtime
        self.session = session
        self.backoff = backoff or Backoff()
        self.clock = clock
        self.rand = rand
        self.pacers: dict[str, Pacer] = {}
        self.held_until: dict[str, float] = {}
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._in_flight: set[int] = set()

    # -- lifetime ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="delivery-worker")

    async def stop(self) -> None:
        """Let in-flight sends finish (briefly), release what was not finished, stop."""
        self._stopping.set()
        self.runtime.store.committed.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), STOP_GRACE_SECONDS)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        finally:
            self.runtime.worker_running = False
        if self._in_flight:
            await self.runtime.store.release_leases(sorted(self._in_flight))
            self._in_flight.clear()

    def pixel_changed(self, names: Sequence[str]) -> None:
        """A reload changed these pixels' tokens or codes: stop holding them."""
        for name in names:
            self.held_until.pop(name, None)

    async def _run(self) -> None:
        store = self.runtime.store
        self.runtime.worker_running = True
        try:
            while not self._stopping.is_set():
                store.committed.clear()
                try:
                    handled = await self.run_once()
                except Exception as exc:  # keep delivering: a bad cycle must not stop the worker
                    log.error("delivery cycle failed", error=repr(exc))
                    handled = 0
                    await self._sleep(IDLE_SECONDS)
                    continue
                if handled:
                    continue
                await self._idle()
        finally:
            self.runtime.worker_running = False

    async def _idle(self) -> None:
        store = self.runtime.store
        next_due = await store.next_due_at()
        timeout = IDLE_SECONDS
        if next_due is not None:
            timeout = min(IDLE_SECONDS, max(0.0, next_due - self.clock()))
        if timeout > 0:
            try:
                await asyncio.wait_for(store.committed.wait(), timeout)
            except TimeoutError:
                return
            await self._sleep(LINGER_SECONDS)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    # -- one cycle -----------------------------------------------------------------------------------

    async def run_once(self) -> int:
        """Claim what is due, deliver it, record the outcomes; returns how many events were handled."""
        runtime = self.runtime
        config = runtime.config
        settings = config.settings
        store = runtime.store
        now = self.clock()
        rows = await store.claim_due(now, settings.tiktok.batch_size * 4, LEASE_SECONDS)
        if not rows:
            return 0
        self._in_flight.update(row["id"] for row in rows)
        clicks = await store.clicks_for(row["click_id"] for row in rows)

        outcomes: list[Outcome] = []
        batches: dict[str, list[Item]] = defaultdict(list)
        for row in rows:
            prepared = prepare(row, clicks.get(row["click_id"]))
            keys = ",".join(prepared.match_keys)
            if now - row["event_time"] > settings.delivery.max_event_age:
                outcomes.append(
                    Outcome(
                        row["id"],
                        EXPIRED,
                        count_attempt=False,
                        match_keys=keys,
                        error="older than delivery.max_event_age",
                    )
                )
                continue
            pixel = config.pixel_name(prepared.pixel_ref or settings.default_pixel)
            if pixel is None:
                outcomes.append(
                    Outcome(
                        row["id"],
                        FAILED,
                        count_attempt=False,
                        match_keys=keys,
                        error=f"unknown pixel {prepared.pixel_ref!r}: not in the config's pixels",
                    )
                )
                continue
            if not prepared.match_keys:
                outcomes.append(
                    Outcome(row["id"], UNMATCHED, count_attempt=False, sent_pixel=pixel, match_keys="")
                )
                continue
            wait_until = max(self.held_until.get(pixel, 0.0), self._pacer(pixel).next_send_at(now))
            if wait_until > now + 0.05:
                outcomes.append(
                    Outcome(
                        row["id"],
                        PENDING,
                        next_attempt_at=wait_until,
                        count_attempt=False,
                        sent_pixel=pixel,
                        match_keys=keys,
                    )
                )
                continue
            batches[pixel].append(Item(row, prepared))

        sent = await asyncio.gather(*(self._deliver_pixel(pixel, items) for pixel, items in batches.items()))
        for pixel_outcomes in sent:
            outcomes.extend(pixel_outcomes)
        await store.apply(outcomes, self.clock())
        self._in_flight.difference_update(o.id for o in outcomes)
        for outcome in outcomes:
            if outcome.state != PENDING:
                runtime.metrics.delivered.labels(outcome.sent_pixel or "", outcome.state).inc()
        return len(rows)

    def _pacer(self, pixel: str) -> Pacer:
        if pixel not in self.pacers:
            self.pacers[pixel] = Pacer()
        return self.pacers[pixel]

    async def _deliver_pixel(self, pixel: str, items: list[Item]) -> list[Outcome]:
        size = self.runtime.config.settings.tiktok.batch_size
        outcomes: list[Outcome] = []
        for start in range(0, len(items), size):
            outcomes.extend(await self._send(pixel, items[start : start + size]))
        return outcomes

    async def _send(self, pixel: str, items: list[Item]) -> list[Outcome]:
        runtime = self.runtime
        settings = runtime.config.settings
        pixel_config = runtime.config.pixel(pixel)
        payload = build_payload(
            pixel_config.code,
            [item.prepared.event for item in items],
            settings.tiktok.partner_name or None,
            pixel_config.test_event_code or None,
        )
        runtime.metrics.batch_size.observe(len(items))
        if settings.tiktok.dry_run:
            log.info("dry run: batch not sent", pixel=pixel, events=len(items), payload=payload)
            return [self._finished(item, DELIVERED_DRY_RUN, pixel) for item in items]

        pacer = self._pacer(pixel)
        started = self.clock()
        pacer.sent(started)
        client = TikTokClient(self.session, settings.tiktok.endpoint, settings.tiktok.timeout)
        loop_started = time.monotonic()
        answer = await client.send(pixel_config.access_token, payload)
        runtime.metrics.latency.labels(pixel).observe(time.monotonic() - loop_started)
        runtime.metrics.attempts.labels(pixel, _code_label(answer)).inc()
        now = self.clock()
        log.info(
            "batch",
            pixel=pixel,
            events=len(items),
            result=answer.kind.value,
            code=answer.code,
            http_status=answer.http_status,
            request_id=answer.request_id,
            message=answer.message if answer.kind is not Kind.DELIVERED else None,
        )
        if answer.kind is Kind.DELIVERED:
            pacer.on_success()
            await self._set_health(pixel, True, answer, now)
            return [self._finished(item, DELIVERED, pixel, answer) for item in items]
        if answer.kind is Kind.RATE_LIMITED:
            pacer.on_rate_limited()
            retry_at = max(pacer.next_send_at(now), now + 1.0)
            return [self._retry(item, pixel, answer, retry_at, count=False) for item in items]
        if answer.kind is Kind.AUTH:
            self.held_until[pixel] = now + HELD_PIXEL_RETRY
            await self._set_health(pixel, False, answer, now)
            log.error(
                "pixel held: TikTok refused its access token or rights; events stay pending",
                pixel=pixel,
                code=answer.code,
                message=answer.message,
                retry_in=HELD_PIXEL_RETRY,
            )
            return [self._retry(item, pixel, answer, now + HELD_PIXEL_RETRY, count=False) for item in items]
        if answer.kind is Kind.BAD_REQUEST:
            if len(items) == 1:
                return [self._finished(items[0], FAILED, pixel, answer)]
            # One bad event fails the whole batch: bisect until the bad ones stand alone.
            middle = len(items) // 2
            return [*await self._send(pixel, items[:middle]), *await self._send(pixel, items[middle:])]
        return [self._transient(item, pixel, answer, now) for item in items]

    def _finished(self, item: Item, state: str, pixel: str, answer: Answer | None = None) -> Outcome:
        return Outcome(
            item.row["id"],
            state,
            count_attempt=state != DELIVERED_DRY_RUN,
            sent_pixel=pixel,
            code=answer.code if answer else None,
            error=answer.message if answer and state == FAILED else None,
            request_id=answer.request_id if answer else None,
            match_keys=",".join(item.prepared.match_keys),
        )

    def _retry(self, item: Item, pixel: str, answer: Answer, at: float, *, count: bool) -> Outcome:
        return Outcome(
            item.row["id"],
            PENDING,
            next_attempt_at=at,
            count_attempt=count,
            sent_pixel=pixel,
            code=answer.code,
            error=answer.message,
            match_keys=",".join(item.prepared.match_keys),
        )

    def _transient(self, item: Item, pixel: str, answer: Answer, now: float) -> Outcome:
        attempts = item.row["attempts"] + 1
        if attempts >= self.runtime.config.settings.delivery.max_attempts:
            outcome = self._finished(item, FAILED, pixel, answer)
            return Outcome(
                **{**outcome.__dict__, "error": f"gave up after {attempts} attempts: {answer.message}"}
            )
        return self._retry(item, pixel, answer, now + self.backoff.delay(attempts, self.rand()), count=True)

    async def _set_health(self, pixel: str, healthy: bool, answer: Answer, now: float) -> None:
        health = self.runtime.pixel_health(pixel)
        self.runtime.metrics.pixel_healthy.labels(pixel).set(1 if healthy else 0)
        if health.healthy == healthy and healthy:
            return
        if healthy:
            log.info("pixel healthy again: delivering held events", pixel=pixel)
        health.healthy = healthy
        health.last_code = answer.code
        health.last_error = None if healthy else answer.message
        health.since = now
        await self.runtime.store.set_pixel_status(pixel, healthy, answer.code, health.last_error, now)


def _code_label(answer: Answer) -> str:
    if answer.code is not None:
        return str(answer.code)
    if answer.http_status is not None:
        return f"http_{answer.http_status}"
    return "timeout" if "timeout" in answer.message.lower() else "error"


def describe(payload: dict[str, Any]) -> str:
    return json.dumps(payload, indent=2, sort_keys=True)
