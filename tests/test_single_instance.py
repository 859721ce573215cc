"""One daemon per database: a second one refuses to start instead of re-sending the first one's events."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.conftest import base_settings, write_config
from tests.daemon_proc import DaemonProcess, free_port


async def test_second_daemon_on_the_same_database_exits_with_one_line(tmp_path: Path) -> None:
    settings = base_settings()
    settings["server"]["port"] = free_port()
    first = DaemonProcess(write_config(tmp_path / "a", settings), settings["server"]["port"])
    other = {**settings, "storage": {"path": str(tmp_path / "a" / "bridge.db")}}
    other["server"] = {**settings["server"], "port": free_port()}
    second = DaemonProcess(write_config(tmp_path / "b", other), other["server"]["port"])
    first.start()
    try:
        await first.wait_ready()
        second.start()
        assert await second.wait_exit() != 0
        text = second.logs_text()
        assert "another postback-bridge daemon is running" in text
        assert "Traceback" not in text
        # The first one is untouched and still serves.
        first.signal(signal.SIGTERM)
        assert await first.wait_exit() == 0
    finally:
        first.stop()
        second.stop()
