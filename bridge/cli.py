"""The command line: `postback-bridge run | check-config | explain | stats | failed | test-event | prune`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import aiohttp

from bridge import __version__
from bridge.config import Config, ConfigError, load_config, resolve_config_path, unreadable_by_the_service
from bridge.enrich import explain as explain_event
from bridge.logs import configure
from bridge.mapping import BadParameter, build_conversion, check_pixel, ignored_why
from bridge.retry import FIX_UNCONFIGURED
from bridge.store import Recorded, Store, StoreUnavailable, rebill_event_id, repeat_of
from bridge.tiktok import TikTokClient, build_payload
from bridge.web import MAX_URL, URL_TOO_LARGE, decode_pairs


class CommandError(Exception):
    """A problem the user can fix; printed as one line, exit status 1."""


def _config(args: argparse.Namespace) -> Config:
    return load_config(resolve_config_path(args.config))


def _database(config: Config) -> Path | None:
    """storage.path if something is there, else None; something that is not a file is refused, as
    SQLite would only call it a disk I/O error (and a read-only open of a FIFO would wait forever)."""
    path = config.db_path
    if not path.exists():
        return None
    if not path.is_file():
        kind = "a directory" if path.is_dir() else "a special file (a FIFO, socket or device)"
        raise CommandError(f"storage.path {path} is {kind}, not a database file")
    return path


async def _open_store(config: Config) -> Store:
    if _database(config) is None:
        raise CommandError(f"no database at {config.db_path} yet (storage.path); has the daemon run?")
    try:
        return await Store(config.db_path).open(upgrade=False)
    except StoreUnavailable as exc:
        raise CommandError(str(exc)) from None


# -- commands -----------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from bridge.daemon import run

    configure()
    run(resolve_config_path(args.config))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _config(args)
    for warning in [*config.warnings, *unreadable_by_the_service(config)]:
        print(f"warning: {warning}", file=sys.stderr)
    if config.settings.tiktok.dry_run:
        mode = "dry run (nothing is sent to TikTok)"
    elif testing := config.settings.test_event_pixels():
        mode = f"live, test events only for {', '.join(testing)}"
    else:
        mode = "live"
    print(
        f"{config.path}: OK, {len(config.trackers)} tracker(s) "
        f"({', '.join(sorted(config.trackers)) or 'none'}), "
        f"{len(config.settings.pixels)} pixel(s), {mode}"
    )
    return 0


def explain(
    config: Config, url: str, click: Any = None, same: Recorded | None = None, now: float | None = None
) -> dict[str, Any]:
    """What the bridge would do with a postback URL: rejected, ignored, a duplicate, or the event it
    would send. `click` and `same` (the click's recorded conversions of the event, see store.repeat_of)
    come from the database; `same` None: not known. A URL that cannot be parsed is a CommandError."""
    now = time.time() if now is None else now
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # a host no tracker could have sent to: `http://[::1/postback/...`
        raise CommandError(f"explain: cannot read the URL: {exc}") from None
    if len(parts.path + (f"?{parts.query}" if parts.query else "")) > MAX_URL:  # as the listener measures
        return {"result": "rejected", "status": 413, "why": URL_TOO_LARGE}
    segments = [s for s in parts.path.split("/") if s]
    if len(segments) != 2 or segments[0] != "postback":
        return {"result": "rejected", "status": 404, "why": "the path must be /postback/{tracker}"}
    tracker = config.trackers.get(segments[1])
    if tracker is None:
        known = ", ".join(sorted(config.trackers)) or "none"
        return {
            "result": "rejected",
            "status": 404,
            "why": f"unknown tracker {segments[1]!r} (known: {known})",
        }
    params: dict[str, str] = {}
    # Read as the listener reads it (invalid UTF-8 is a 400), the key checked first as there.
    unreadable: BadParameter | None = None
    try:
        pairs = decode_pairs(parts.query, "query")
    except BadParameter as exc:
        pairs, unreadable = parse_qsl(parts.query, keep_blank_values=True), exc
    for name, value in pairs:
        params.setdefault(name, value)
    if tracker.key and params.get("key") != tracker.key:
        return {
            "result": "rejected",
            "status": 403,
            "why": "wrong or missing key (the key itself is not shown)",
        }
    if unreadable is not None:
        return {"result": "rejected", "status": 400, "why": str(unreadable)}
    try:
        conversion = build_conversion(tracker, params, now, config.settings.matching.default_phone_region)
        check_pixel(conversion, config)
    except BadParameter as exc:
        return {"result": "rejected", "status": 400, "why": str(exc)}
    if conversion.event is None:
        return {
            "result": "ignored",
            "reason": conversion.ignored_reason,
            "status_value": conversion.status,
            "why": ignored_why(tracker, params, conversion),
        }
    repeat = repeat_of(same or (), conversion.transaction_id)
    if repeat is not None:
        return {
            "result": "duplicate",
            "conversion_id": repeat[1],
            "event_id": repeat[2],
            "why": "this conversion is recorded already; nothing new would be sent",
        }
    row = {
        **{field: getattr(conversion, field) for field in conversion.__dataclass_fields__},
        "event_id": rebill_event_id(same or (), conversion.transaction_id, conversion.event_id),
    }
    prepared = explain_event(row, click)
    pixel = config.route_pixel(prepared.pixel_refs)
    result: dict[str, Any] = {
        "result": "accepted",
        "tracker": tracker.name,
        "click_id": conversion.click_id,
        "pixel": pixel,
        "pixel_code": config.pixel(pixel).code if config.configured(pixel) else None,
        "click_found": click is not None,
        "match_keys": list(prepared.match_keys),
        "event": prepared.event,
    }
    if now - conversion.event_time > config.settings.delivery.max_event_age:
        result["warning"] = (
            "event_time is older than delivery.max_event_age: it would be recorded, then expire unsent"
        )
    elif not prepared.match_keys:
        result["warning"] = (
            "no match key (ttclid, ttp, ip+user_agent, email, phone, external_id): would be unmatched"
        )
    elif not config.configured(pixel):
        result["warning"] = f"the click names pixel {pixel!r}, which is not in the config: {FIX_UNCONFIGURED}"
    if conversion.dropped:
        result["dropped"] = list(conversion.dropped)
    if conversion.transaction_id and same is None:
        result["note"] = (
            "if this click already has this event with another transaction id, "
            f"the event_id gets the suffix _{conversion.transaction_id}"
        )
    return result


def _recorded(config: Config, click_id: str, tracker: str, event: str | None) -> tuple[Any, list[Any] | None]:
    """The stored click, and the click's conversions of this event (None without a database)."""

    def read(db: sqlite3.Connection) -> tuple[Any, list[Any]]:
        click = db.execute("SELECT * FROM clicks WHERE click_id = ?", (click_id,)).fetchone()
        same = db.execute(
            "SELECT transaction_id, id, event_id FROM conversions"
            " WHERE tracker = ? AND click_id = ? AND event = ? ORDER BY id",
            (tracker, click_id, event),
        ).fetchall()
        return click, [tuple(row) for row in same]

    return _read_only(config, read) or (None, None)


# What `explain` shows of a recorded conversion: where its delivery stands.
_DELIVERY = ("state", "attempts", "sent_pixel", "last_code", "last_error", "request_id")


def _delivery(config: Config, conversion_id: int) -> dict[str, Any] | None:
    def read(db: sqlite3.Connection) -> dict[str, Any] | None:
        row = db.execute(
            f"SELECT {', '.join(_DELIVERY)} FROM conversions WHERE id = ?",  # noqa: S608 -- constant columns
            (conversion_id,),
        ).fetchone()
        return None if row is None else {key: row[key] for key in _DELIVERY if row[key] is not None}

    return _read_only(config, read)


_T = TypeVar("_T")


def _read_only(config: Config, read: Callable[[sqlite3.Connection], _T]) -> _T | None:
    """`read(db)` on the database opened read-only (explain writes nothing); None without one. One that
    cannot be read is an error, not taken for none: explain would say a repeat is new."""
    path = _database(config)
    if path is None:
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return read(db)
    except sqlite3.Error as exc:
        raise CommandError(f"cannot open the database {path}: {exc}") from None
    finally:
        db.close()


def cmd_explain(args: argparse.Namespace) -> int:
    config = _config(args)
    result = explain(config, args.url)
    if result["result"] == "accepted":
        click, same = _recorded(config, result["click_id"], result["tracker"], result["event"]["event"])
        result = explain(config, args.url, click=click, same=same)
        if result["result"] == "duplicate":
            # The recorded one, to follow: its state, and TikTok's request_id or its last error.
            result["recorded"] = _delivery(config, result["conversion_id"])
    print(json.dumps(result, indent=2))
    return 0 if result["result"] != "rejected" else 1


def cmd_stats(args: argparse.Namespace) -> int:
    from bridge.stats import NOT_ROUTED, collect, format_stats

    async def go(config: Config) -> dict[str, Any]:
        store = await _open_store(config)
        try:
            return await collect(store)
        finally:
            await store.close()

    config = _config(args)
    summary = asyncio.run(go(config))
    # From the config file, as the daemon reads it at its next start or reload.
    summary["test_event_pixels"] = config.settings.test_event_pixels()
    summary["unconfigured_pixels"] = sorted(
        pixel
        for pixel, entry in summary["pixels"].items()
        if entry["states"]["pending"] and pixel != NOT_ROUTED and not config.configured(pixel)
    )
    print(json.dumps(summary, indent=2) if args.json else format_stats(summary))
    return 0


# What an SQLite INTEGER holds: a conversion ID is one, so an ID typed outside it is no conversion's.
_SQLITE_INTEGER = range(-(2**63), 2**63)

FAILED_COLUMNS = (
    "id",
    "tracker",
    "click_id",
    "event",
    "event_id",
    "sent_pixel",
    "attempts",
    "last_code",
    "last_error",
    "received_at",
)


def cmd_failed(args: argparse.Namespace) -> int:
    async def go() -> int:
        config = _config(args)
        store = await _open_store(config)
        try:
            if args.failed_command == "list":
                rows = await store.fetchall(
                    f"SELECT {', '.join(FAILED_COLUMNS)} FROM conversions WHERE state = 'failed' "  # noqa: S608
                    "ORDER BY id"
                )
                items = [dict(row) for row in rows]
                if args.json:
                    print(json.dumps(items, indent=2))
                elif not items:
                    print("no failed events")
                else:
                    for item in items:
                        code = "" if item["last_code"] is None else f"[{item['last_code']}] "
                        print(
                            f"{item['id']}\t{item['tracker']}\t{item['event']}\t{item['event_id']}\t"
                            f"pixel={item['sent_pixel']}\tattempts={item['attempts']}\t"
                            f"{code}{item['last_error']}"
                        )
                return 0
            if args.all and args.ids:
                raise CommandError("failed retry: give conversion IDs or --all, not both")
            if not args.all and not args.ids:
                raise CommandError(
                    "failed retry: give the conversion IDs to retry (see failed list), or --all"
                )
            now = time.time()
            max_age = config.settings.delivery.max_event_age
            too_old = f"older than delivery.max_event_age ({max_age:g} s), so it would only expire"
            left = 0
            if args.all:
                count = await store.requeue_failed(None, now, now - max_age)
                left = (await store.fetchall("SELECT COUNT(*) FROM conversions WHERE state = 'failed'"))[0][0]
            else:
                ids = sorted(set(args.ids))
                # One SQLite cannot hold would not even be looked up: it "does not exist", as any other.
                storable = [i for i in ids if i in _SQLITE_INTEGER]
                marks = ",".join("?" * len(storable))
                found = {
                    row["id"]: row
                    for row in await store.fetchall(
                        f"SELECT id, state, event_time FROM conversions WHERE id IN ({marks})",  # noqa: S608
                        storable,
                    )
                }
                wrong = [
                    f"{i} {why}"
                    for i in ids
                    if (why := _not_retryable(found.get(i), now - max_age, too_old)) is not None
                ]
                if wrong:
                    # All or nothing: a mistyped id must not leave the operator guessing what was done.
                    raise CommandError(f"failed retry: nothing requeued: {'; '.join(wrong)}")
                count = await store.requeue_failed(ids, now, now - max_age)
            print(f"requeued {count} event(s); the running daemon sends them within a second")
            if left:
                print(f"left {left} failed: each is {too_old}")
            return 0
        finally:
            await store.close()

    return asyncio.run(go())


def _not_retryable(row: sqlite3.Row | None, oldest_event_time: float, too_old: str) -> str | None:
    if row is None:
        return "does not exist"
    if row["state"] != "failed":
        return f"is {row['state']}, not failed"
    if row["event_time"] < oldest_event_time:
        return f"is {too_old}"
    return None


def cmd_prune(args: argparse.Namespace) -> int:
    async def go() -> tuple[int, int]:
        config = _config(args)
        store = await _open_store(config)
        try:
            retention = config.settings.retention
            return await store.prune(time.time(), retention.clicks, retention.finished_conversions)
        finally:
            await store.close()

    clicks, conversions = asyncio.run(go())
    print(f"pruned {clicks} click(s) and {conversions} finished conversion(s)")
    return 0


def cmd_test_event(args: argparse.Namespace) -> int:
    config = _config(args)
    name = config.pixel_name(args.pixel)
    if name is None:
        raise CommandError(
            f"unknown pixel {args.pixel!r} (known: {', '.join(sorted(config.settings.pixels))})"
        )
    pixel = config.pixel(name)
    if not pixel.test_event_code:
        raise CommandError(
            f"pixels.{name}.test_event_code is empty: copy it from Events Manager > Test Events first"
        )
    now = int(time.time())
    event = {
        "event": "ViewContent",
        "event_time": now,
        "event_id": f"postback-bridge-test-{now}",
        "user": {"ip": "203.0.113.7", "user_agent": f"postback-bridge/{__version__} test-event"},
        "page": {"url": "https://example.com/postback-bridge-test"},
    }
    payload = build_payload(
        pixel.code, [json.dumps(event)], config.settings.tiktok.partner_name or None, pixel.test_event_code
    )

    async def go() -> Any:
        async with aiohttp.ClientSession() as session:
            client = TikTokClient(session, config.settings.tiktok.endpoint, config.settings.tiktok.timeout)
            return await client.send(pixel.access_token, payload)

    answer = asyncio.run(go())
    print(
        json.dumps(
            {
                "pixel": name,
                "result": answer.kind.value,
                "code": answer.code,
                "message": answer.message,
                "request_id": answer.request_id,
                "http_status": answer.http_status,
            },
            indent=2,
        )
    )
    return 0 if answer.kind.value == "delivered" else 1


# -- parser -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    config_help = "main config file (default: $POSTBACK_BRIDGE_CONFIG, else config/bridge.yaml)"
    # `-c` is accepted before or after the command; after it, SUPPRESS keeps a value given before.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=argparse.SUPPRESS, help=config_help)
    parser = argparse.ArgumentParser(
        prog="postback-bridge",
        description="Relays tracker S2S postbacks to the TikTok Events API.",
    )
    parser.add_argument("-c", "--config", default=None, help=config_help)
    parser.add_argument("--version", action="version", version=f"postback-bridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", parents=[common], help="run the daemon").set_defaults(func=cmd_run)
    sub.add_parser("check-config", parents=[common], help="validate config and tracker files").set_defaults(
        func=cmd_check_config
    )
    p = sub.add_parser("explain", parents=[common], help="dry-run a postback URL through the mapping")
    p.add_argument("url", help="the postback as a tracker would send it, e.g. '/postback/keitaro?subid=...'")
    p.set_defaults(func=cmd_explain)
    p = sub.add_parser("stats", parents=[common], help="counts by state and pixel, match-key coverage")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)
    p = sub.add_parser("failed", parents=[common], help="inspect and requeue dead letters")
    failed = p.add_subparsers(dest="failed_command", required=True, metavar="list|retry")
    fl = failed.add_parser("list", parents=[common])
    fl.add_argument("--json", action="store_true")
    fl.set_defaults(func=cmd_failed)
    fr = failed.add_parser("retry", parents=[common])
    fr.add_argument("--all", action="store_true", help="requeue every failed event")
    fr.add_argument("ids", nargs="*", type=int, metavar="ID")
    fr.set_defaults(func=cmd_failed)
    p = sub.add_parser("test-event", parents=[common], help="send one test event to Events Manager")
    p.add_argument("--pixel", required=True, help="pixel name or code")
    p.set_defaults(func=cmd_test_event)
    sub.add_parser("prune", parents=[common], help="apply retention now").set_defaults(func=cmd_prune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        sys.stdout.flush()  # here, not at exit, where a reader that has gone would get a traceback
        return code
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return 2
    except (CommandError, StoreUnavailable) as exc:
        print(f"postback-bridge: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError as exc:
        if args.func is cmd_run:
            # The daemon's log stream is gone: a failure, for systemd to restart it.
            with contextlib.suppress(OSError):
                print(f"postback-bridge: {exc.strerror or exc}", file=sys.stderr)
            return 1
        # Output piped into `head` or a pager that quit: the reader has what it wanted. Nothing to say,
        # and what is still buffered must not fail once more at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        # An admin command run as someone else; the daemon's own (a port below 1024) wants other advice.
        denied = isinstance(exc, PermissionError) and args.func is not cmd_run
        hint = " (run it as root, through `pb`: see docs/deployment.md)" if denied else ""
        print(f"postback-bridge: {where}{exc.strerror or exc}{hint}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:
        # e.g. "database is locked" while the daemon holds a long write: worth a retry, not a traceback.
        print(f"postback-bridge: database: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
