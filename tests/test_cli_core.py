"""`check-config` and `explain`: what an admin sees before pasting a postback URL into a tracker."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.cli import main
from bridge.matching import sha256_hex
from tests.conftest import MAIN_CODE, REPO, SECOND_CODE, base_settings, write_config
from tests.daemon_proc import free_port


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return write_config(tmp_path, base_settings())


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_shipped_config_passes_check_config() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "check-config", "-c", str(REPO / "config" / "bridge.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert "3 tracker(s) (bemob, binom, keitaro)" in result.stdout
    assert "dry run" in result.stdout


def test_check_config_names_file_key_and_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = base_settings()
    settings["tiktok"]["batch_size"] = 5000
    settings["tiktok"]["dry_rum"] = True
    path = write_config(tmp_path, settings)

    code, _, err = run_cli(capsys, "check-config", "-c", str(path))

    assert code == 2
    lines = err.strip().splitlines()
    assert any(f"{path}: tiktok.batch_size:" in line and "1000" in line for line in lines)
    assert any(f"{path}: tiktok.dry_rum: unknown key" in line for line in lines)
    assert "Traceback" not in err


def test_a_file_the_command_cannot_reach_is_named_in_its_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Run as root here, so not "Permission denied" (a user outside the state directory gets that): the
    # same error path, with a name the system refuses.
    settings = base_settings()
    settings["storage"]["path"] = str(tmp_path / ("a" * 300) / "bridge.db")
    path = write_config(tmp_path, settings)

    code, _, err = run_cli(capsys, "stats", "-c", str(path))

    assert code == 1
    assert err == f"postback-bridge: {settings['storage']['path']}: File name too long\n"


def test_check_config_warns_about_a_misspelt_event(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tracker = {"name": "net", "params": {"click_id": "cid", "status": "st"}, "events": {"sale": "Purchse"}}
    path = write_config(tmp_path, base_settings(), {"net": tracker})

    code, _, err = run_cli(capsys, "check-config", "-c", str(path))

    assert code == 0
    assert "events.sale: 'Purchse' is not a TikTok standard event" in err


def test_unset_variable_is_an_error_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = base_settings()
    settings["pixels"]["main"]["access_token"] = "${NO_SUCH_TOKEN_VAR}"
    path = write_config(tmp_path, settings)

    code, _, err = run_cli(capsys, "check-config", "-c", str(path))

    assert code == 2
    assert "pixels.main.access_token: environment variable NO_SUCH_TOKEN_VAR is not set" in err


def test_variable_default_is_used(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = base_settings()
    settings["pixels"]["main"]["access_token"] = "${NO_SUCH_TOKEN_VAR:-fallback-token}"
    path = write_config(tmp_path, settings)
    assert run_cli(capsys, "check-config", "-c", str(path))[0] == 0


def explain(capsys: pytest.CaptureFixture[str], config: Path, url: str) -> tuple[int, dict[str, Any]]:
    code, out, _ = run_cli(capsys, "explain", "-c", str(config), url)
    return code, json.loads(out)


def test_explain_shows_the_event_that_would_be_sent(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, result = explain(
        capsys,
        config_path,
        "/postback/keitaro?subid=abc&external_id=E.C.P.x&status=Sale&revenue=45&currency=usd&tid=9&ip=1.2.3.4",
    )
    assert code == 0
    assert result["result"] == "accepted"
    assert result["pixel"] == "main" and result["pixel_code"] == MAIN_CODE
    assert result["event"]["event"] == "Purchase"
    assert result["event"]["event_id"] == "abc_Purchase"
    assert result["event"]["user"] == {"ttclid": "E.C.P.x", "ip": "1.2.3.4"}
    assert result["event"]["properties"] == {"value": 45.0, "currency": "USD"}


def test_explain_hashes_identifiers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tracker = {
        "name": "net",
        "params": {"click_id": "cid", "status": "st", "email": "em"},
        "events": {"ok": "Lead"},
    }
    path = write_config(tmp_path, base_settings(), {"net": tracker})
    code, out, _ = run_cli(
        capsys, "explain", "-c", str(path), "/postback/net?cid=1&st=ok&em=Alice@Example.com"
    )
    assert code == 0
    assert "Alice@Example.com" not in out and "alice@example.com" not in out
    assert json.loads(out)["event"]["user"]["email"] == [sha256_hex("alice@example.com")]


def test_explain_warns_that_an_event_older_than_max_event_age_would_expire(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tracker = {
        "name": "net",
        "params": {"click_id": "cid", "status": "st", "ttclid": "tt", "event_time": "ts"},
        "events": {"ok": "Lead"},
    }
    path = write_config(tmp_path, base_settings(), {"net": tracker})
    eight_days_ago = int(time.time()) - 8 * 86400
    url = f"/postback/net?cid=1&st=ok&tt=E.C.P.1&ts={eight_days_ago}"
    code, result = explain(capsys, path, url)
    assert (code, result["result"]) == (0, "accepted")
    assert result["warning"] == (
        "event_time is older than delivery.max_event_age: it would be recorded, then expire unsent"
    )
    code, result = explain(capsys, path, f"/postback/net?cid=1&st=ok&tt=E.C.P.1&ts={int(time.time()) - 3600}")
    assert "warning" not in result


def test_explain_says_why_a_status_is_ignored(config_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, result = explain(capsys, config_path, "/postback/keitaro?subid=abc&status=trash")
    assert code == 0
    assert result == {
        "result": "ignored",
        "reason": "unmapped_status",
        "status_value": "trash",
        "why": "status 'trash' is not in the tracker's events: recorded, not sent",
    }


MACRO_LEFT = "parameter 'status' holds an unsubstituted macro '{status}'"


@pytest.mark.parametrize(
    ("query", "reason", "why"),
    [
        ("status={status}", "unmapped_status", MACRO_LEFT),
        ("status=%7Bstatus%7D", "unmapped_status", MACRO_LEFT),
        ("status=", "unmapped_status", "no status (the tracker sends it as 'status')"),
        ("revenue=3", "unmapped_status", "no status (the tracker sends it as 'status')"),
        (
            "status=Rejected",
            "status_not_sent",
            "status 'rejected' is mapped to null in the tracker's events: recorded, not sent",
        ),
    ],
)
def test_explain_says_why_a_status_is_not_sent(
    config_path: Path, capsys: pytest.CaptureFixture[str], query: str, reason: str, why: str
) -> None:
    code, result = explain(capsys, config_path, f"/postback/keitaro?subid=abc&{query}")
    assert (code, result["reason"], result["why"]) == (0, reason, why)


def test_explain_says_why_a_postback_is_rejected(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, result = explain(capsys, config_path, "/postback/keitaro?subid={subid}&status=sale")
    assert code == 1
    assert result["status"] == 400
    assert "unsubstituted macro" in result["why"]


def test_explain_refuses_a_url_past_the_listeners_limit_as_the_listener_does(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = "/postback/keitaro?subid=abc&external_id=E.C.P.x&status=sale&pad="
    at_the_limit = target + "x" * (8192 - len(target))

    assert explain(capsys, config_path, f"http://127.0.0.1:8080{at_the_limit}")[1]["result"] == "accepted"
    code, result = explain(capsys, config_path, f"http://127.0.0.1:8080{at_the_limit}x")
    assert code == 1
    assert result == {"result": "rejected", "status": 413, "why": "request URL longer than 8192 bytes"}


def test_explain_rejects_a_postback_naming_an_unknown_pixel_as_the_listener_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tracker = {
        "name": "net",
        "params": {"click_id": "cid", "status": "st", "pixel": "px"},
        "events": {"ok": "Lead"},
    }
    path = write_config(tmp_path, base_settings(), {"net": tracker})
    code, result = explain(capsys, path, "/postback/net?cid=1&st=ok&px=NOPE")
    assert (code, result["status"]) == (1, 400)
    assert result["why"] == "pixel: not a configured pixel name or code"


def test_explain_checks_the_key_without_showing_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tracker = {
        "name": "net",
        "key": "s3cret-key",
        "params": {"click_id": "cid", "status": "st"},
        "events": {"ok": "Lead"},
    }
    path = write_config(tmp_path, base_settings(), {"net": tracker})

    code, out, err = run_cli(capsys, "explain", "-c", str(path), "/postback/net?cid=1&st=ok&key=wrong")
    assert code == 1
    assert json.loads(out)["status"] == 403
    assert "s3cret-key" not in out + err

    code, out, _ = run_cli(capsys, "explain", "-c", str(path), "/postback/net?cid=1&st=ok&key=s3cret-key")
    assert code == 0 and json.loads(out)["result"] == "accepted"


def test_explain_unknown_tracker(config_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, result = explain(capsys, config_path, "http://bridge.example.com/postback/nope?x=1")
    assert code == 1
    assert result["status"] == 404
    assert "bemob, binom, keitaro" in result["why"]


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://[::1/postback/keitaro?subid=1&status=lead", "Invalid IPv6 URL"),
        ("http://::1]/postback/keitaro?subid=1&status=lead", "Invalid IPv6 URL"),
        (
            "http://bridge\u2100example.com/postback/keitaro?subid=1",
            "netloc 'bridge\u2100example.com' contains invalid characters under NFKC normalization",
        ),
    ],
)
def test_explain_a_url_that_cannot_be_read_is_one_line(
    config_path: Path, capsys: pytest.CaptureFixture[str], url: str, why: str
) -> None:
    code, out, err = run_cli(capsys, "explain", "-c", str(config_path), url)

    assert (code, out) == (1, "")
    assert "Traceback" not in err
    assert err == f"postback-bridge: explain: cannot read the URL: {why}\n"


async def test_explain_reads_the_click_from_the_database(
    bridge: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    await bridge.click(click_id="stored1", ttclid="E.C.P.stored", pixel=SECOND_CODE)
    code, out, _ = await asyncio.to_thread(
        run_cli,
        capsys,
        "explain",
        "-c",
        str(bridge.config.path),
        "/postback/keitaro?subid=stored1&status=lead",
    )
    result = json.loads(out)
    assert code == 0
    assert result["click_found"] is True
    assert result["pixel"] == "second"
    assert result["event"]["user"]["ttclid"] == "E.C.P.stored"


async def test_explain_warns_when_the_clicks_pixel_is_no_longer_in_the_config(
    bridge: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    await bridge.click(click_id="gone1", ttclid="E.C.P.gone", pixel="second")
    settings = yaml.safe_load(bridge.config.path.read_text())
    del settings["pixels"]["second"]
    bridge.config.path.write_text(yaml.safe_dump(settings))

    code, out, _ = await asyncio.to_thread(
        run_cli, capsys, "explain", "-c", str(bridge.config.path), "/postback/keitaro?subid=gone1&status=lead"
    )
    result = json.loads(out)
    assert code == 0
    assert (result["pixel"], result["pixel_code"]) == ("second", None)
    assert "pixel 'second', which is not in the config" in result["warning"]


async def test_explain_knows_a_duplicate_and_a_rebill_from_the_database(
    bridge: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    _, first = await bridge.postback("keitaro", subid="rb1", status="sale", tid="T-1", external_id="E.C.P.rb")

    async def explained(query: str) -> dict[str, Any]:
        code, out, _ = await asyncio.to_thread(
            run_cli, capsys, "explain", "-c", str(bridge.config.path), f"/postback/keitaro?{query}"
        )
        assert code == 0, out
        # The bridge's own log lines share stdout here; explain prints one indented JSON object.
        start = out.index("{\n")
        return json.JSONDecoder().raw_decode(out, start)[0]

    # The listener would answer "duplicate" and send nothing: so does explain.
    repeat = await explained("subid=rb1&status=sale&tid=T-1")
    assert repeat["result"] == "duplicate"
    assert (repeat["conversion_id"], repeat["event_id"]) == (first["conversion_id"], "rb1_Purchase")
    assert repeat["recorded"] == {"state": "pending", "attempts": 0}
    # The recorded conversion can be followed: once delivered, with TikTok's request id.
    await bridge.deliver()
    [event] = bridge.fake.received
    delivered = (await explained("subid=rb1&status=sale&tid=T-1"))["recorded"]
    assert delivered == {
        "state": "delivered",
        "attempts": 1,
        "sent_pixel": "main",
        "last_code": 0,
        "request_id": event["_request_id"],
    }
    assert (await explained("subid=rb1&status=sale"))["result"] == "duplicate"
    # Another transaction id: a rebill, with the suffix the listener would give it.
    rebill = await explained("subid=rb1&status=sale&tid=T-2&external_id=E.C.P.rb")
    assert rebill["result"] == "accepted"
    assert rebill["event"]["event_id"] == "rb1_Purchase_T-2"
    assert "note" not in rebill
    _, sent = await bridge.postback("keitaro", subid="rb1", status="sale", tid="T-2", external_id="E.C.P.rb")
    assert sent["event_id"] == rebill["event"]["event_id"]


async def test_explain_writes_nothing_to_the_database_and_sends_nothing(
    bridge: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    await bridge.click(click_id="still1", ttclid="E.C.P.still", pixel=SECOND_CODE)
    _, recorded = await bridge.postback("keitaro", subid="still1", status="lead")
    db_path = bridge.config.db_path
    # data_version changes for this connection when any other one commits, however little.
    watcher = sqlite3.connect(db_path)

    def snapshot() -> tuple[Any, ...]:
        files = sorted(p.name for p in db_path.parent.iterdir() if p.name.startswith(db_path.name))
        return (
            watcher.execute("PRAGMA data_version").fetchone()[0],
            watcher.execute("SELECT * FROM clicks ORDER BY click_id").fetchall(),
            watcher.execute("SELECT * FROM conversions ORDER BY id").fetchall(),
            files,
            # The -shm index is shared memory that readers mark as they read: not the data.
            {name: (db_path.parent / name).read_bytes() for name in files if not name.endswith("-shm")},
        )

    async def explained(query: str) -> dict[str, Any]:
        capsys.readouterr()
        code, out, _ = await asyncio.to_thread(
            run_cli, capsys, "explain", "-c", str(bridge.config.path), f"/postback/keitaro?{query}"
        )
        assert code == 0, out
        return json.loads(out)

    try:
        before = snapshot()
        assert len(before[1]) == 1 and len(before[2]) == 1
        # The stored click's new event, and a repeat of the recorded one: both read the database.
        sale = await explained("subid=still1&status=sale&tid=T-1&revenue=9")
        repeat = await explained("subid=still1&status=lead")
        after = snapshot()
    finally:
        watcher.close()

    assert (sale["result"], sale["click_found"], sale["pixel"]) == ("accepted", True, "second")
    assert (repeat["result"], repeat["conversion_id"]) == ("duplicate", recorded["conversion_id"])
    assert repeat["recorded"] == {"state": "pending", "attempts": 0}
    assert after == before
    assert bridge.fake.requests == []


def test_output_into_a_reader_that_has_gone_ends_quietly(service_dir: Path) -> None:
    # `postback-bridge stats | head -1`: head exits before the command has written everything.
    # The shipped config, copied where check-config run as root has no directory to warn about.
    shutil.copytree(REPO / "config", service_dir / "config")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "check-config", "-c", str(service_dir / "config" / "bridge.yaml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0
    assert err == ""


def test_the_daemon_whose_log_stream_is_gone_exits_as_a_failure(tmp_path: Path) -> None:
    # systemd restarts a unit that fails (Restart=on-failure), not one that exits 0.
    settings = base_settings()
    settings["server"]["port"] = free_port()
    path = write_config(tmp_path, settings)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "run", "-c", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    assert proc.stdout is not None
    proc.stdout.close()
    try:
        assert proc.wait(timeout=60) == 1
    finally:
        proc.kill()


def test_config_option_works_before_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = base_settings()
    settings["tiktok"]["batch_size"] = 0
    path = write_config(tmp_path, settings)

    code, _, err = run_cli(capsys, "-c", str(path), "check-config")

    assert code == 2
    assert f"{path}: tiktok.batch_size:" in err


def test_config_option_after_the_command_wins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write_config(tmp_path / "good", base_settings())
    code, out, _ = run_cli(capsys, "-c", str(tmp_path / "missing.yaml"), "check-config", "-c", str(good))
    assert code == 0
    assert str(good) in out


def test_status_listed_twice_in_different_case_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tracker = {"name": "net", "params": {"click_id": "cid"}, "events": {"Sale": "Purchase", "sale": "Lead"}}
    path = write_config(tmp_path, base_settings(), {"net": tracker})
    code, _, err = run_cli(capsys, "check-config", "-c", str(path))
    assert code == 2
    assert "net.yaml: events: " in err and "listed twice" in err


def test_empty_listen_host_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = base_settings()
    settings["server"]["host"] = ""
    code, _, err = run_cli(capsys, "check-config", "-c", str(write_config(tmp_path, settings)))
    assert code == 2
    assert "server.host:" in err


def test_open_tracker_on_a_public_listener_is_warned_about(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = base_settings()
    settings["server"]["host"] = "0.0.0.0"
    code, _, err = run_cli(capsys, "check-config", "-c", str(write_config(tmp_path, settings)))
    assert code == 0
    assert "anyone who finds /postback/keitaro can report conversions" in err


def test_open_tracker_on_loopback_without_proxy_is_not_warned_about(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "check-config", "-c", str(config_path))
    assert code == 0
    assert "anyone who finds" not in err


def test_self_referring_yaml_is_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_text("a: &a [*a]\n")
    code, _, err = run_cli(capsys, "check-config", "-c", str(path))
    assert code == 2
    assert err.strip() == f"config error: {path}: YAML nests too deeply (or an alias refers to itself)"
