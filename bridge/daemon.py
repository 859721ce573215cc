"""The daemon: listener + delivery worker + retention pruning, signals, reload, sd_notify."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import hashlib
import os
import shutil
import signal
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import IO

import aiohttp
from aiohttp import web

from bridge.config import Config, ConfigError, is_loopback, load_config
from bridge.listeners import ListenerProcesses
from bridge.logs import get_logger
from bridge.metrics import share_between_processes
from bridge.runtime import Runtime, event_loop_runner
from bridge.sdnotify import Notifier
from bridge.store import Store, StoreUnavailable
from bridge.web import PARSER_LIMITS, create_app
from bridge.worker import Worker

log = get_logger("bridge.daemon")

PRUNE_EVERY_SECONDS = 3600.0


DRY_RUN = (
    "DRY RUN: tiktok.dry_run is true; nothing is sent to TikTok, events are only logged "
    "and marked delivered_dry_run. Set tiktok.dry_run: false to deliver."
)


class Daemon:
    def __init__(self, config: Config, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier.from_env()
        self.runtime: Runtime | None = None
        self.worker: Worker | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._lock_file: IO[str] | None = None
        self._reloads: set[asyncio.Task[None]] = set()
        self._reload_lock = asyncio.Lock()
        self.port: int | None = None
        self.listeners: ListenerProcesses | None = None
        self._rundir: Path | None = None

    async def run(self) -> None:
        config = self.config
        settings = config.settings
        if settings.tiktok.dry_run:
            log.warning(DRY_RUN)
        for warning in config.warnings:
            log.warning("config", problem=warning)
        if is_loopback(settings.server.host) and not settings.server.trusted_proxies:
            # Browsers can reach a loopback listener only through a reverse proxy, whose address
            # would then be stored as every visitor's ip.
            log.warning(
                "server.host is a loopback address and server.trusted_proxies is empty: behind a reverse "
                "proxy, set trusted_proxies (e.g. [127.0.0.1/32]) so clicks carry the visitor's ip"
            )
        self._lock_database(config.db_path)
        count = settings.server.listeners
        if count > 1:
            # Private to this run: the Unix socket listener processes ask, and the metrics files.
            self._rundir = _run_directory(config.db_path)
            (self._rundir / "metrics").mkdir()
            share_between_processes(self._rundir / "metrics")
        try:
            store = await Store(config.db_path, shared=count > 1).open()
        except StoreUnavailable as exc:
            raise StoreUnavailable(f"storage.path: {exc}") from None
        runtime = self.runtime = Runtime(config=config, store=store)
        timeout = aiohttp.ClientTimeout(total=None)
        session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=32))
        worker = self.worker = Worker(runtime, session)
        app = create_app(runtime)
        # In-flight requests get a few seconds on SIGTERM: well inside the unit's TimeoutStopSec=30,
        # together with the worker's own grace for sends in flight.
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=10.0, **PARSER_LIMITS
        )
        await runner.setup()
        sites: list[web.BaseSite] = []
        listeners: ListenerProcesses | None = None
        if count > 1:
            assert self._rundir is not None
            # Bound here and inherited: every process accepts from the one queue of the one port.
            sock = socket.create_server(
                (settings.server.host, settings.server.port),
                family=socket.AF_INET6 if ":" in settings.server.host else socket.AF_INET,
                backlog=1024,
            )
            sock.set_inheritable(True)
            daemon_socket = self._rundir / "daemon.sock"
            sites.append(web.SockSite(runner, sock))
            sites.append(web.UnixSite(runner, str(daemon_socket)))
            listeners = self.listeners = ListenerProcesses(count - 1, sock, config.path, daemon_socket)
        else:
            sites.append(web.TCPSite(runner, settings.server.host, settings.server.port, reuse_address=True))
        try:
            for site in sites:
                await site.start()
            sockets = runner.addresses
            self.port = sockets[0][1] if sockets else settings.server.port
            worker.start()
            if listeners is not None:
                listeners.start()
            # Let the worker's task take its first step, so READY=1 means /readyz answers 200.
            await asyncio.sleep(0)
            self._tasks.append(asyncio.create_task(self._prune_loop(), name="prune"))
            self._install_signals()
            # Everything built so far (modules, config, app) lives as long as the process. Frozen, the
            # collector stops walking it: under load a full collection of it stalled the event loop
            # for 20-25 ms about once a second, the largest stall of all in the postback p99.
            gc.collect()
            gc.freeze()
            log.info(
                "listening",
                host=settings.server.host,
                port=self.port,
                listener_processes=listeners.pids() if listeners is not None else None,
                database=str(config.db_path),
                trackers=sorted(config.trackers),
                pixels=sorted(settings.pixels),
            )
            self.notifier.ready(status=f"listening on {settings.server.host}:{self.port}")
            interval = self.notifier.watchdog_interval()
            if interval:
                self._tasks.append(asyncio.create_task(self._watchdog(interval), name="watchdog"))
            await self._stop.wait()
            self.notifier.stopping()
            log.info("stopping: no new requests; finishing in-flight deliveries")
        finally:
            if listeners is not None:
                await listeners.stop(timeout=15.0)
            await runner.shutdown()  # stop accepting; in-flight requests finish
            for site in sites:
                await site.stop()
            await worker.stop()
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await runner.cleanup()
            await session.close()
            await store.close()
            runtime.lines.flush()
            if self._lock_file is not None:
                self._lock_file.close()
            if self._rundir is not None:
                shutil.rmtree(self._rundir, ignore_errors=True)
            log.info("stopped")
            self.notifier.close()

    def _lock_database(self, db_path: Path) -> None:
        """One daemon per database: leases live in the worker's process, so a second daemon's worker
        would claim and send the first one's in-flight events again. The lock goes with the process,
        even on kill -9."""
        lock_path = db_path.with_name(db_path.name + ".lock")
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_file = lock_path.open("a")
        except OSError as exc:
            why = exc.strerror or exc
            raise StoreUnavailable(f"storage.path: cannot create {lock_path}: {why}") from None
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise StoreUnavailable(
                f"storage.path: another postback-bridge daemon is running on {db_path} (lock {lock_path})"
            ) from None

    def stop(self) -> None:
        self._stop.set()

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

    def _on_sighup(self) -> None:
        # The loop keeps only a weak reference to tasks: hold this one until it is done.
        task = asyncio.create_task(self._reload_once(), name="reload")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _reload_once(self) -> None:
        # One reload at a time: two quick SIGHUPs must not interleave their swaps and notifications.
        async with self._reload_lock:
            try:
                await self.reload()
            except Exception as exc:
                log.exception("reload failed", error=repr(exc))
                # Without READY=1 systemd would show the unit as reloading for good.
                self.notifier.reloaded(status="reload failed (see the journal)")

    async def reload(self) -> bool:
        """Swap in the new config and trackers atomically; keep the old ones if the new are invalid."""
        assert self.runtime is not None and self.worker is not None
        self.notifier.reloading()
        old = self.runtime.config
        try:
            new = load_config(old.path)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload refused: keeping the running config", problem=problem)
            # `systemctl status` shows this line: `systemctl reload` itself cannot tell.
            self.notifier.reloaded(
                status=f"reload refused ({len(exc.problems)} problem(s), see the journal); "
                "running on the previous config"
            )
            return False
        unchangeable = [
            name
            for name, a, b in (
                ("storage.path", new.db_path, old.db_path),
                ("server.host", new.settings.server.host, old.settings.server.host),
                ("server.port", new.settings.server.port, old.settings.server.port),
                ("server.listeners", new.settings.server.listeners, old.settings.server.listeners),
            )
            if a != b
        ]
        for name in unchangeable:
            log.warning("reload: this setting takes effect only after a restart", setting=name)
        # Their waiting events are looked at again now: a changed token is tried at once, a pixel put
        # back gets the events that waited for it (recorded under its name, or its code if a click or
        # postback named it so), and a removed pixel's events say at once that they wait for it.
        changed = [
            name for name, pixel in new.settings.pixels.items() if old.settings.pixels.get(name) != pixel
        ] + [name for name in old.settings.pixels if name not in new.settings.pixels]
        self.runtime.config = new
        if changed:
            self.worker.pixel_changed(changed)
            codes = [new.settings.pixels[name].code for name in changed if name in new.settings.pixels]
            released = await self.runtime.store.make_due(time.time(), [*changed, *codes])
            log.info(
                "reload: pixels changed or removed; their waiting events are due now",
                pixels=changed,
                events=released,
            )
        if new.settings.tiktok.dry_run != old.settings.tiktok.dry_run:
            if new.settings.tiktok.dry_run:
                # Events already waiting were meant for TikTok, and they too are marked, not sent.
                log.warning(
                    DRY_RUN,
                    pending_events=await self.runtime.store.pending_count(),
                    note="events already waiting are marked delivered_dry_run too when due, not sent later",
                )
            else:
                log.info("tiktok.dry_run is false: events are sent to TikTok again")
        for warning in new.warnings:
            log.warning("config", problem=warning)
        if self.listeners is not None:
            self.listeners.reload()
        log.info("reloaded", trackers=sorted(new.trackers), pixels=sorted(new.settings.pixels))
        self.runtime.store.committed.set()
        # The address bound at start: server.host and server.port change only with a restart.
        host = self.config.settings.server.host
        self.notifier.reloaded(status=f"listening on {host}:{self.port}; config reloaded")
        return True

    async def _prune_loop(self) -> None:
        assert self.runtime is not None
        while True:
            retention = self.runtime.config.settings.retention
            try:
                clicks, conversions = await self.runtime.store.prune(
                    time.time(), retention.clicks, retention.finished_conversions
                )
                if clicks or conversions:
                    log.info("pruned", clicks=clicks, conversions=conversions)
            except Exception as exc:
                log.error("prune failed", error=repr(exc))
            await asyncio.sleep(PRUNE_EVERY_SECONDS)

    async def _watchdog(self, interval: float) -> None:
        # Pinged from the event loop itself: a blocked loop stops the pings and systemd restarts us.
        # So does a delivery worker that died: the listener alone would acknowledge postbacks that
        # nothing ever sends.
        assert self.runtime is not None
        while True:
            if self.runtime.worker_running:
                self.notifier.watchdog()
            await asyncio.sleep(interval)


def _run_directory(db_path: Path) -> Path:
    """An empty private directory for this run's Unix socket and metrics files.

    Named after the database, whose lock this daemon holds: what a crash left there is this
    database's, removed now, so crashes do not pile directories up in the temporary directory.
    """
    digest = hashlib.sha256(str(db_path.resolve()).encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"postback-bridge-{digest}"
    with contextlib.suppress(FileNotFoundError):
        info = path.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            # Not made by us (a shared /tmp): a fresh directory of our own instead.
            return Path(tempfile.mkdtemp(prefix="postback-bridge-"))
        shutil.rmtree(path)
    path.mkdir(mode=0o700)
    return path


def run(config_path: Path) -> None:
    config = load_config(config_path)
    with event_loop_runner() as runner:
        runner.run(Daemon(config).run())
