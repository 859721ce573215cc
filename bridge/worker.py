"""The delivery worker: claim due conversions, batch them per pixel, send to TikTok, record the outcome."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from bridge.enrich import pixel_refs
from bridge.logs import get_logger
from bridge.pacing import Pacer
from bridge.retry import FIX_HELD, FIX_UNCONFIGURED, HELD_PIXEL_RETRY, RECOVERY_PROBE, Backoff
from bridge.runtime import PixelHealth, Runtime
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

# A claimed event is leased (in memory) for this long: a cycle that failed to record its answers makes
# it due again after it, a restart at once.
LEASE_SECONDS = 300.0
# After a wake-up, wait this long so events arriving in a burst share one request.
LINGER_SECONDS = 0.1
# Sleep at most this long when nothing is due, so a clock jump or a missed wake-up costs little.
IDLE_SECONDS = 1.0
# On SIGTERM, in-flight requests get this long to finish before their leases are released.
STOP_GRACE_SECONDS = 5.0
# A pacing or hold deadline this close is treated as reached (the clock moves while a cycle runs).
GATE_SLACK_SECONDS = 0.05
# Once it has judged an event, a split goes on within one cycle for this long at most: the rest of the
# batch is due again at once, and the next cycle (other pixels' events with it) carries on with it.
SPLIT_BUDGET_SECONDS = 10.0
# A claimed event: a row of bridge.enrich.events_sql (its JSON text, match keys, pixel candidates).
Item = sqlite3.Row

# This many transient answers in a row, without a success between, mean TikTok (or the way to it)
# was down rather than one batch being unlucky: the first success then sends everything waiting.
OUTAGE_FAILURES = 2


@dataclass
class Outage:
    """A pixel whose last request failed transiently."""

    failures: int = 0  # consecutive transient answers
    probe_at: float = 0.0  # when to probe with a waiting event if nothing was sent to the pixel since
    retry_at: float = 0.0  # no request to the pixel before this (probes excepted: it is <= probe_at)


@dataclass
class Split:
    """A batch being split to find the event(s) TikTok refused it for."""

    since: float  # time.monotonic() at the first refusal
    judged: int = 0  # events delivered or failed since


class Worker:
    def __init__(
        self,
        runtime: Runtime,
        session: aiohttp.ClientSession,
        *,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        stop_grace: float = STOP_GRACE_SECONDS,
        split_budget: float = SPLIT_BUDGET_SECONDS,
    ) -> None:
        self.runtime = runtime
        self.session = session
        self.backoff = backoff or Backoff()
        self.clock = clock
        self.rand = rand
        self.stop_grace = stop_grace
        self.split_budget = split_budget
        self.pacers: dict[str, Pacer] = {}
        # Python-side state here is a cache of what TikTok last said, never the truth about events:
        # a restart forgets it and every event simply follows its own schedule in the database.
        self.held_until: dict[str, float] = {}
        self.outages: dict[str, Outage] = {}
        # Events brought forward as an outage probe, and when they were due by their own schedule:
        # a failed probe neither uses up one of their attempts nor moves that schedule.
        self._probes: dict[int, float] = {}
        self._health_loaded = False
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # A cycle's claimed rows and outcomes, from its send until the database has recorded them.
        self._unrecorded: tuple[list[Item], list[Outcome]] | None = None
        # Pixels a reload changed since the cycle began (pixel_changed): see _after_reload.
        self._reloaded: set[str] = set()

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
            await asyncio.wait_for(asyncio.shield(self._task), self.stop_grace)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        finally:
            self.runtime.worker_running = False
        if self._unrecorded is not None:
            try:
                await self._record(*self._unrecorded)
            except Exception as exc:  # they stay pending: sent again after the restart (same event_id)
                log.error(
                    "answers from TikTok not recorded at shutdown",
                    events=len(self._unrecorded[1]),
                    error=repr(exc),
                )
        self.runtime.store.release()  # what is still claimed is due again: only this worker claims

    def pixel_changed(self, names: Sequence[str]) -> None:
        """A reload changed these pixels' tokens or codes: stop holding them."""
        for name in names:
            self.held_until.pop(name, None)
            self.outages.pop(name, None)
        self._reloaded.update(names)

    async def _run(self) -> None:
        store = self.runtime.store
        self.runtime.worker_running = True
        try:
            while not self._stopping.is_set():
                store.committed.clear()
                try:
                    handled = await self.run_once()
                    if handled:
                        # Less than a full request's worth was due: let more arrive before the next
                        # claim, or under steady load every cycle would send the few events of the last.
                        if handled < self.runtime.config.settings.tiktok.batch_size:
                            await self._sleep(LINGER_SECONDS)
                        continue
                    await self._idle()
                except Exception as exc:  # keep delivering: a bad cycle (or idle query) must not stop it
                    log.error("delivery cycle failed", error=repr(exc))
                    await self._sleep(IDLE_SECONDS)
        finally:
            self.runtime.worker_running = False

    async def _idle(self) -> None:
        store = self.runtime.store
        next_due = await store.next_due_at()
        timeout = IDLE_SECONDS
        # A due time already past while the last cycle claimed nothing belongs to a leased event
        # (a failed cycle's lease runs out later): waiting 0 s here would spin until it does.
        if next_due is not None and next_due > self.clock():
            timeout = min(IDLE_SECONDS, next_due - self.clock())
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
        store = self.runtime.store
        settings = self.runtime.config.settings
        if not self._health_loaded:
            await self._load_health()
        if self._unrecorded is not None:
            # The last cycle sent these but the database refused their answers: record them before
            # anything else is claimed. Claiming is a read and would go on working, so without this
            # the same events would be sent again each time their lease ran out, for as long as the
            # database refuses writes. Raises (a failed cycle, tried again shortly) while it still does.
            await self._record(*self._unrecorded)
        self._reloaded.clear()
        now = self.clock()
        # At most one request's worth per cycle (all pixels together): a larger claim made the event
        # loop work proportionally longer at once. A full claim means no linger before the next cycle,
        # so a backlog is not delivered later for it.
        rows = await store.claim_due(now, settings.tiktok.batch_size, LEASE_SECONDS)
        if not rows:
            return await self._probe_outages(now)
        # If _handle raises, the leases stay: the events are due again when they run out
        # (LEASE_SECONDS), or at once after a restart.
        outcomes = await self._handle(rows, now)
        self._unrecorded = (rows, outcomes)
        await self._record(rows, outcomes)
        return len(rows) + await self._probe_outages(self.clock())

    async def _record(self, rows: list[Item], outcomes: list[Outcome]) -> None:
        """Write a cycle's outcomes (releasing their leases), then count and log them."""
        await self.runtime.store.apply(self._after_reload(outcomes), self.clock())
        self._unrecorded = None
        for row in rows:
            self._probes.pop(row["id"], None)
        by_id = {row["id"]: row for row in rows}
        finished: Counter[tuple[str, str]] = Counter()
        lines = self.runtime.lines
        for outcome in outcomes:
            if outcome.state != PENDING:
                finished[outcome.sent_pixel or "", outcome.state] += 1
            if outcome.state in NOT_DELIVERED:
                # Failed events (warnings) have a budget of their own: a flood of unmatched or expired
                # ones must not silence them.
                kind = FAILED_LINES if outcome.state == FAILED else "event not delivered"
                if lines.allow(kind, outcome.state):
                    _log_not_delivered(by_id[outcome.id], outcome)
        for (pixel, state), events in finished.items():
            self.runtime.metrics.delivered.labels(pixel, state).inc(events)

    def _after_reload(self, outcomes: list[Outcome]) -> list[Outcome]:
        """A reload that changed a pixel (a fixed token) while the cycle was out made that pixel's
        waiting events due now (Daemon.reload). The cycle's own, decided before it (held until the old
        token's probe, or gated) and written only now, would undo that: they are due now too."""
        if not self._reloaded:
            return outcomes
        due = self.clock()
        return [
            dataclasses.replace(o, next_attempt_at=due)
            if o.state == PENDING and o.sent_pixel in self._reloaded and (o.next_attempt_at or 0) > due
            else o
            for o in outcomes
        ]

    async def _handle(self, rows: list[Any], now: float) -> list[Outcome]:
        """Decide every claimed event: expired, unroutable, unmatched, waiting, or sent (and how it went)."""
        config = self.runtime.config
        settings = config.settings
        outcomes: list[Outcome] = []
        batches: dict[str, list[Item]] = defaultdict(list)
        routes: dict[tuple[str, ...], str] = {}
        unconfigured: Counter[str] = Counter()
        for row in rows:
            keys = row["match_keys"]
            refs = pixel_refs(row)
            pixel = routes.get(refs)
            if pixel is None:
                pixel = routes[refs] = config.route_pixel(refs)
            if now - row["event_time"] > settings.delivery.max_event_age:
                # Routed all the same, like an unmatched event: stats and metrics count it under the
                # pixel it was meant for, not among events that were never looked at.
                outcomes.append(
                    Outcome(
                        row["id"],
                        EXPIRED,
                        count_attempt=False,
                        sent_pixel=pixel,
                        match_keys=keys,
                        error="older than delivery.max_event_age",
                    )
                )
                continue
            if not keys:
                outcomes.append(
                    Outcome(row["id"], UNMATCHED, count_attempt=False, sent_pixel=pixel, match_keys="")
                )
                continue
            if not config.configured(pixel):
                unconfigured[pixel] += 1
                outcomes.append(self._unconfigured(row, pixel, now))
                continue
            wait_until = self._gate(pixel, now)
            if wait_until > now + GATE_SLACK_SECONDS:
                outcomes.append(self._gated(row, pixel, wait_until))
                continue
            batches[pixel].append(row)
        for pixel, events in unconfigured.items():
            log.warning(
                "events wait: their pixel is not in the config",
                pixel=pixel,
                events=events,
                retry_in=HELD_PIXEL_RETRY,
                fix=FIX_UNCONFIGURED,
            )

        sent = await asyncio.gather(*(self._deliver_pixel(pixel, items) for pixel, items in batches.items()))
        for pixel_outcomes in sent:
            outcomes.extend(pixel_outcomes)
        return outcomes

    def _gate(self, pixel: str, now: float) -> float:
        """The earliest time the pixel may be sent to: held (token), failing (outage) or paced (rate)."""
        return max(self._blocked_until(pixel), self._pacer(pixel).next_send_at(now))

    def _blocked_until(self, pixel: str) -> float:
        """Until when TikTok's answers stop the pixel: its token was refused, or its requests fail."""
        outage = self.outages.get(pixel)
        return max(self.held_until.get(pixel, 0.0), outage.retry_at if outage is not None else 0.0)

    async def _probe_outages(self, now: float) -> int:
        """Bring one waiting event forward for each pixel whose last request failed and that nothing
        was sent to since its probe time.

        Single events back off up to Backoff.cap; without probes the first sign that TikTok is back
        could be that far away. A probe that fails costs the event no attempt: probing must not make
        an outage turn events into dead letters sooner.
        """
        probed = 0
        for pixel, outage in list(self.outages.items()):
            if outage.probe_at > now or self.held_until.get(pixel, 0.0) > now:
                continue
            if pixel not in self.runtime.config.settings.pixels:
                del self.outages[pixel]
                continue
            # The next probe, in case this one never gets an answer (paced, or the cycle fails).
            outage.probe_at = now + RECOVERY_PROBE.delay(max(1, outage.failures), self.rand())
            probe = await self.runtime.store.bring_forward(now, pixel)
            if probe is None:
                # Nothing of this pixel waits: the next new event finds out whether TikTok is back.
                del self.outages[pixel]
                continue
            conversion_id, due_at = probe
            self._probes[conversion_id] = due_at
            probed += 1
        return probed

    def _pacer(self, pixel: str) -> Pacer:
        if pixel not in self.pacers:
            self.pacers[pixel] = Pacer()
        return self.pacers[pixel]

    async def _deliver_pixel(self, pixel: str, items: list[Item]) -> list[Outcome]:
        size = self.runtime.config.settings.tiktok.batch_size
        chunks = [items[start : start + size] for start in range(0, len(items), size)]
        outcomes: list[Outcome] = []
        for index, chunk in enumerate(chunks):
            now = self.clock()
            wait_until = self._gate(pixel, now)
            if not self.runtime.config.configured(pixel):
                # A reload took the pixel out since these were routed: they wait for it, like the others.
                outcomes.extend(
                    self._unconfigured(item, pixel, now) for rest in chunks[index:] for item in rest
                )
                break
            if index and self._stopping.is_set():
                # Shutting down: what is not on its way yet stays due, for the next start.
                outcomes.extend(self._wait(item, pixel, now) for rest in chunks[index:] for item in rest)
                break
            if index and wait_until > now + GATE_SLACK_SECONDS:
                # The last answer slowed the pixel down, held it or failed: the rest of this cycle's
                # batches wait rather than repeating the same answer (each after a timeout, maybe).
                waiting = [item for rest in chunks[index:] for item in rest]
                outcomes.extend(self._gated(item, pixel, wait_until) for item in waiting)
                break
            try:
                outcomes.extend(await self._send(pixel, chunk))
            except Exception as exc:  # a bug in one request must not lose the outcomes of the others
                log.exception("sending a batch failed", pixel=pixel, events=len(chunk), error=repr(exc))
                answer = Answer(Kind.TRANSIENT, None, f"internal error: {exc!r}", None, None)
                outcomes.extend(self._transient(item, pixel, answer, self.clock()) for item in chunk)
        return outcomes

    async def _send(
        self, pixel: str, items: list[Item], *, use_indices: bool = True, split: Split | None = None
    ) -> list[Outcome]:
        runtime = self.runtime
        settings = runtime.config.settings
        pixel_config = runtime.config.pixel(pixel)
        body = build_payload(
            pixel_config.code,
            [item["event_json"] for item in items],
            settings.tiktok.partner_name or None,
            pixel_config.test_event_code or None,
        )
        runtime.metrics.batch_size.observe(len(items))
        if settings.tiktok.dry_run:
            log.info("dry run: batch not sent", pixel=pixel, events=len(items), payload=json.loads(body))
            return [self._finished(item, DELIVERED_DRY_RUN, pixel) for item in items]

        pacer = self._pacer(pixel)
        started = self.clock()
        pacer.sent(started)
        client = TikTokClient(self.session, settings.tiktok.endpoint, settings.tiktok.timeout)
        loop_started = time.monotonic()
        answer = await client.send(pixel_config.access_token, body)
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
        if answer.kind is Kind.TRANSIENT:
            outage = self.outages.setdefault(pixel, Outage())
            outage.failures += 1
            outage.probe_at = now + RECOVERY_PROBE.delay(outage.failures, self.rand())
            failed = [self._transient(item, pixel, answer, now) for item in items]
            # The pixel's next request goes when the first of these events is due again (their own
            # backoff) or at the next probe, whichever comes first, with everything due by then; not
            # with each cycle's new events, which asked a TikTok that was down several times a second.
            # Waiting for it costs an event no attempt.
            again = min((o.next_attempt_at for o in failed if o.state == PENDING), default=now)
            outage.retry_at = min(outage.probe_at, again)
            return failed
        # Any other answer came from TikTok itself: it is reachable again.
        outage = self.outages.pop(pixel, None)
        if answer.kind is Kind.DELIVERED:
            pacer.on_success()
            await self._set_health(pixel, True, answer, now)
            if outage is not None and outage.failures >= OUTAGE_FAILURES:
                # Events backed off up to Backoff.cap during the outage; send them now, not then.
                waiting = await runtime.store.make_due(now, [pixel])
                log.info("TikTok answers again: waiting events are due now", pixel=pixel, events=waiting)
            return [self._finished(item, DELIVERED, pixel, answer) for item in items]
        if answer.kind is Kind.RATE_LIMITED:
            pacer.on_rate_limited()
            retry_at = max(pacer.next_send_at(now), now + 1.0)
            return [self._retry(item, pixel, answer, retry_at, count=False) for item in items]
        if answer.kind is Kind.AUTH:
            if runtime.config.settings.pixels.get(pixel) != pixel_config:
                # A reload changed this pixel while the request was out: try the new token at once.
                return [self._retry(item, pixel, answer, now, count=False) for item in items]
            self.held_until[pixel] = now + HELD_PIXEL_RETRY
            await self._set_health(pixel, False, answer, now)
            log.error(
                "pixel held: TikTok refused its access token or rights; events stay pending",
                pixel=pixel,
                code=answer.code,
                message=answer.message,
                retry_in=HELD_PIXEL_RETRY,
                fix=FIX_HELD,
            )
            return [self._retry(item, pixel, answer, now + HELD_PIXEL_RETRY, count=False) for item in items]
        # BAD_REQUEST: one bad event fails the whole batch; split it until the bad ones stand alone.
        if len(items) == 1:
            return [self._finished(items[0], FAILED, pixel, answer)]
        if split is None:
            split = Split(since=time.monotonic())
        named = sorted({i for i in answer.bad_indices if i < len(items)}) if use_indices else []
        if named and len(named) < len(items):
            # TikTok names the bad event by its index: send it alone and the rest together. If a named
            # event then goes through alone the index was wrong, and the rest is bisected instead.
            suspects: list[Outcome] = []
            for i in named:
                suspects.extend(await self._send_part(pixel, [items[i]], split))
            confirmed = all(o.state == FAILED for o in suspects)
            rest = [item for i, item in enumerate(items) if i not in set(named)]
            return [*suspects, *await self._send_part(pixel, rest, split, use_indices=confirmed)]
        middle = len(items) // 2
        return [
            *await self._send_part(pixel, items[:middle], split, use_indices=False),
            *await self._send_part(pixel, items[middle:], split, use_indices=False),
        ]

    async def _send_part(
        self, pixel: str, items: list[Item], split: Split, *, use_indices: bool = True
    ) -> list[Outcome]:
        """Send part of a batch refused for a bad event, paced like any request to the pixel.

        Bisecting a batch that TikTok refuses as a whole takes up to 2n - 1 requests; without pacing
        they went out back to back. The part waits for a later cycle, at no cost in attempts, if the
        last answer held the pixel or failed transiently, if the pixel left the config, at shutdown,
        or once the split has judged an event and held the cycle for `split_budget` seconds. A slow
        pace alone (after rate limits) is waited out: the next cycle would send the whole batch again
        and start over, so the split must get at least one event judged in every cycle.
        """
        for _ in range(2):  # before the pause for pacing, and after it
            now = self.clock()
            if not self.runtime.config.configured(pixel):
                return [self._unconfigured(item, pixel, now) for item in items]
            if self._stopping.is_set() or (
                split.judged and time.monotonic() - split.since > self.split_budget
            ):
                return [self._wait(item, pixel, now) for item in items]
            blocked = self._blocked_until(pixel)
            if blocked > now + GATE_SLACK_SECONDS:
                return [self._gated(item, pixel, blocked) for item in items]
            pause = self._pacer(pixel).next_send_at(now) - now
            if pause <= 0:
                break
            await self._sleep(pause)
        outcomes = await self._send(pixel, items, use_indices=use_indices, split=split)
        split.judged += sum(1 for o in outcomes if o.state != PENDING)
        return outcomes

    def _finished(self, item: Item, state: str, pixel: str, answer: Answer | None = None) -> Outcome:
        return Outcome(
            item["id"],
            state,
            count_attempt=state != DELIVERED_DRY_RUN,
            sent_pixel=pixel,
            code=answer.code if answer else None,
            error=answer.message if answer and state == FAILED else None,
            request_id=answer.request_id if answer else None,
            match_keys=item["match_keys"],
            answered=answer is not None,
        )

    def _retry(
        self,
        item: Item,
        pixel: str,
        answer: Answer | None,
        at: float,
        *,
        count: bool,
        error: str | None = None,
    ) -> Outcome:
        return Outcome(
            item["id"],
            PENDING,
            next_attempt_at=at,
            count_attempt=count,
            sent_pixel=pixel,
            code=answer.code if answer else None,
            error=answer.message if answer else error,
            match_keys=item["match_keys"],
            answered=answer is not None,
        )

    def _unconfigured(self, item: Item, pixel: str, now: float) -> Outcome:
        """Not sent: the pixel is not in the config (any more). Looked at again after a while, or at
        once when a reload puts it back."""
        return self._retry(item, pixel, None, now + HELD_PIXEL_RETRY, count=False, error=UNCONFIGURED)

    def _wait(self, item: Item, pixel: str, until: float) -> Outcome:
        """Not sent: the pixel is paced, held or down. Waiting costs the event no attempt."""
        return self._retry(item, pixel, None, until, count=False)

    def _gated(self, item: Item, pixel: str, until: float) -> Outcome:
        """Not sent: the pixel's gate (_gate) opens at `until`. The event waits for it, or for a failing
        pixel, for its next probe rather than its next request: the requests follow the failed events'
        own retries, a few seconds apart, and a backlog waiting for them would be read and rewritten
        that often. The probe carries the events that waited for it.
        """
        outage = self.outages.get(pixel)
        if outage is not None and outage.retry_at >= until:
            until = max(until, outage.probe_at)
        return self._wait(item, pixel, until)

    def _transient(self, item: Item, pixel: str, answer: Answer, now: float) -> Outcome:
        due_at = self._probes.get(item["id"])
        if due_at is not None:
            # Brought forward to see whether TikTok is back: its own try is still to come, as planned.
            return self._retry(item, pixel, answer, max(due_at, now), count=False)
        attempts = item["attempts"] + 1
        if attempts >= self.runtime.config.settings.delivery.max_attempts:
            outcome = self._finished(item, FAILED, pixel, answer)
            return dataclasses.replace(outcome, error=f"gave up after {attempts} attempts: {answer.message}")
        return self._retry(item, pixel, answer, now + self.backoff.delay(attempts, self.rand()), count=True)

    async def _load_health(self) -> None:
        """What the previous run learnt about each pixel, so a recovery after a restart is recorded.

        A pixel the previous run held (TikTok refused its token) is tried again at once: a restart is
        how a token fixed in the environment file takes effect, and its events must not wait out the
        slow probe the previous run scheduled. Still refused, it is held again after one request.
        """
        held = []
        for row in await self.runtime.store.fetchall(
            "SELECT pixel, healthy, last_code, last_error, updated_at FROM pixel_status"
        ):
            if row["pixel"] not in self.runtime.health:
                self.runtime.health[row["pixel"]] = PixelHealth(
                    healthy=bool(row["healthy"]),
                    last_error=row["last_error"],
                    last_code=row["last_code"],
                    since=row["updated_at"],
                )
                if not row["healthy"] and row["pixel"] in self.runtime.config.settings.pixels:
                    held.append(row["pixel"])
        self._health_loaded = True
        if held:
            waiting = await self.runtime.store.make_due(self.clock(), held)
            log.info("pixels held before the start are tried again now", pixels=held, events=waiting)

    async def _set_health(self, pixel: str, healthy: bool, answer: Answer, now: float) -> None:
        health = self.runtime.pixel_health(pixel)
        if health.healthy == healthy and healthy:
            return
        if healthy:
            log.info("pixel healthy again: delivering held events", pixel=pixel)
        health.healthy = healthy
        health.since = now
        if healthy:
            # The stored code and message stay those of the last error, together: `stats` shows a
            # pixel healthy again beside what held it, not an accepting code 0 beside an old message.
            await self.runtime.store.set_pixel_status(pixel, healthy, None, None, now)
            return
        health.last_code = answer.code
        health.last_error = answer.message
        await self.runtime.store.set_pixel_status(pixel, healthy, answer.code, answer.message, now)


