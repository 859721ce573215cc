"""SQLite storage: schema and migrations, group-committed ingest, the delivery queue, every query."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from bridge.mapping import Click, Conversion

_T = TypeVar("_T")

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
    CREATE INDEX conversions_due ON conversions(next_attempt_at) WHERE state = 'pending';
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
CONVERSION_COLUMNS = (
    "id",
    "tracker",
    "click_id",
    "status",
    "event",
    "transaction_id",
    "event_id",
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
    "state",
    "reason",
    "attempts",
    "sent_pixel",
    "last_code",
    "last_error",
    "request_id",
    "received_at",
)


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


_CLICK_UPSERT = f"""
INSERT INTO clicks (click_id, {", ".join(CLICK_FIELDS)}, created_at, updated_at)
VALUES (:click_id, {", ".join(":" + f for f in CLICK_FIELDS)}, :now, :now)
ON CONFLICT (click_id) DO UPDATE SET
    {", ".join(f"{f} = COALESCE(NULLIF(clicks.{f}, ''), excluded.{f})" for f in CLICK_FIELDS)},
    updated_at = excluded.updated_at
"""  # noqa: S608 -- column names are constants; values are bound

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
# A second conversion of one event for one click with another transaction id (a rebill) gets
# `_{transaction_id}` appended to its event_id, or TikTok would dedupe it away as a repeat.
_CONVERSION_INSERT = f"""
INSERT INTO conversions ({", ".join(_CONVERSION_FIELDS)}, event_id, state, reason, next_attempt_at,
                         received_at, finished_at, ingest_batch)
SELECT {", ".join(":" + f for f in _CONVERSION_FIELDS)},
    CASE WHEN :event IS NOT NULL AND :transaction_id <> '' AND EXISTS (
            SELECT 1 FROM conversions c
            WHERE c.tracker = :tracker AND c.click_id = :click_id AND c.event = :event
              AND c.transaction_id <> :transaction_id)
         THEN :event_id || '_' || :transaction_id
         ELSE :event_id END,
    :state, :reason, :next_attempt_at, :received_at, :finished_at, :batch
WHERE true
ON CONFLICT (tracker, click_id, event, transaction_id) WHERE event IS NOT NULL DO NOTHING
"""  # noqa: S608 -- column names are constants; values are bound

# The same two writes for a whole group at once: its rows reach SQLite as one JSON array bound to one
# statement, so a group is one step. executemany steps once per row, and every step releases the GIL
# and then waits for the busy listener to hand it back: commits were slowest exactly when the most
# requests waited on them. json_each yields rows in array order, so they apply in arrival order.
# SQLite's JSON cannot carry a NUL character; a group with one takes the row-by-row statements above.
_CLICKS_UPSERT_JSON = f"""
INSERT INTO clicks (click_id, {", ".join(CLICK_FIELDS)}, created_at, updated_at)
SELECT {", ".join(f"json_extract(value, '$[{i}]')" for i in range(len(CLICK_FIELDS) + 1))}, :now, :now
FROM json_each(:rows) WHERE true ORDER BY key
ON CONFLICT (click_id) DO UPDATE SET
    {", ".join(f"{f} = COALESCE(NULLIF(clicks.{f}, ''), excluded.{f})" for f in CLICK_FIELDS)},
    updated_at = excluded.updated_at
"""  # noqa: S608 -- column names are constants; values are bound
# One JSON array per conversion, in this order.
_CONVERSION_ROW = (*_CONVERSION_FIELDS, "event_id", "state", "reason")
# SQLite reads all of a statement's rows before inserting any when the SELECT reads the table it
# inserts into, so this EXISTS does not see rows of the same statement: _rounds() never puts two
# conversions of one tracker, click and event into one statement.
_CONVERSIONS_INSERT_JSON = f"""
INSERT INTO conversions ({", ".join(_CONVERSION_FIELDS)}, event_id, state, reason, next_attempt_at,
                         received_at, finished_at, ingest_batch)
