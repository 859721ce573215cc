"""SQLite storage: schema and migrations, group-committed ingest, the delivery queue, every query."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from bridge.enrich import events_sql
from bridge.mapping import Click, Conversion

_T = TypeVar("_T")
# A click or conversion and the future its request awaits.
_Waiting = tuple[Any, "asyncio.Future[Any]"]

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
        lease_until REAL,  -- not written since leases are kept in memory (Store.claim_due)
        sent_pixel TEXT,
        last_code INTEGER,
        last_error TEXT,
        request_id TEXT,
        match_keys TEXT,
        received_at REAL NOT NULL,
        finished_at REAL,
        ingest_batch INTEGER  -- not written since schema version 2 (dropping a column rewrites the table)
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
    # 2: the ingest group number is no longer kept; its index cost every insert a B-tree update.
    """
    DROP INDEX conversions_batch;
    """,
    # 3: no query needs (state, sent_pixel) (the counts by state read conversions_due), and the index
    # cost every insert one B-tree update and every recorded outcome two.
    """
    DROP INDEX conversions_state;
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


PRUNE_SLICE = 2000
# A slice refused with "database is locked" is asked for again, after a pause, for this long: the write
# turn can be held past the busy timeout without anything being wrong. (A commit runs SQLite's automatic
# checkpoint in the turn, and after a reader held the WAL back for minutes, copying it back takes seconds.)
PRUNE_PATIENCE = 60.0
PRUNE_PAUSE = 1.0


class StoreUnavailable(Exception):
    """The database could not commit (disk full, read-only, locked, shutting down)."""


@dataclass(frozen=True)
class Ingested:
    result: str  # accepted | duplicate | ignored
    conversion_id: int | None = None
    event_id: str | None = None


@dataclass(slots=True)
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
    answered: bool = False  # a request's outcome: code and error are its answer's (a timeout is one too)


# A group is written with one statement per table, stepped once per row, and the decisions an insert
# depends on (is it a repeat? a rebill?) are taken in Python from one query of what the group's clicks
# already have. (One multi-row `INSERT ... SELECT ... FROM (VALUES ...)` with those decisions as SQL
# subqueries did the same in fewer steps but cost SQLite three times the CPU per row.)
_CLICK_ROW = ("click_id", *CLICK_FIELDS)
_CLICKS_UPSERT = f"""
INSERT INTO clicks (click_id, {", ".join(CLICK_FIELDS)}, created_at, updated_at)
VALUES ({", ".join("?" * len(_CLICK_ROW))}, ?, ?)
ON CONFLICT (click_id) DO UPDATE SET
    {", ".join(f"{f} = COALESCE(NULLIF(clicks.{f}, ''), excluded.{f})" for f in CLICK_FIELDS)},
    updated_at = excluded.updated_at
"""  # noqa: S608 -- column names are constants; values are bound

# The values of one conversion, in this order (see _conversion_row).
_CONVERSION_ROW = (
    "id",
    *_CONVERSION_FIELDS,
    "event_id",
    "state",
    "reason",
    "next_attempt_at",
    "received_at",
    "finished_at",
)
_CONVERSION_INSERT = f"""
INSERT INTO conversions ({", ".join(_CONVERSION_ROW)}) VALUES ({", ".join("?" * len(_CONVERSION_ROW))})
"""  # noqa: S608 -- column names are constants; values are bound


# Most of a group's conversions are a click's first: this finds the few that are not in one step.
_KNOWN_MAX = 500


def _known_sql(count: int) -> str:
    return f"""
SELECT tracker, click_id, event, transaction_id, id, event_id FROM conversions
WHERE tracker = ? AND click_id IN ({",".join("?" * count)}) AND event IS NOT NULL
ORDER BY id
"""  # noqa: S608 -- placeholders only; values are bound