# The last error of an event that waits for its pixel to be put back in the config.
UNCONFIGURED = "its pixel is not in the config"

# Final states that mean TikTok did not get the event: one line each (delivered ones share their batch's).
NOT_DELIVERED = (FAILED, EXPIRED, UNMATCHED)
# The `kind` under which skipped `event not delivered` lines of failed events are counted.
FAILED_LINES = "event not delivered (failed)"


def _log_not_delivered(row: Any, outcome: Outcome) -> None:
    why = outcome.error
    if outcome.state == UNMATCHED:
        why = "no match key (ttclid, ttp, ip+user_agent, email, phone, external_id)"
    (log.warning if outcome.state == FAILED else log.info)(
        "event not delivered",
        state=outcome.state,
        conversion_id=row["id"],
        tracker=row["tracker"],
        click_id=row["click_id"],
        tiktok_event=row["event"],
        event_id=row["event_id"],
        pixel=outcome.sent_pixel,
        code=outcome.code,
        why=why,
    )


def _code_label(answer: Answer) -> str:
    if answer.code is not None:
        return str(answer.code)
    if answer.http_status is not None:
        return f"http_{answer.http_status}"
    return "timeout" if "timeout" in answer.message.lower() else "error"


def describe(payload: dict[str, Any]) -> str:
    return json.dumps(payload, indent=2, sort_keys=True)