SELECT {", ".join(f"r.{f}" for f in _CONVERSION_FIELDS)},
    CASE WHEN r.event IS NOT NULL AND r.transaction_id <> '' AND EXISTS (
            SELECT 1 FROM conversions c
            WHERE c.tracker = r.tracker AND c.click_id = r.click_id AND c.event = r.event
              AND c.transaction_id <> r.transaction_id)
         THEN r.event_id || '_' || r.transaction_id
         ELSE r.event_id END,
    r.state, r.reason,
    CASE WHEN r.state = 'pending' THEN :now END, :now, CASE WHEN r.state <> 'pending' THEN :now END, :batch
FROM (SELECT {", ".join(f"json_extract(value, '$[{i}]') AS {f}" for i, f in enumerate(_CONVERSION_ROW))}
      FROM json_each(:rows) ORDER BY key) AS r
WHERE true
ON CONFLICT (tracker, click_id, event, transaction_id) WHERE event IS NOT NULL DO NOTHING
"""  # noqa: S608 -- column names are constants; values are bound
# What the group inserted, and what its duplicates already were, each as one JSON row, not a step per row.
_INSERTED = """
SELECT json_group_array(json_array(id, tracker, click_id, event, transaction_id, event_id))
FROM conversions WHERE ingest_batch = ? AND event IS NOT NULL
"""
_EXISTING = """
SELECT json_group_array(json_array(c.tracker, c.click_id, c.event, c.transaction_id, c.id, c.event_id))
FROM json_each(?) AS k CROSS JOIN conversions AS c
WHERE c.tracker = json_extract(k.value, '$[0]') AND c.click_id = json_extract(k.value, '$[1]')
  AND c.event = json_extract(k.value, '$[2]') AND c.transaction_id = json_extract(k.value, '$[3]')
"""


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
        async with self._lock:
            db = self.db
            await db.execute("BEGIN IMMEDIATE")
            try:
                columns = ", ".join(CONVERSION_COLUMNS)
                rows = await self.fetchall(
                    f"""UPDATE conversions SET lease_until = :lease WHERE id IN (
                            SELECT id FROM conversions
                            WHERE state = 'pending' AND next_attempt_at <= :now
                              AND (lease_until IS NULL OR lease_until <= :now)
                            ORDER BY next_attempt_at LIMIT :limit)
                        RETURNING {columns}""",  # noqa: S608 -- constant column list
                    {"lease": now + lease, "now": now, "limit": limit},
                )
                await db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    await db.execute("ROLLBACK")
                raise
        rows.sort(key=lambda r: r["id"])
        return rows

    async def clicks_for(self, click_ids: Iterable[str]) -> dict[str, sqlite3.Row]:
        ids = sorted(set(click_ids))
        found: dict[str, sqlite3.Row] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row in await self.fetchall(
                f"SELECT click_id, {', '.join(CLICK_FIELDS)} FROM clicks WHERE click_id IN ({marks})",  # noqa: S608
                chunk,
            ):
                found[row["click_id"]] = row
        return found

    async def apply(self, outcomes: Sequence[Outcome], now: float) -> None:
        """Record the worker's outcomes for one cycle in one transaction."""
        if not outcomes:
            return
        rows = [
            {
                **asdict(o),
                "finished_at": None if o.state == PENDING else now,
                "inc": 1 if o.count_attempt else 0,
            }
            for o in outcomes
        ]
        async with self._lock:
            db = self.db
            await db.execute("BEGIN IMMEDIATE")
            try:
                await db.executemany(
                    """UPDATE conversions SET
                        state = :state, next_attempt_at = :next_attempt_at, lease_until = NULL,
                        attempts = attempts + :inc,
                        sent_pixel = COALESCE(:sent_pixel, sent_pixel),
                        last_code = COALESCE(:code, last_code),
                        last_error = CASE WHEN :state IN ('delivered', 'delivered_dry_run') THEN NULL
                                          ELSE COALESCE(:error, last_error) END,
                        request_id = COALESCE(:request_id, request_id),
                        match_keys = COALESCE(:match_keys, match_keys),
                        finished_at = :finished_at
                       WHERE id = :id AND state = 'pending'""",
                    rows,
                )
                await db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    await db.execute("ROLLBACK")
                raise

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
        """Delete clicks and finished conversions past retention; pending ones are never pruned."""
        async with self._lock:
            db = self.db
            clicks = await db.execute("DELETE FROM clicks WHERE created_at < ?", (now - clicks_age,))
            conversions = await db.execute(
                "DELETE FROM conversions WHERE finished_at IS NOT NULL AND finished_at < ?",
                (now - finished_age,),
            )
            return clicks.rowcount, conversions.rowcount

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
            _upsert_clicks(db, clicks, now)
        results = _insert_conversions(db, conversions, batch, now) if conversions else {}
        db.execute("COMMIT")
    except BaseException:
        # A failed ROLLBACK (disk gone) must not hide the first error or kill the writer.
        with contextlib.suppress(sqlite3.Error):
            if db.in_transaction:
                db.execute("ROLLBACK")
        raise
    return results