class Store:
    """One SQLite file. Writes go through one connection; ingest writes are group-committed."""

    def __init__(self, path: Path, busy_timeout: float = 5.0, shared: bool = False) -> None:
        """`shared`: other processes (listener processes) write to the same file all the time."""
        self.path = Path(path)
        # How long a write waits for a lock another process holds before it is refused (503).
        self.busy_timeout = busy_timeout
        self._db: aiosqlite.Connection | None = None
        self._ingest: _IngestWriter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()  # one write transaction at a time on the aiosqlite connection
        self._write_lock = _WriteTurn(
            self.path.with_name(self.path.name + ".writers") if shared else None, busy_timeout
        )
        self._closing = False
        # Claimed events by id, and when their lease runs out (see claim_due).
        self._leases: dict[int, float] = {}
        self.committed = asyncio.Event()  # set after every ingest commit that added pending events

    # -- lifetime ---------------------------------------------------------------------------------

    async def open(self, upgrade: bool = True) -> Store:
        """Open (creating it and its directory if needed) and migrate; StoreUnavailable says why not.

        With `upgrade` false (the admin commands), a database at an older schema version is refused
        instead: only the daemon upgrades, so a command run between installing a release and restarting
        the daemon never changes the schema under the daemon still running, nor the backup taken then.
        """
        try:
            if not upgrade:
                # Judged read-only, before the connection's settings (WAL) write to the file.
                await asyncio.to_thread(self._check_version)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Tried with the plain driver first: a failed aiosqlite connect leaves its thread to report
            # to an event loop that may be closed by then, a traceback at exit instead of one line.
            await asyncio.to_thread(lambda: sqlite3.connect(self.path).close())
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
            for pragma in self._pragmas():
                await self._db.execute(pragma)
            try:
                await self._db.execute("SELECT json_patch('{}', json_object('events', json_array()))")
            except sqlite3.OperationalError:
                raise StoreUnavailable(
                    f"the SQLite library ({sqlite3.sqlite_version}) was built without its JSON functions,"
                    " which the delivery worker needs (SQLite 3.38 and newer always have them)"
                ) from None
            await self._migrate()
            ingest = await asyncio.to_thread(self._connect)
            self._write_lock.open()
        except (OSError, sqlite3.Error, StoreUnavailable) as exc:
            if self._db is not None:
                await self._db.close()
                self._db = None
            if isinstance(exc, StoreUnavailable):
                raise
            raise StoreUnavailable(f"cannot open the database {self.path}: {exc}") from None
        self._loop = asyncio.get_running_loop()
        self._ingest = _IngestWriter(self, ingest, self._write_lock)
        return self

    def _pragmas(self) -> list[str]:
        """The settings of every connection the store opens."""
        return [
            f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}",
            "PRAGMA journal_mode = WAL",
            # FULL: an acknowledged conversion survives power loss, not only a process crash.
            "PRAGMA synchronous = FULL",
            "PRAGMA foreign_keys = ON",
        ]

    def _connect(self) -> sqlite3.Connection:
        """The ingest writer's connection; `check_same_thread` off to close it on its own thread."""
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        for pragma in self._pragmas():
            conn.execute(pragma)
        return conn

    async def close(self) -> None:
        self._closing = True
        if self._ingest is not None:
            await self._ingest.stop()
            self._ingest = None
        if self._db is not None:
            await self._db.close()
            self._db = None
        self._write_lock.close()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreUnavailable("database is closed")
        return self._db

    def _check_version(self) -> None:
        """The database is at this release's schema version: a command's check (see open)."""
        with contextlib.closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)) as db:
            if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'schema_version'").fetchone():
                raise StoreUnavailable(f"{self.path} is not a database the daemon has created yet")
            version = db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0
        if version < len(MIGRATIONS):
            raise StoreUnavailable(
                f"{self.path} has schema version {version} and this release's is {len(MIGRATIONS)}:"
                " the daemon upgrades it when it starts; restart it, then run this command again"
            )

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
            # A real write, committed: taking the lock alone would pass on a full disk.
            await self._write(_execute, "UPDATE schema_version SET version = version")
        except sqlite3.Error as exc:
            return f"database is not writable: {exc}"
        return None

    # -- group-committed ingest ---------------------------------------------------------------------

    def add_click(self, click: Click) -> asyncio.Future[None]:
        """Resolves once the click is committed; StoreUnavailable if it could not be."""
        return self._submit(click)

    def add_conversion(self, conversion: Conversion) -> asyncio.Future[Ingested]:
        """Resolves once the conversion is committed, with what became of it."""
        return self._submit(conversion)

    def _submit(self, item: Click | Conversion) -> asyncio.Future[Any]:
        if self._closing or self._ingest is None:
            raise StoreUnavailable("shutting down")
        future: asyncio.Future[Any] = self._loop.create_future()
        self._ingest.put((item, future))
        return future

    def _answer(self, work: list[_Waiting], results: dict[int, Ingested] | Exception) -> None:
        """On the event loop: every waiter of a committed (or failed) group gets its answer."""
        if isinstance(results, Exception):
            error = (
                results
                if isinstance(results, StoreUnavailable)
                else StoreUnavailable(f"could not commit: {results}")
            )
            for _, fut in work:
                if not fut.done():
                    fut.set_exception(error)
            return
        accepted = False
        for item, fut in work:
            result = results.get(id(item))
            if result is not None and result.result == "accepted":
                accepted = True
            if not fut.done():
                fut.set_result(result)
        if accepted:
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

    async def _write_on_db_thread(self, fn: Callable[..., _T], *args: Any, limited: bool = False) -> _T:
        """As _on_db_thread, for a write transaction: it and the ingest writer's take turns. `limited`:
        give up after the busy timeout (see _WriteTurn.limited)."""
        lock = self._write_lock

        def locked(conn: sqlite3.Connection) -> _T:
            with lock.limited() if limited else lock:
                return fn(conn, *args)

        return await self._on_db_thread(locked)

    # -- delivery queue ---------------------------------------------------------------------------------

    async def _write(self, fn: Callable[..., _T], *args: Any) -> _T:
        """`fn(connection, *args)` in one transaction, in the write turn: a write other than ingest and
        the worker's cycle (maintenance, `failed retry`, the /readyz probe). In the turn, ingest groups
        wait for it on a lock that wakes them the moment it is done, not in SQLite's busy handler, which
        polls with sleeps of milliseconds. (The CLI's own store has no listener processes' flock: its
        writes meet the daemon's in SQLite's busy handler, as before.)"""
        async with self._lock:
            return await self._write_on_db_thread(_in_transaction, fn, *args, limited=True)

    def release(self, ids: Iterable[int] | None = None) -> None:
        """Make claimed events (the given ones, or all) due again at once: their answers are recorded,
        or the worker stops before they came."""
        if ids is None:
            self._leases.clear()
            return
        for conversion_id in ids:
            self._leases.pop(conversion_id, None)

    def _held(self, now: float) -> str:
        """The ids whose lease has not run out, as a JSON array for `json_each`."""
        leases = self._leases
        for conversion_id in [i for i, until in leases.items() if until <= now]:
            del leases[conversion_id]
        return json.dumps(list(leases))

    async def claim_due(self, now: float, limit: int, lease: float) -> list[sqlite3.Row]:
        """Lease up to `limit` due events, each merged with its click into the event to send (rows of
        bridge.enrich.events_sql, by id); a lease that runs out makes them due again.

        Leases live in this process only: a claim writes nothing, so delivery writes each event's row
        once, with its outcome. After a crash nothing is leased: what was on its way is sent again
        (TikTok dedupes on event + event_id), as it was when leases were rows that start-up cleared.
        """
        held = self._held(now)

        def claim(db: sqlite3.Connection) -> list[sqlite3.Row]:
            ids = [row[0] for row in db.execute(_CLAIM, (now, held, limit))]
            return _claimed_events(db, ids)

        # One call on the database thread, not an await per statement (see _on_db_thread). A read:
        # it needs neither the write turn nor the store's write lock.
        rows = await self._on_db_thread(claim)
        until = now + lease
        for row in rows:
            self._leases[row["id"]] = until
        return rows

    async def apply(self, outcomes: Sequence[Outcome], now: float) -> None:
        """Record the worker's outcomes for one cycle in one transaction.

        Outcomes alike but for the event are written by one statement: a delivered batch is one
        UPDATE of a list of ids (per set of match keys), not a row of parameters per event.
        """
        if not outcomes:
            return
        groups: dict[tuple[Any, ...], list[int]] = {}
        for o in outcomes:
            finished_at = None if o.state == PENDING else now
            key = (
                o.state,
                o.next_attempt_at,
                1 if o.count_attempt else 0,
                o.sent_pixel,
                o.code,
                o.error,
                o.request_id,
                o.match_keys,
                finished_at,
                o.answered,
            )
            groups.setdefault(key, []).append(o.id)
        # The worker gives each claimed event one outcome per cycle, so the groups' order does not matter.
        rows = [(json.dumps(ids), *key) for key, ids in groups.items()]
        async with self._lock:
            # One call on the database thread, not an await per statement (see _on_db_thread).
            await self._write_on_db_thread(_in_transaction, _apply, rows)
        # Recorded: the leases are done with. (Had the transaction failed, they would stay held; the
        # worker records these outcomes again before it claims anything else.)
        self.release(o.id for o in outcomes)

    async def set_pixel_status(
        self, pixel: str, healthy: bool, code: int | None, error: str | None, now: float
    ) -> None:
        await self._write(
            _execute,
            "INSERT INTO pixel_status (pixel, healthy, last_code, last_error, updated_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (pixel) DO UPDATE SET healthy = excluded.healthy, "
            # Code and message are the last error's, together: a hold without a code (a token that
            # cannot be sent) does not keep an earlier code; a recovery (neither) keeps both.
            "last_code = CASE WHEN excluded.last_error IS NOT NULL THEN excluded.last_code "
            "ELSE last_code END, "
            "last_error = COALESCE(excluded.last_error, last_error), updated_at = excluded.updated_at",
            (pixel, int(healthy), code, error, now),
        )

    async def pending_count(self) -> int:
        return await self._scalar("SELECT COUNT(*) FROM conversions WHERE state = 'pending'") or 0

    async def next_due_at(self) -> float | None:
        return await self._scalar("SELECT MIN(next_attempt_at) FROM conversions WHERE state = 'pending'")

    async def make_due(self, now: float, pixels: Iterable[str] | None = None) -> int:
        """Bring waiting events forward to now (after a reload fixed a pixel's token)."""
        if pixels is None:
            return await self._write(
                _execute,
                "UPDATE conversions SET next_attempt_at = ? WHERE state = 'pending' AND next_attempt_at > ?",
                (now, now),
            )
        names = sorted(set(pixels))
        marks = ",".join("?" * len(names))
        return await self._write(
            _execute,
            f"UPDATE conversions SET next_attempt_at = ? WHERE state = 'pending' "  # noqa: S608
            f"AND next_attempt_at > ? AND sent_pixel IN ({marks})",
            (now, now, *names),
        )

    async def bring_forward(self, now: float, pixel: str) -> tuple[int, float] | None:
        """Make the pixel's next waiting event due now (an outage probe).

        Returns its id and when it was due before, or None when none of the pixel's events waits.
        """

        held = self._held(now)

        def probe(db: sqlite3.Connection) -> tuple[int, float] | None:
            row = db.execute(
                "SELECT id, next_attempt_at FROM conversions WHERE state = 'pending' AND sent_pixel = ? "
                "AND next_attempt_at > ? AND id NOT IN (SELECT value FROM json_each(?)) "
                "ORDER BY next_attempt_at LIMIT 1",
                (pixel, now, held),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE conversions SET next_attempt_at = ? WHERE id = ? AND state = 'pending'", (now, row[0])
            )
            return row[0], row[1]

        return await self._write(probe)

    # -- inspection and maintenance ---------------------------------------------------------------------

    async def conversion(self, conversion_id: int) -> sqlite3.Row | None:
        rows = await self.fetchall("SELECT * FROM conversions WHERE id = ?", (conversion_id,))
        return rows[0] if rows else None

    async def prune(self, now: float, clicks_age: float, finished_age: float) -> tuple[int, int]:
        """Delete clicks and finished conversions past retention. Pending conversions are never pruned,
        nor the clicks of pending or failed ones (`failed retry` sends those again): a click fills in
        its event when the event is sent, not before.

        In slices of PRUNE_SLICE rows, each its own short transaction, so the first prune of a
        large database never holds up ingest (which waits for the same lock) for long.
        """
        totals = []
        for sql, cutoff in (
            (
                "DELETE FROM clicks WHERE click_id IN (SELECT click_id FROM clicks WHERE created_at < ? "
                "AND click_id NOT IN (SELECT click_id FROM conversions WHERE state IN ('pending', 'failed')) "
                "LIMIT ?)",
                now - clicks_age,
            ),
            (
                # Never the newest row: new ids follow the largest one (see _insert_conversions), and
                # a conversion_id given to a tracker, written in a log line or kept for `failed retry`
                # must not name another conversion later.
                "DELETE FROM conversions WHERE id IN (SELECT id FROM conversions "
                "WHERE finished_at IS NOT NULL AND finished_at < ? "
                "AND id < (SELECT MAX(id) FROM conversions) LIMIT ?)",
                now - finished_age,
            ),
        ):
            total = 0
            while True:
                deleted = await self._prune_slice(sql, cutoff)
                total += deleted
                if deleted < PRUNE_SLICE:
                    break
                await asyncio.sleep(0)  # let waiting commits through between slices
            totals.append(total)
        return totals[0], totals[1]

    async def _prune_slice(self, sql: str, cutoff: float) -> int:
        """One slice of prune; refused with "database is locked", asked for again for PRUNE_PATIENCE,
        with a pause between tries that lets the database thread serve the worker."""
        deadline = time.monotonic() + PRUNE_PATIENCE
        while True:
            try:
                return await self._write(_execute, sql, (cutoff, PRUNE_SLICE))
            except sqlite3.OperationalError as exc:
                if not str(exc).startswith("database is locked") or time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(PRUNE_PAUSE)

    async def requeue_failed(self, ids: Sequence[int] | None, now: float, oldest_event_time: float) -> int:
        """Move dead letters (all, or the given ids) back to pending with a fresh attempt count; those
        whose event_time is before `oldest_event_time` stay failed (they would only expire)."""
        sql = (
            "UPDATE conversions SET state = 'pending', attempts = 0, next_attempt_at = ?, "
            "finished_at = NULL WHERE state = 'failed' AND event_time >= ?"
        )
        if ids is None:
            return await self._write(_execute, sql, (now, oldest_event_time))
        return await self._write(
            _execute_many, sql + " AND id = ?", [(now, oldest_event_time, i) for i in ids]
        )


