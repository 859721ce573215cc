"""Listener processes (`server.listeners` > 1): more processes answering HTTP on the daemon's port.

One Python process answers HTTP on one core at most. With `server.listeners: N`, the daemon binds the
port and starts N - 1 more processes (`python -m bridge.listeners`) that inherit the listening socket
and take postbacks and clicks with the same app, each with connections of its own to the same
database. The daemon stays the only one that delivers, prunes and reloads:

- a listener process answers /readyz and /metrics by asking the daemon over a Unix socket in a private
  directory, so both describe the whole bridge; the counters of every process are added up through
  prometheus_client's multiprocess files in the same directory;
- SIGHUP to the daemon reloads it, then each listener process (which reloads the same files itself);
- each one watches a pipe from the daemon and stops when the daemon is gone, even after kill -9;
- the daemon starts a listener process again when one exits while the daemon runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from bridge.config import ConfigError, load_config
from bridge.logs import configure, get_logger
from bridge.runtime import Runtime, event_loop_runner
from bridge.store import Store, StoreUnavailable

log = get_logger("bridge.listeners")

MAIN_SOCKET_ENV = "POSTBACK_BRIDGE_MAIN_SOCKET"
RESTART_DELAY = 1.0
WATCH_EVERY = 0.5


class ListenerProcesses:
    """The daemon's side: starts, watches, reloads and stops the other listener processes."""

    def __init__(self, count: int, sock: socket.socket, config_path: Path, main_socket: Path) -> None:
        self.count = count
        self._sock = sock
        self._config_path = config_path
        self._main_socket = main_socket
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * count
        self._pipes: list[int | None] = [None] * count
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        for slot in range(self.count):
            self._spawn(slot)
        self._watch = asyncio.create_task(self._watch_loop(), name="listener-processes")

    def _spawn(self, slot: int) -> None:
        # The child watches the read end: when the daemon is gone, the write end closes with it.
        read_end, write_end = os.pipe()
        # Born with SIGHUP blocked (the mask is inherited): a reload while it starts waits until its
        # handler is in place, instead of ending it by SIGHUP's default action.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bridge.listeners",
                    "--socket-fd",
                    str(self._sock.fileno()),
                    "--daemon-pipe",
                    str(read_end),
                    "-c",
                    str(self._config_path),
                ],
                pass_fds=(self._sock.fileno(), read_end),
                env={**os.environ, MAIN_SOCKET_ENV: str(self._main_socket)},
            )
        except BaseException:
            os.close(write_end)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
            os.close(read_end)
        self._procs[slot] = proc
        self._pipes[slot] = write_end

    async def _watch_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(WATCH_EVERY)
            for slot, proc in enumerate(self._procs):
                if self._stopping or proc is None or proc.poll() is None:
                    continue
                self._close_pipe(slot)
                log.error(
                    "listener process exited; starting it again",
                    pid=proc.pid,
                    code=proc.returncode,
                    restart_in=RESTART_DELAY,
                )
                self._procs[slot] = None
                await asyncio.sleep(RESTART_DELAY)
                if not self._stopping:
                    try:
                        self._spawn(slot)
                    except OSError as exc:
                        log.error("cannot start a listener process", error=str(exc))

    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs if proc is not None and proc.poll() is None]

    def reload(self) -> None:
        """After the daemon reloaded: each listener process reloads the same files."""
        for proc in self._procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGHUP)

    async def stop(self, timeout: float) -> None:
        """SIGTERM: they stop accepting and finish what they answered; after `timeout`, SIGKILL."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        running = [proc for proc in self._procs if proc is not None and proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(proc.poll() is None for proc in running) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for proc in running:
            if proc.poll() is None:
                log.error("listener process did not stop in time; killed", pid=proc.pid)
                proc.kill()
                proc.wait()
        for slot in range(self.count):
            self._close_pipe(slot)

    def _close_pipe(self, slot: int) -> None:
        fd = self._pipes[slot]
        if fd is not None:
            os.close(fd)
            self._pipes[slot] = None


class MainProcess:
    """A listener process's way to the daemon, for what only the daemon knows (/readyz, /metrics)."""

    def __init__(self, path: str) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=path), timeout=aiohttp.ClientTimeout(total=10)
        )

    async def ask(self, path: str) -> web.Response:
        try:
            async with self._session.get(f"http://daemon{path}") as answer:
                body = await answer.read()
                headers = {"Content-Type": answer.headers.get("Content-Type", "text/plain")}
                return web.Response(status=answer.status, body=body, headers=headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            why = f"not ready: the main daemon process does not answer ({exc})\n"
            return web.Response(status=503, text=why)

    async def close(self) -> None:
        await self._session.close()


def from_listener_process(request: web.Request) -> bool:
    """A request that came over the daemon's private Unix socket, so from one of its listener processes."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock is not None and sock.family == socket.AF_UNIX


# -- a listener process ---------------------------------------------------------------------------------


async def _serve(config_path: Path, socket_fd: int, daemon_pipe: int) -> None:
    from bridge.web import PARSER_LIMITS, create_app  # here: bridge.web imports this module

    config = load_config(config_path)
    store = await Store(config.db_path, shared=True).open()
    main = MainProcess(os.environ[MAIN_SOCKET_ENV])
    runtime = Runtime(config=config, store=store, main_process=main)
    runner = web.AppRunner(
        create_app(runtime), access_log=None, handle_signals=False, shutdown_timeout=10.0, **PARSER_LIMITS
    )
    await runner.setup()
    site = web.SockSite(runner, socket.socket(fileno=socket_fd))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: _reload(runtime))
    loop.add_reader(daemon_pipe, stop.set)  # readable = end of file: the daemon is gone
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # a reload sent meanwhile runs now
    try:
        await site.start()
        gc.collect()
        gc.freeze()  # as the daemon does: the start-up heap stays out of the collector's walks
        log.info("listener process ready", pid=os.getpid())
        await stop.wait()
    finally:
        loop.remove_reader(daemon_pipe)
        await runner.shutdown()
        await site.stop()
        await runner.cleanup()
        await main.close()
        await store.close()
        runtime.lines.flush()


def _reload(runtime: Runtime) -> None:
    try:
        runtime.config = load_config(runtime.config.path)
    except ConfigError as exc:
        # The daemon reloaded these files a moment ago: they changed again since. Keep what runs.
        for problem in exc.problems:
            log.error("reload refused in a listener process: keeping the running config", problem=problem)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bridge.listeners", description=__doc__)
    parser.add_argument("--socket-fd", type=int, required=True)
    parser.add_argument("--daemon-pipe", type=int, required=True)
    parser.add_argument("-c", "--config", type=Path, required=True)
    args = parser.parse_args(argv)
    configure()
    try:
        with event_loop_runner() as runner:
            runner.run(_serve(args.config, args.socket_fd, args.daemon_pipe))
    except (ConfigError, StoreUnavailable) as exc:
        log.error("listener process cannot start", error=str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
