"""SQLite storage: schema and migrations, group-committed ingest, the delivery queue, every query."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from bridge.mapping import Click, Conversion

_T = TypeVar("_T")
# Rows per multi-row statement at most (fewer where SQLite allows fewer parameters).
_MAX_CHUNK_ROWS = 256

# Each entry moves the schema one version up; the first is the first release's schema.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE clicks (
        click_id TEXT PRIMARY KEY,
        ttclid TEXT, ttp TEXT, ip TEXT, user_agent TEXT, pixel TEXT, url TEXT, referrer TEXT,
        email_hash TEXT, phone_hash TEXT, external_id_hash TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX clicks_created ON clicks(created_at);

    CREATE TABLE conversions (
        id INTEGER PRIMARY KEY,
        tracker TEXT NOT NULL,
        click_id TEXT NOT NULL,
        status TEXT NOT NULL,
        event TEXT,
        transaction_id TEXT NOT NULL DEFAULT '',
        event_id TEXT,
        event_time INTEGER NOT NULL,
        value REAL, currency TEXT, pixel TEXT,
        ttclid TEXT, ttp TEXT, ip TEXT, user_agent TEXT, page_url TEXT,
        email_hash TEXT, phone_hash TEXT, external_id_hash TEXT,
        state TEXT NOT NULL,
        reason TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL,
        lease_until REAL,
        sent_pixel TEXT,
        last_code INTEGER,
        last_error TEXT,
        request_id TEXT,
        match_keys TEXT,
        received_at REAL NOT NULL,
        finished_at REAL,
        ingest_batch INTEGER
    );
    -- Idempotency: a repeat of the same conversion is a duplicate, whatever the tracker resends.
    CREATE UNIQUE INDEX conversions_identity
        ON conversions(tracker, click_id, event, transaction_id) WHERE event IS NOT NULL;
    -- Two columns, not a partial index: without ANALYZE statistics SQLite would otherwise prefer
    -- conversions_state and sort every pending row on each claim.
    CREATE INDEX conversions_due ON conversions(state, next_attempt_at);
    CREATE INDEX conversions_finished ON conversions(finished_at) WHERE finished_at IS NOT NULL;
    CREATE INDEX conversions_state ON conversions(state, sent_pixel);
    CREATE INDEX conversions_batch ON conversions(ingest_batch);

    -- What the worker last learnt about each pixel, for `stats` in another process.
    CREATE TABLE pixel_status (
        pixel TEXT PRIMARY KEY,
        healthy INTEGER NOT NULL,
        last_code INTEGER,
        last_error TEXT,
        updated_at REAL NOT NULL
    );
    """,
)

PENDING = "pending"
DELIVERED = "delivered"
DELIVERED_DRY_RUN = "delivered_dry_run"
FAILED = "failed"
EXPIRED = "expired"
UNMATCHED = "unmatched"
IGNORED = "ignored"
STATES = (PENDING, DELIVERED, DELIVERED_DRY_RUN, FAILED, EXPIRED, UNMATCHED, IGNORED)
FINISHED_STATES = (DELIVERED, DELIVERED_DRY_RUN, FAILED, EXPIRED, UNMATCHED, IGNORED)

CLICK_FIELDS = (
    "ttclid",
    "ttp",
    "ip",
    "user_agent",
    "pixel",
    "url",
    "referrer",
    "email_hash",
    "phone_hash",
    "external_id_hash",
)
_CONVERSION_FIELDS = (
    "tracker",
    "click_id",
    "status",
    "event",
    "transaction_id",
    "event_time",
    "value",
    "currency",
    "pixel",
    "ttclid",
    "ttp",
    "ip",
    "user_agent",
    "page_url",
    "email_hash",
    "phone_hash",
    "external_id_hash",
)
# What a claim returns of each conversion: the postback's fields and the delivery state.
CONVERSION_COLUMNS = (
    "id",
    *_CONVERSION_FIELDS,
    "event_id",
    "state",
    "reason",
    "attempts",
    "sent_pixel",
    "last_code",
    "last_error",
    "request_id",
    "received_at",
)


PRUNE_SLICE = 2000


class StoreUnavailable(Exception):
    """The database could not commit (disk full, read-only, locked, shutting down)."""


@dataclass(frozen=True)
class Ingested:
    result: str  # accepted | duplicate | ignored
    conversion_id: int | None = None
    event_id: str | None = None


