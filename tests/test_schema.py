"""Schema upgrades: a database an earlier release wrote opens, is upgraded, and keeps every event."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path

import pytest

from bridge.cli import main
from bridge.store import MIGRATIONS
from tests.conftest import BridgeFactory, base_settings, write_config

INDEXES = "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'conversions'"


def first_release_database(path: Path) -> None:
    """Schema version 1, as the first release left it, with one event still waiting to be sent."""
    path.parent.mkdir(parents=True)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.executescript(MIGRATIONS[0])
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (1)")
        db.execute(
            "INSERT INTO conversions (tracker, click_id, status, event, event_id, event_time, currency,"
            " ttclid, state, next_attempt_at, received_at, ingest_batch)"
            " VALUES ('keitaro', 'old1', 'sale', 'Purchase', 'old1_Purchase', ?, 'USD',"
            " 'E.C.P.old', 'pending', 0, ?, 7)",
            (int(time.time()), time.time()),
        )


async def test_a_first_release_database_is_upgraded_and_its_waiting_event_delivered(
    tmp_path: Path, make_bridge: BridgeFactory
) -> None:
    first_release_database(tmp_path / "bridge0" / "bridge.db")
    bridge = await make_bridge()

    assert [row[0] for row in await bridge.store.fetchall("SELECT MAX(version) FROM schema_version")] == [
        len(MIGRATIONS)
    ]
    indexes = {row["name"] for row in await bridge.store.fetchall(INDEXES)}
    assert indexes.isdisjoint({"conversions_batch", "conversions_state"})
    assert {"conversions_identity", "conversions_due", "conversions_finished"} <= indexes
    await bridge.deliver()
    assert bridge.fake.event_ids() == ["old1_Purchase"]
    # New conversions take the ids after the old ones.
    _, body = await bridge.postback("keitaro", subid="new1", status="sale", external_id="E.C.P.new")
    assert body["conversion_id"] == 2


@pytest.mark.parametrize("command", [["stats"], ["failed", "list"], ["prune"]])
def test_an_admin_command_leaves_an_older_schema_to_the_daemon_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    # Between installing a release and restarting the daemon, the old daemon still runs on this file,
    # and the backup taken for going back must stay one the old release can open.
    first_release_database(tmp_path / "var" / "bridge.db")
    config = write_config(tmp_path, {**base_settings(), "storage": {"path": "var/bridge.db"}})

    assert main([*command, "-c", str(config)]) == 1

    err = capsys.readouterr().err
    assert "schema version 1" in err
    assert f"this release's is {len(MIGRATIONS)}" in err
    assert "restart" in err
    with contextlib.closing(sqlite3.connect(tmp_path / "var" / "bridge.db")) as db:
        assert db.execute("SELECT MAX(version) FROM schema_version").fetchone() == (1,)
        assert {row[0] for row in db.execute(INDEXES)} >= {"conversions_batch", "conversions_state"}
        assert db.execute("SELECT state FROM conversions").fetchall() == [("pending",)]


def test_an_admin_command_does_not_make_a_database_of_an_empty_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bridge.db").touch()
    config = write_config(tmp_path, base_settings())

    assert main(["stats", "-c", str(config)]) == 1

    assert "not a database the daemon has created yet" in capsys.readouterr().err
    assert [p.name for p in tmp_path.glob("bridge.db*")] == ["bridge.db"]
    assert (tmp_path / "bridge.db").stat().st_size == 0