class _WriteTurn:
    """Whose turn it is to write: the threads of this process (a lock) and, with listener processes,
    the other processes too (an flock on `<db>.writers`).

    SQLite serialises writers on its own, and stays what keeps the data right; but a writer that finds
    the database locked polls with sleeps of one, two, five milliseconds and more, while these wake the
    next writer the moment the last one is done. For ingest and delivery the flock has no time limit: a
    bridge process stalled while it holds the turn (stopped with SIGSTOP, say) holds up the others'
    writes until it goes on or goes away, where SQLite alone would answer 503 after busy_timeout. Other
    writes take `limited()`, which gives up after busy_timeout.
    """

    def __init__(self, path: Path | None, timeout: float) -> None:
        self._thread_lock = threading.Lock()
        self._path = path
        self._fd: int | None = None
        self._timeout = timeout

    def open(self) -> None:
        if self._path is not None and self._fd is None:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> None:
        self._take(limited=False)

    def __exit__(self, *exc: object) -> None:
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    @contextlib.contextmanager
    def limited(self) -> Iterator[None]:
        """The turn, for a write that is neither ingest nor delivery (maintenance, the /readyz probe):
        given up with "database is locked" after the busy timeout, as SQLite would, rather than waiting
        for a stalled process without end."""
        self._take(limited=True)
        try:
            yield
        finally:
            self.__exit__()

    def _take(self, limited: bool) -> None:
        deadline = time.monotonic() + self._timeout
        if not self._thread_lock.acquire(timeout=self._timeout):
            raise sqlite3.OperationalError(
                f"database is locked: the write turn was not free for {self._timeout:g} s"
            )
        if self._fd is None:
            return
        try:
            if not limited:
                # Blocking: the kernel hands the lock to the waiting process as soon as it is free. Tried
                # without blocking, a busy process took its turn again before the other one looked, and
                # the other one's requests waited hundreds of milliseconds.
                fcntl.flock(self._fd, fcntl.LOCK_EX)
                return
            # Polled: such writes are rare, and the fairness that made ingest block does not matter.
            pause = 0.001
            while True:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise sqlite3.OperationalError(
                            "database is locked: another bridge process held the write turn for"
                            f" {self._timeout:g} s"
                        ) from None
                    time.sleep(pause)
                    pause = min(pause * 2, 0.02)
        except BaseException:
            self._thread_lock.release()
            raise