@dataclass(frozen=True)
class Outcome:
    """What the worker decided for one claimed conversion; applied in one transaction per cycle."""

    id: int
    state: str  # a state from STATES; PENDING means retry at next_attempt_at
    next_attempt_at: float | None = None
    count_attempt: bool = True
    sent_pixel: str | None = None
    code: int | None = None
    error: str | None = None
    request_id: str | None = None
    match_keys: str | None = None


# A group is written with one multi-row statement per table, its rows bound as positional parameters:
# one step for the whole group. A statement per row (executemany) steps once per row, and every step
# hands the GIL to the busy listener and waits to get it back, so commits were slowest exactly when
# the most requests waited on them. (Rows as one JSON text cost more: json_extract parses the row's
# text again for every column.) Groups are padded with NULL rows, which the WHERE drops, to a power of
# two, so a few prepared statements, cached by sqlite3, serve every group size.
_CLICK_ROW = ("click_id", *CLICK_FIELDS)
# The values of one conversion, in this order (see _conversion_values).
_CONVERSION_ROW = (*_CONVERSION_FIELDS, "event_id", "state", "reason")


def _values(rows: int, width: int, first: int) -> str:
    """`(?3, ?4), (?5, ?6)`: `rows` rows of `width` numbered parameters, the first numbered `first`."""
    return ", ".join(
        "(" + ", ".join(f"?{first + row * width + column}" for column in range(width)) + ")"
        for row in range(rows)
    )


@functools.cache
def _clicks_upsert(rows: int) -> str:
    """?1 is the time; the rows follow. Rows apply in order, so a later one sees an earlier one."""
    r = {name: f"r.column{i + 1}" for i, name in enumerate(_CLICK_ROW)}
    return f"""
INSERT INTO clicks (click_id, {", ".join(CLICK_FIELDS)}, created_at, updated_at)
SELECT {", ".join(r[name] for name in _CLICK_ROW)}, ?1, ?1
FROM (VALUES {_values(rows, len(_CLICK_ROW), 2)}) AS r
WHERE r.column1 IS NOT NULL
ON CONFLICT (click_id) DO UPDATE SET
    {", ".join(f"{f} = COALESCE(NULLIF(clicks.{f}, ''), excluded.{f})" for f in CLICK_FIELDS)},
    updated_at = excluded.updated_at
"""  # noqa: S608 -- column names are constants; values are bound


@functools.cache
def _conversions_insert(rows: int) -> str:
    """?1 is the time, ?2 the ingest batch; the rows follow.

    A second conversion of one event for one click with another transaction id (a rebill) gets
    `_{transaction_id}` appended to its event_id, or TikTok would dedupe it away as a repeat. SQLite
    reads all of a statement's rows before inserting any when its SELECT reads the table it inserts
    into, so this EXISTS does not see rows of its own statement: _rounds() never puts two
    conversions of one tracker, click and event into one statement.

    A conversion without a transaction id, for a click that already has that event, cannot be told
    apart from a repeat: it is not inserted, and answered as a duplicate of the first one.
    """
    r = {name: f"r.column{i + 1}" for i, name in enumerate(_CONVERSION_ROW)}
    return f"""
INSERT INTO conversions ({", ".join(_CONVERSION_FIELDS)}, event_id, state, reason, next_attempt_at,
                         received_at, finished_at, ingest_batch)
SELECT {", ".join(r[f] for f in _CONVERSION_FIELDS)},
    CASE WHEN {r["event"]} IS NOT NULL AND {r["transaction_id"]} <> '' AND EXISTS (
            SELECT 1 FROM conversions c
            WHERE c.tracker = {r["tracker"]} AND c.click_id = {r["click_id"]} AND c.event = {r["event"]}
              AND c.transaction_id <> {r["transaction_id"]})
         THEN {r["event_id"]} || '_' || {r["transaction_id"]}
         ELSE {r["event_id"]} END,
    {r["state"]}, {r["reason"]},
    CASE WHEN {r["state"]} = 'pending' THEN ?1 END, ?1, CASE WHEN {r["state"]} <> 'pending' THEN ?1 END, ?2
FROM (VALUES {_values(rows, len(_CONVERSION_ROW), 3)}) AS r
WHERE r.column1 IS NOT NULL
  AND NOT ({r["event"]} IS NOT NULL AND {r["transaction_id"]} = '' AND EXISTS (
            SELECT 1 FROM conversions c
            WHERE c.tracker = {r["tracker"]} AND c.click_id = {r["click_id"]} AND c.event = {r["event"]}))
ON CONFLICT (tracker, click_id, event, transaction_id) WHERE event IS NOT NULL DO NOTHING
"""  # noqa: S608 -- column names are constants; values are bound


