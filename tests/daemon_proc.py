"""Run the real daemon as a subprocess on 127.0.0.1 for crash, signal and systemd tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import write_config


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DaemonProcess:
    """`postback-bridge run -c CONFIG` in a child process; logs (JSON lines) go to a file."""

    def __init__(self, config: Path, port: int, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.port = port
        self.env = {**os.environ, **(env or {})}
        self.log_path = config.parent / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "run", "-c", str(self.config)],
            stdout=log,
            stderr=log,
            env=self.env,
            cwd=Path(__file__).resolve().parent.parent,
        )
        log.close()

    async def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until /healthz answers (the listener is up and the database open)."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.logs_text()}")
                try:
                    async with session.get(f"{self.url}/healthz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError(f"daemon not ready after {timeout}s:\n{self.logs_text()}")

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as in a power cut of the process."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    async def wait_exit(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"daemon did not exit within {timeout}s:\n{self.logs_text()}")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def logs_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.logs_text().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
        return lines

    async def wait_log(self, predicate: Any, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.log_lines():
                if predicate(entry):
                    return entry
            await asyncio.sleep(0.05)
        raise AssertionError(f"no matching log line within {timeout}s:\n{self.logs_text()[-4000:]}")


@contextlib.asynccontextmanager
async def running_daemon(directory: Path, settings: dict[str, Any]) -> AsyncIterator[DaemonProcess]:
    """The daemon on `settings` (at a free port), with its config written into `directory`, started
    and answering; killed on the way out, its log still there to read."""
    port = free_port()
    daemon = DaemonProcess(
        write_config(directory, {**settings, "server": {**settings["server"], "port": port}}), port
    )
    daemon.start()
    try:
        await daemon.wait_ready()
        yield daemon
    finally:
        daemon.stop()