class _IngestWriter:
    """A thread with a connection of its own that commits, in one transaction, everything that queued
    while it committed the last group, and hands the answers back to the event loop in one call.

    It starts the next group as soon as a commit returns, without waiting for a turn of the busy event
    loop, so the listener parses the next requests while SQLite commits the last ones. Write
    transactions of the other connection (the worker's outcomes, maintenance) take `write_lock` too,
    so neither waits in SQLite's busy handler, which polls with sleeps of milliseconds.
    """

    STOP = object()

    def __init__(self, store: Store, conn: sqlite3.Connection, write_lock: _WriteTurn) -> None:
        self._store = store
        self._conn = conn
        self._write_lock = write_lock
        self._loop = asyncio.get_running_loop()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.max_group = 1024
        self._thread = threading.Thread(target=self._run, name="ingest-writer", daemon=True)
        self._thread.start()

    def put(self, entry: _Waiting) -> None:
        self._queue.put(entry)

    async def stop(self) -> None:
        """Commit what is queued, refuse what comes later, close the connection."""
        self._queue.put(self.STOP)
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        stopping = False
        try:
            while not stopping:
                work: list[_Waiting] = []
                stopping = self._gather(work, self._queue.get())
                if work:
                    stopping = self._commit(work) or stopping
            # Whatever arrived after the stop marker is refused, never left hanging.
            late: list[_Waiting] = []
            while True:
                try:
                    entry = self._queue.get_nowait()
                except queue.Empty:
                    break
                if entry is not self.STOP:
                    late.append(entry)
            if late:
                self._reply(late, StoreUnavailable("shutting down"))
        finally:
            self._conn.close()

    def _gather(self, work: list[_Waiting], entry: Any = None) -> bool:
        """Add `entry` and what is queued to `work`, up to max_group; True if the stop marker came."""
        while len(work) < self.max_group:
            if entry is None:
                try:
                    entry = self._queue.get_nowait()
                except queue.Empty:
                    return False
            if entry is self.STOP:
                return True
            work.append(entry)
            entry = None
        return False

    def _commit(self, work: list[_Waiting]) -> bool:
        """Commit `work` as one group; True if the stop marker came while it waited for the turn."""
        stopping = False
        result: dict[int, Ingested] | Exception
        try:
            with self._write_lock:
                # What queued while the turn was busy (the worker's outcomes, another process's group)
                # joins this group rather than waiting for one more commit after it.
                stopping = self._gather(work)
                clicks = [item for item, _ in work if isinstance(item, Click)]
                conversions = [item for item, _ in work if isinstance(item, Conversion)]
                result = _write_group(self._conn, clicks, conversions, time.time())
        except Exception as exc:  # the writer must survive anything: every waiter gets its answer
            result = exc
        self._reply(work, result)
        return stopping

    def _reply(self, work: list[_Waiting], result: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(self._store._answer, work, result)


def _write_group(
    db: sqlite3.Connection, clicks: list[Click], conversions: list[Conversion], now: float
) -> dict[int, Ingested]:
    """One group in one transaction, on the ingest writer's thread; the results by id() of each conversion."""
    db.execute("BEGIN IMMEDIATE")
    try:
        if clicks:
            rows = [(c.click_id, *[getattr(c, f) for f in CLICK_FIELDS], now, now) for c in clicks]
            db.executemany(_CLICKS_UPSERT, rows)
        results = _insert_conversions(db, conversions, now) if conversions else {}
        db.execute("COMMIT")
    except BaseException:
        # A failed ROLLBACK (disk gone) must not hide the first error or kill the writer.
        with contextlib.suppress(sqlite3.Error):
            if db.in_transaction:
                db.execute("ROLLBACK")
        raise
    return results


# A click's conversions of one event, as (transaction_id, conversion id, event_id), oldest first.
Recorded = Sequence[tuple[str, int, str]]


def repeat_of(same: Recorded, transaction_id: str) -> tuple[str, int, str] | None:
    """The recorded conversion that a new one of the same click and event repeats, if any: the one
    with its transaction id, or without one, the click's first."""
    if transaction_id == "":
        return same[0] if same else None
    return next((s for s in same if s[0] == transaction_id), None)


def rebill_event_id(same: Recorded, transaction_id: str, event_id: str | None) -> str | None:
    """A rebill (the event again, with another transaction id) gets `_{transaction_id}` appended, or
    TikTok would dedupe it away as a repeat of the first."""
    return f"{event_id}_{transaction_id}" if transaction_id != "" and same else event_id


def _insert_conversions(
    db: sqlite3.Connection, conversions: list[Conversion], now: float
) -> dict[int, Ingested]:
    """Decide, in arrival order, what each conversion is, and insert the new ones.

    - a repeat (same tracker, click, event and transaction id) is a duplicate of the first;
    - without a transaction id, a conversion for a click that already has that event cannot be told
      apart from a repeat: a duplicate of the click's first such conversion;
    - a second conversion of one event for one click with another transaction id (a rebill) gets
      `_{transaction_id}` appended to its event_id, or TikTok would dedupe it away as a repeat.

    The ids are given here (the table's largest plus one, and so on: the write lock is held), so the
    answers need no query after the insert. The unique index on the identity stays as a safety net: a
    decision that missed a repeat fails the whole group (503), it never stores the repeat twice.
    """
    known: dict[tuple[str, str, str], list[tuple[str, int, str]]] = {}
    by_tracker: dict[str, set[str]] = {}
    for conv in conversions:
        if conv.event is not None:
            by_tracker.setdefault(conv.tracker, set()).add(conv.click_id)
    for tracker, click_ids in by_tracker.items():
        ids = sorted(click_ids)
        for start in range(0, len(ids), _KNOWN_MAX):
            chunk = ids[start : start + _KNOWN_MAX]
            for row in db.execute(_known_sql(len(chunk)), (tracker, *chunk)):
                known.setdefault((row[0], row[1], row[2]), []).append((row[3], row[4], row[5]))
    next_id = db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM conversions").fetchone()[0]
    rows: list[tuple[Any, ...]] = []
    results: dict[int, Ingested] = {}
    for conv in conversions:
        state, event_id, result = IGNORED, conv.event_id, Ingested("ignored")
        if conv.event is not None:
            same = known.setdefault((conv.tracker, conv.click_id, conv.event), [])
            tid = conv.transaction_id
            repeat = repeat_of(same, tid)
            if repeat is not None:
                results[id(conv)] = Ingested("duplicate", repeat[1], repeat[2])
                continue
            event_id = rebill_event_id(same, tid, event_id)
            same.append((tid, next_id, event_id))
            state, result = PENDING, Ingested("accepted", next_id, event_id)
        results[id(conv)] = result
        rows.append(_conversion_row(conv, next_id, event_id, state, now))
        next_id += 1
    if rows:
        db.executemany(_CONVERSION_INSERT, rows)
    return results


def _in_transaction(db: sqlite3.Connection, fn: Callable[..., _T], *args: Any) -> _T:
    """`fn(db, *args)` inside BEGIN IMMEDIATE ... COMMIT, rolled back if it raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        result = fn(db, *args)
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):  # a failed ROLLBACK (disk gone) must not hide the cause
            if db.in_transaction:
                db.execute("ROLLBACK")
        raise
    return result


def _execute(db: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> int:
    return db.execute(sql, params).rowcount


def _execute_many(db: sqlite3.Connection, sql: str, rows: Sequence[Sequence[Any]]) -> int:
    return db.executemany(sql, rows).rowcount


# Due events, but those leased (?2: a JSON array of ids): a read, in the order they fell due.
_CLAIM = """
SELECT id FROM conversions
WHERE state = 'pending' AND next_attempt_at <= ?1 AND id NOT IN (SELECT value FROM json_each(?2))
ORDER BY next_attempt_at LIMIT ?3
"""
_CLAIMED_EVENTS = events_sql(
    "conversions c LEFT JOIN clicks k ON k.click_id = c.click_id"
    " WHERE c.id IN (SELECT value FROM json_each(?))"
)


def _claimed_events(db: sqlite3.Connection, ids: list[int]) -> list[sqlite3.Row]:
    if not ids:
        return []
    cursor = db.execute(_CLAIMED_EVENTS, (json.dumps(ids),))
    cursor.row_factory = sqlite3.Row
    return cursor.fetchall()


# A group of outcomes (Store.apply): the ids as a JSON array, then what happened to all of them.
_APPLY = """
UPDATE conversions SET
    state = ?2, next_attempt_at = ?3,
    attempts = attempts + ?4,
    sent_pixel = COALESCE(?5, sent_pixel),
    -- Code and message describe one answer: an answer without a code (HTTP 502, a timeout) does not
    -- leave the code of an earlier one beside its message. An outcome without an answer (a wait, an
    -- expiry) keeps the last answer's code.
    last_code = CASE WHEN ?11 THEN ?6 ELSE COALESCE(?6, last_code) END,
    last_error = CASE WHEN ?2 IN ('delivered', 'delivered_dry_run') THEN NULL
                      ELSE COALESCE(?7, last_error) END,
    request_id = COALESCE(?8, request_id),
    match_keys = COALESCE(?9, match_keys),
    finished_at = ?10
WHERE id IN (SELECT value FROM json_each(?1)) AND state = 'pending'
"""


def _apply(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    db.executemany(_APPLY, rows)


def _conversion_row(
    conv: Conversion, id_: int, event_id: str | None, state: str, now: float
) -> tuple[Any, ...]:
    pending = state == PENDING
    return (
        id_,
        *[getattr(conv, f) for f in _CONVERSION_FIELDS],
        event_id,
        state,
        conv.ignored_reason,
        now if pending else None,
        now,
        None if pending else now,
    )