def _upsert_clicks(db: sqlite3.Connection, clicks: list[Click], now: float) -> None:
    text = _json_rows([[c.click_id, *(getattr(c, f) for f in CLICK_FIELDS)] for c in clicks])
    if text is None:
        db.executemany(_CLICK_UPSERT, [_click_row(c, now) for c in clicks])
    else:
        db.execute(_CLICKS_UPSERT_JSON, {"rows": text, "now": now})


def _insert_conversions(
    db: sqlite3.Connection, conversions: list[Conversion], batch: int, now: float
) -> dict[int, Ingested]:
    """Each round one statement, then one query for every id: a few steps for the whole group."""
    rounds = [_json_rows([_conversion_values(c) for c in part]) for part in _rounds(conversions)]
    if any(text is None for text in rounds):
        return _insert_conversions_rowwise(db, conversions, batch, now)
    for text in rounds:
        db.execute(_CONVERSIONS_INSERT_JSON, {"rows": text, "now": now, "batch": batch})
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
        keys = json.dumps([key for _, key in repeats])
        existing = {
            (row[0], row[1], row[2], row[3]): (row[4], row[5])
            for row in json.loads(db.execute(_EXISTING, (keys,)).fetchone()[0])
        }
        for conv, key in repeats:
            if key not in existing:  # cannot happen inside the transaction; refuse rather than lie
                raise StoreUnavailable("conversion vanished during commit")
            results[id(conv)] = Ingested("duplicate", *existing[key])
    return results


def _insert_conversions_rowwise(
    db: sqlite3.Connection, conversions: list[Conversion], batch: int, now: float
) -> dict[int, Ingested]:
    """The statement-per-row path, for the rare group that JSON cannot carry."""
    db.executemany(_CONVERSION_INSERT, [_conversion_row(c, batch, now) for c in conversions])
    inserted: dict[tuple[str, str, str, str], tuple[int, str]] = {}
    for row in db.execute(
        "SELECT id, tracker, click_id, event, transaction_id, event_id FROM conversions "
        "WHERE ingest_batch = ? AND event IS NOT NULL",
        (batch,),
    ):
        inserted[(row[1], row[2], row[3], row[4])] = (row[0], row[5])
    results: dict[int, Ingested] = {}
    claimed: set[tuple[str, str, str, str]] = set()
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
        row = db.execute(
            "SELECT id, event_id FROM conversions WHERE tracker = ? AND click_id = ? AND event = ? "
            "AND transaction_id = ?",
            key,
        ).fetchone()
        if row is None:  # cannot happen inside the transaction; refuse rather than lie
            raise StoreUnavailable("conversion vanished during commit")
        results[id(conv)] = Ingested("duplicate", row[0], row[1])
    return results


def _json_rows(rows: list[list[Any]]) -> str | None:
    """Rows as one JSON text for json_each, or None when a value holds a NUL (SQLite's JSON cuts it off)."""
    text = json.dumps(rows, separators=(",", ":"))
    return None if "\\u0000" in text else text


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


def _click_row(click: Click, now: float) -> dict[str, Any]:
    row = asdict(click)
    row["now"] = now
    return row


def _conversion_row(conv: Conversion, batch: int, now: float) -> dict[str, Any]:
    row = {f: getattr(conv, f) for f in _CONVERSION_FIELDS}
    row["event_id"] = conv.event_id
    row["state"] = PENDING if conv.event is not None else IGNORED
    row["reason"] = conv.ignored_reason
    row["next_attempt_at"] = now if conv.event is not None else None
    row["received_at"] = now
    row["finished_at"] = None if conv.event is not None else now
    row["batch"] = batch
    return row
