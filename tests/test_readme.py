"""The README's first example works: the shipped config, the sample Keitaro postback, the dry-run log line."""

from __future__ import annotations

import re
import shutil
import signal
from pathlib import Path

import aiohttp
import yaml

from tests.conftest import REPO
from tests.daemon_proc import DaemonProcess, free_port


def readme_curl_url() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"curl '(http://127\.0\.0\.1:8080/postback/keitaro\?[^']+)'", text)
    assert match, "README lost its sample postback"
    return match.group(1)


async def test_readme_sample_postback_shows_the_dry_run_event_in_the_log(tmp_path: Path) -> None:
    # The shipped config as is, but on a free port and with its database in tmp_path.
    shutil.copytree(REPO / "config", tmp_path / "config")
    path = tmp_path / "config" / "bridge.yaml"
    settings = yaml.safe_load(path.read_text())
    assert settings["tiktok"]["dry_run"] is True
    port = free_port()
    settings["server"]["port"] = port
    path.write_text(yaml.safe_dump(settings))
    daemon = DaemonProcess(path, port, env={"TIKTOK_TOKEN_MAIN": "", "KEITARO_POSTBACK_KEY": ""})
    daemon.start()
    try:
        await daemon.wait_ready()
        url = readme_curl_url().replace("127.0.0.1:8080", f"127.0.0.1:{port}")
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            assert resp.status == 200
            body = await resp.json()
        assert body["result"] == "accepted"
        assert body["event_id"] == "1dad2cg1br22spja1_Purchase"

        line = await daemon.wait_log(lambda e: e.get("event") == "dry run: batch not sent")
        [event] = line["payload"]["data"]
        assert event["event_id"] == "1dad2cg1br22spja1_Purchase"
        assert event["user"]["ttclid"] == "E.C.P.CqgBqkM2fX"
        assert any("DRY RUN" in e.get("event", "") for e in daemon.log_lines())

        daemon.signal(signal.SIGTERM)
        assert await daemon.wait_exit() == 0
    finally:
        daemon.stop()
    assert (tmp_path / "var" / "bridge.db").exists()