# What a group inserted, as one JSON row (one step, not a step per row).
_INSERTED = """
SELECT json_group_array(json_array(id, tracker, click_id, event, transaction_id, event_id))
FROM conversions WHERE ingest_batch = ? AND event IS NOT NULL
"""


@functools.cache
def _existing(rows: int) -> str:
    """The conversions that repeats of a group are duplicates of, as one JSON row."""
    return f"""
SELECT json_group_array(json_array(k.column1, k.column2, k.column3, k.column4, c.id, c.event_id))
FROM (VALUES {_values(rows, 4, 1)}) AS k CROSS JOIN conversions AS c
WHERE c.tracker = k.column1 AND c.click_id = k.column2 AND c.event = k.column3
  AND (c.transaction_id = k.column4 OR k.column4 = '')
"""  # noqa: S608 -- column names are constants; values are bound


class Store:
    """One SQLite file. Writes go through one connection; ingest writes are group-committed."""

    def __init__(self, path: Path, busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        # How long a write waits for a lock another process holds before it is refused (503).
        self.busy_timeout = busy_timeout
        self._db: aiosqlite.Connection | None = None
        self._queue: asyncio.Queue[tuple[Any, asyncio.Future[Any]]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._batch = 0
        self._closing = False
        self.committed = asyncio.Event()  # set after every ingest commit that added pending events
        self.max_group = 1024

    # -- lifetime ---------------------------------------------------------------------------------

    async def open(self) -> Store:
        """Open (creating it and its directory if needed) and migrate; StoreUnavailable says why not."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Tried with the plain driver first: a failed aiosqlite connect leaves its thread to report
            # to an event loop that may be closed by then, a traceback at exit instead of one line.
            await asyncio.to_thread(lambda: sqlite3.connect(self.path).close())
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
            await self._db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            await self._db.execute("PRAGMA journal_mode = WAL")
            # FULL: an acknowledged conversion survives power loss, not only a process crash.
            await self._db.execute("PRAGMA synchronous = FULL")
            await self._db.execute("PRAGMA foreign_keys = ON")
            await self._migrate()
            self._batch = await self._scalar("SELECT COALESCE(MAX(ingest_batch), 0) FROM conversions")
        except (OSError, sqlite3.Error, StoreUnavailable) as exc:
            if self._db is not None:
                await self._db.close()
                self._db = None
            if isinstance(exc, StoreUnavailable):
                raise
            raise StoreUnavailable(f"cannot open the database {self.path}: {exc}") from None
        self._writer = asyncio.create_task(self._write_loop(), name="store-writer")
        return self

    async def close(self) -> None:
        self._closing = True
        if self._writer is not None:
            await self._queue.put((None, asyncio.get_running_loop().create_future()))
            await self._writer
            self._writer = None
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreUnavailable("database is closed")
        return self._db

    async def _migrate(self) -> None:
        db = self.db
        await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        version = await self._scalar("SELECT MAX(version) FROM schema_version") or 0
        if version > len(MIGRATIONS):
            raise StoreUnavailable(
                f"{self.path} has schema version {version}, newer than this release knows ({len(MIGRATIONS)})"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            await db.execute("BEGIN IMMEDIATE")
            try:
                for statement in script.split(";"):
                    if statement.strip():
                        await db.execute(statement)
                await db.execute("INSERT INTO schema_version (version) VALUES (?)", (number,))
                await db.execute("COMMIT")
            except BaseException:
                await db.execute("ROLLBACK")
                raise

    async def _scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        async with self.db.execute(sql, params) as cursor:
            row = await cursor.fetchone()
        return row[0] if row else None

    async def fetchall(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        async with self.db.execute(sql, params) as cursor:
            cursor.row_factory = sqlite3.Row
            return list(await cursor.fetchall())

    async def writable(self) -> str | None:
        """None when the database takes writes, else why not (for /readyz)."""
        if self._db is None or self._closing:
            return "database is closed"
        try:
            async with self._lock:
                db = self.db
                await db.execute("BEGIN IMMEDIATE")
                try:
                    # A real write, committed: taking the lock alone would pass on a full disk.
                    await db.execute("UPDATE schema_version SET version = version")
                    await db.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        if db.in_transaction:
                            await db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            return f"database is not writable: {exc}"
        return None

    # -- group-committed ingest ---------------------------------------------------------------------

    async def add_click(self, click: Click) -> None:
        await self._submit(click)

    async def add_conversion(self, conversion: Conversion) -> Ingested:
        return await self._submit(conversion)

    async def _submit(self, item: Click | Conversion) -> Any:
        if self._closing or self._writer is None:
            raise StoreUnavailable("shutting down")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))  # unbounded: never waits, so no coroutine for it
        return await future

    async def _write_loop(self) -> None:
        while True:
            group = [await self._queue.get()]
            while not self._queue.empty() and len(group) < self.max_group:
                group.append(self._queue.get_nowait())
            stop = any(item is None for item, _ in group)
            work = [(item, fut) for item, fut in group if item is not None]
            if work:
                await self._commit_group(work)
            if stop:
                # Whatever arrived after the stop marker is refused, never left hanging.
                while not self._queue.empty():
                    item, fut = self._queue.get_nowait()
                    if item is not None and not fut.done():
                        fut.set_exception(StoreUnavailable("shutting down"))
                return

    async def _commit_group(self, work: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        clicks = [item for item, _ in work if isinstance(item, Click)]
        conversions = [item for item, _ in work if isinstance(item, Conversion)]
        now = time.time()
        self._batch += 1
        batch = self._batch
        try:
            async with self._lock:
                results = await self._on_db_thread(_write_group, clicks, conversions, batch, now)
        except Exception as exc:  # the writer must survive anything: every waiter gets its answer
            error = StoreUnavailable(f"could not commit: {exc}")
            for _, fut in work:
                if not fut.done():
                    fut.set_exception(error)
            return
        for item, fut in work:
            if fut.done():
                continue
            fut.set_result(results.get(id(item)) if isinstance(item, Conversion) else None)
        if any(r.result == "accepted" for r in results.values()):
            self.committed.set()

    async def _on_db_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        """`fn(connection, *args)` on the database's thread, as one call.

        A group's transaction is one call, not an await per statement: each await is a hop to that
        thread and back, and under load every hop back waits for a full turn of the busy event loop,
        so four hops made a commit take milliseconds of waiting for microseconds of work. aiosqlite
        has no public call for this; `_execute` is the one its own methods all go through.
        """
        db = self.db
        return await db._execute(lambda: fn(db._conn, *args))

    # -- delivery queue ---------------------------------------------------------------------------------

    async def release_leases(self, ids: Iterable[int] | None = None) -> None:
        """Make claimed events due again: at start-up (a crash left leases behind) or on shutdown."""
        async with self._lock:
            if ids is None:
                await self.db.execute(
                    "UPDATE conversions SET lease_until = NULL WHERE lease_until IS NOT NULL"
                )
            else:
                await self.db.executemany(
                    "UPDATE conversions SET lease_until = NULL WHERE id = ?", [(i,) for i in ids]
                )

    async def claim_due(self, now: float, limit: int, lease: float) -> list[sqlite3.Row]:
        """Lease up to `limit` due events; a lease that runs out (crash) makes them due again."""
        params = {"lease": now + lease, "now": now, "limit": limit}
        async with self._lock:
            # One call on the database thread, not an await per statement (see _on_db_thread).
            rows = await self._on_db_thread(_in_transaction, _claim, params)
        rows.sort(key=lambda r: r["id"])
        return rows

    async def clicks_for(self, click_ids: Iterable[str]) -> dict[str, sqlite3.Row]:
        return await self._on_db_thread(_clicks_for, sorted(set(click_ids)))

    async def apply(self, outcomes: Sequence[Outcome], now: float) -> None:
        """Record the worker's outcomes for one cycle in one transaction."""
        if not outcomes:
            return
        rows = [
            [
                o.id,
                o.state,
                o.next_attempt_at,
                1 if o.count_attempt else 0,
                o.sent_pixel,
                o.code,
                o.error,
                o.request_id,
                o.match_keys,
                None if o.state == PENDING else now,
            ]
            for o in outcomes
        ]
        async with self._lock:
            # One call on the database thread, not an await per statement (see _on_db_thread).
            await self._on_db_thread(_in_transaction, _apply, rows)

    async def set_pixel_status(
        self, pixel: str, healthy: bool, code: int | None, error: str | None, now: float
    ) -> None:
        async with self._lock:
            await self.db.execute(
                "INSERT INTO pixel_status (pixel, healthy, last_code, last_error, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (pixel) DO UPDATE SET healthy = excluded.healthy, "
                "last_code = COALESCE(excluded.last_code, last_code), "
                "last_error = COALESCE(excluded.last_error, last_error), updated_at = excluded.updated_at",
                (pixel, int(healthy), code, error, now),
            )

    async def next_due_at(self) -> float | None:
        return await self._scalar("SELECT MIN(next_attempt_at) FROM conversions WHERE state = 'pending'")

    async def make_due(self, now: float, pixels: Iterable[str] | None = None) -> int:
        """Bring waiting events forward to now (after a reload fixed a pixel's token)."""
        async with self._lock:
            if pixels is None:
                cursor = await self.db.execute(
                    "UPDATE conversions SET next_attempt_at = ? "
                    "WHERE state = 'pending' AND next_attempt_at > ?",
                    (now, now),
                )
            else:
                names = sorted(set(pixels))
                marks = ",".join("?" * len(names))
                cursor = await self.db.execute(
                    f"UPDATE conversions SET next_attempt_at = ? WHERE state = 'pending' "  # noqa: S608
                    f"AND next_attempt_at > ? AND sent_pixel IN ({marks})",
                    (now, now, *names),
                )
            return cursor.rowcount

    async def bring_forward(self, now: float, pixel: str) -> tuple[int, float] | None:
        """Make the pixel's next waiting event due now (an outage probe).

        Returns its id and when it was due before, or None when none of the pixel's events waits.
        """
        async with self._lock:
            async with self.db.execute(
                "SELECT id, next_attempt_at FROM conversions WHERE state = 'pending' AND sent_pixel = ? "
                "AND next_attempt_at > ? AND (lease_until IS NULL OR lease_until <= ?) "
                "ORDER BY next_attempt_at LIMIT 1",
                (pixel, now, now),
            ) as cursor:
                row = await cursor.fetchone()
            if row is None:
                return None
            await self.db.execute(
                "UPDATE conversions SET next_attempt_at = ? WHERE id = ? AND state = 'pending'", (now, row[0])
            )
        return row[0], row[1]

    # -- inspection and maintenance ---------------------------------------------------------------------

    async def conversion(self, conversion_id: int) -> sqlite3.Row | None:
        rows = await self.fetchall("SELECT * FROM conversions WHERE id = ?", (conversion_id,))
        return rows[0] if rows else None

    async def prune(self, now: float, clicks_age: float, finished_age: float) -> tuple[int, int]:
        """Delete clicks and finished conversions past retention; pending ones are never pruned.

        In slices of PRUNE_SLICE rows, each its own short transaction, so the first prune of a
        large database never holds up ingest (which waits for the same lock) for long.
        """
        totals = []
        for sql, cutoff in (
            (
                "DELETE FROM clicks WHERE click_id IN "
                "(SELECT click_id FROM clicks WHERE created_at < ? LIMIT ?)",
                now - clicks_age,
            ),
            (
                "DELETE FROM conversions WHERE id IN (SELECT id FROM conversions "
                "WHERE finished_at IS NOT NULL AND finished_at < ? LIMIT ?)",
                now - finished_age,
            ),
        ):
            total = 0
            while True:
                async with self._lock:
                    cursor = await self.db.execute(sql, (cutoff, PRUNE_SLICE))
                total += cursor.rowcount
                if cursor.rowcount < PRUNE_SLICE:
                    break
                await asyncio.sleep(0)  # let waiting commits through between slices
            totals.append(total)
        return totals[0], totals[1]

    async def requeue_failed(self, ids: Sequence[int] | None, now: float) -> int:
        """Move dead letters (all, or the given ids) back to pending with a fresh attempt count."""
        sql = (
            "UPDATE conversions SET state = 'pending', attempts = 0, next_attempt_at = ?, "
            "lease_until = NULL, finished_at = NULL WHERE state = 'failed'"
        )
        async with self._lock:
            if ids is None:
                cursor = await self.db.execute(sql, (now,))
                return cursor.rowcount
            total = 0
            for conversion_id in ids:
                cursor = await self.db.execute(sql + " AND id = ?", (now, conversion_id))
                total += cursor.rowcount
            return total


def _write_group(
    db: sqlite3.Connection, clicks: list[Click], conversions: list[Conversion], batch: int, now: float
) -> dict[int, Ingested]:
    """One group in one transaction, on the database thread; the results by id() of each conversion."""
    db.execute("BEGIN IMMEDIATE")
    try:
        if clicks:
            rows = [[c.click_id, *(getattr(c, f) for f in CLICK_FIELDS)] for c in clicks]
            for size, params in _chunks(db, rows, len(_CLICK_ROW), 1):
                db.execute(_clicks_upsert(size), [now, *params])
        results = _insert_conversions(db, conversions, batch, now) if conversions else {}
        db.execute("COMMIT")
    except BaseException:
        # A failed ROLLBACK (disk gone) must not hide the first error or kill the writer.
        with contextlib.suppress(sqlite3.Error):
            if db.in_transaction:
                db.execute("ROLLBACK")
        raise
    return results


def _insert_conversions(
    db: sqlite3.Connection, conversions: list[Conversion], batch: int, now: float
) -> dict[int, Ingested]:
    """A statement per round, then one query for every id: a few steps for the whole group."""
    for part in _rounds(conversions):
        rows = [_conversion_values(c) for c in part]
        for size, params in _chunks(db, rows, len(_CONVERSION_ROW), 2):
            db.execute(_conversions_insert(size), [now, batch, *params])
    inserted: dict[tuple[str, str, str, str], tuple[int, str]] = {}
    for row in json.loads(db.execute(_INSERTED, (batch,)).fetchone()[0]):
        inserted[(row[1], row[2], row[3], row[4])] = (row[0], row[5])
    results: dict[int, Ingested] = {}
    claimed: set[tuple[str, str, str, str]] = set()
    repeats: list[tuple[Conversion, tuple[str, str, str, str]]] = []
    for conv in conversions:
        if conv.event is None:
            results[id(conv)] = Ingested("ignored")
            continue
        key = (conv.tracker, conv.click_id, conv.event, conv.transaction_id)
        if key in inserted and key not in claimed:
            claimed.add(key)
            conversion_id, event_id = inserted[key]
            results[id(conv)] = Ingested("accepted", conversion_id, event_id)
            continue
        repeats.append((conv, key))
    if repeats:
        existing: dict[tuple[str, str, str, str], tuple[int, str]] = {}
        keys = [list(key) for key in dict.fromkeys(key for _, key in repeats)]
        for size, params in _chunks(db, keys, 4, 0):
            for row in json.loads(db.execute(_existing(size), params).fetchone()[0]):
                key = (row[0], row[1], row[2], row[3])
                # Without a transaction id, the duplicate is of the click's first such conversion.
                if key not in existing or row[4] < existing[key][0]:
                    existing[key] = (row[4], row[5])
        for conv, key in repeats:
            if key not in existing:  # cannot happen inside the transaction; refuse rather than lie
                raise StoreUnavailable("conversion vanished during commit")
            results[id(conv)] = Ingested("duplicate", *existing[key])
    return results


def _in_transaction(db: sqlite3.Connection, fn: Callable[..., _T], *args: Any) -> _T:
    """`fn(db, *args)` inside BEGIN IMMEDIATE ... COMMIT, rolled back if it raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        result = fn(db, *args)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return result


def _claim(db: sqlite3.Connection, params: dict[str, Any]) -> list[sqlite3.Row]:
    cursor = db.execute(
        f"""UPDATE conversions SET lease_until = :lease WHERE id IN (
                SELECT id FROM conversions
                WHERE state = 'pending' AND next_attempt_at <= :now
                  AND (lease_until IS NULL OR lease_until <= :now)
                ORDER BY next_attempt_at LIMIT :limit)
            RETURNING {", ".join(CONVERSION_COLUMNS)}""",  # noqa: S608 -- constant column list
        params,
    )
    cursor.row_factory = sqlite3.Row
    return cursor.fetchall()


def _clicks_for(db: sqlite3.Connection, ids: list[str]) -> dict[str, sqlite3.Row]:
    found: dict[str, sqlite3.Row] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        cursor = db.execute(
            f"SELECT click_id, {', '.join(CLICK_FIELDS)} FROM clicks WHERE click_id IN ({marks})",  # noqa: S608
            chunk,
        )
        cursor.row_factory = sqlite3.Row
        for row in cursor:
            found[row["click_id"]] = row
    return found


# An outcome's values for _apply, in this order (see Store.apply). As SQL: the outcome's columns.
_OUTCOME_SET = """
    state = {state}, next_attempt_at = {next_attempt_at}, lease_until = NULL,
    attempts = attempts + {inc},
    sent_pixel = COALESCE({sent_pixel}, sent_pixel),
    last_code = COALESCE({code}, last_code),
    last_error = CASE WHEN {state} IN ('delivered', 'delivered_dry_run') THEN NULL
                      ELSE COALESCE({error}, last_error) END,
    request_id = COALESCE({request_id}, request_id),
    match_keys = COALESCE({match_keys}, match_keys),
    finished_at = {finished_at}
"""
_OUTCOME_ROW = (
    "id",
    "state",
    "next_attempt_at",
    "inc",
    "sent_pixel",
    "code",
    "error",
    "request_id",
    "match_keys",
    "finished_at",
)
# UPDATE ... FROM, for a whole cycle's outcomes in one statement, came with SQLite 3.33.
_UPDATE_FROM = sqlite3.sqlite_version_info >= (3, 33, 0)
_APPLY_ONE = (
    "UPDATE conversions SET"
    + _OUTCOME_SET.format(**{name: f"?{i + 1}" for i, name in enumerate(_OUTCOME_ROW)})
    + "WHERE id = ?1 AND state = 'pending'"
)


@functools.cache
def _apply_many(rows: int) -> str:
    o = {name: f"o.column{i + 1}" for i, name in enumerate(_OUTCOME_ROW)}
    return (
        "UPDATE conversions SET"
        + _OUTCOME_SET.format(**o)
        + f"FROM (VALUES {_values(rows, len(_OUTCOME_ROW), 1)}) AS o "
        + "WHERE conversions.id = o.column1 AND conversions.state = 'pending'"
    )


def _apply(db: sqlite3.Connection, rows: list[list[Any]]) -> None:
    # One statement per chunk, not one step per outcome (each a GIL handoff, as for ingest). Two
    # outcomes for one id would apply in order row by row, but in any order in one statement.
    if _UPDATE_FROM and len({row[0] for row in rows}) == len(rows):
        for size, params in _chunks(db, rows, len(_OUTCOME_ROW), 0):
            db.execute(_apply_many(size), params)
    else:
        db.executemany(_APPLY_ONE, rows)


def _chunks(
    db: sqlite3.Connection, rows: list[list[Any]], width: int, fixed: int
) -> Iterator[tuple[int, list[Any]]]:
    """Rows flattened into parameter lists, padded with NULL rows to a power of two.

    Each chunk stays within SQLite's limit on parameters (`fixed` of them come before the rows).
    """
    room = (db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) - fixed) // width
    most = 1 << min(_MAX_CHUNK_ROWS.bit_length() - 1, room.bit_length() - 1)
    for start in range(0, len(rows), most):
        chunk = rows[start : start + most]
        size = 1 << (len(chunk) - 1).bit_length()
        params = [value for row in chunk for value in row]
        params.extend([None] * ((size - len(chunk)) * width))
        yield size, params


def _rounds(conversions: list[Conversion]) -> list[list[Conversion]]:
    """The group in arrival order, split so that no part holds two conversions of one click and event.

    Conversions of different clicks or events never affect each other's insert; those of the same
    one (a rebill, a repeat) go in later parts, so each sees the ones before it, as row by row.
    """
    parts: list[list[Conversion]] = []
    seen: dict[tuple[str, str, str | None], int] = {}
    for conv in conversions:
        key = (conv.tracker, conv.click_id, conv.event)
        index = seen.get(key, 0)
        seen[key] = index + 1
        if index == len(parts):
            parts.append([])
        parts[index].append(conv)
    return parts


def _conversion_values(conv: Conversion) -> list[Any]:
    values: list[Any] = [getattr(conv, f) for f in _CONVERSION_FIELDS]
    values.append(conv.event_id)
    values.append(PENDING if conv.event is not None else IGNORED)
    values.append(conv.ignored_reason)
    return values
