"""Where the commands look for the database the config names; a path that is not a database file is
one line, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.cli import main
from tests.conftest import REPO, base_settings, write_config


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- the database the config names --------------------------------------------------------------------

DATABASE_COMMANDS = [
    ["stats"],
    ["failed", "list"],
    ["failed", "retry", "1"],
    ["failed", "retry", "--all"],
    ["prune"],
    ["explain", "/postback/keitaro?subid=1&status=lead&external_id=E.C.P.1"],
]


@pytest.mark.parametrize("command", DATABASE_COMMANDS, ids=" ".join)
def test_a_database_path_that_is_a_directory_is_one_line_naming_it(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, base_settings())
    (tmp_path / "bridge.db").mkdir()

    code, out, err = run_cli(capsys, *command, "-c", str(config))

    assert (code, out) == (1, "")
    assert "Traceback" not in err
    assert err == f"postback-bridge: storage.path {tmp_path}/bridge.db is a directory, not a database file\n"


@pytest.mark.parametrize(
    "command", [["explain", "/postback/keitaro?subid=1&status=lead"], ["stats"]], ids=" ".join
)
def test_a_database_path_that_is_a_fifo_is_one_line_not_a_wait(command: list[str], tmp_path: Path) -> None:
    # A read-only open of a FIFO waits for a writer that never comes: in a process of its own, so that
    # waiting fails this test instead of hanging the suite.
    config = write_config(tmp_path, base_settings())
    os.mkfifo(tmp_path / "bridge.db")

    result = subprocess.run(
        [sys.executable, "-m", "bridge", *command, "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )

    assert (result.returncode, result.stdout) == (1, "")
    assert "Traceback" not in result.stderr
    assert result.stderr == (
        f"postback-bridge: storage.path {tmp_path}/bridge.db is a special file (a FIFO, socket or device),"
        " not a database file\n"
    )


@pytest.mark.parametrize("command", DATABASE_COMMANDS[:-1], ids=" ".join)
def test_a_database_path_that_is_not_a_sqlite_file_is_one_line_naming_it(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, base_settings())
    (tmp_path / "bridge.db").write_text("not a database, but notes someone kept here\n" * 100)

    code, out, err = run_cli(capsys, *command, "-c", str(config))

    assert (code, out) == (1, "")
    assert "Traceback" not in err
    assert err == f"postback-bridge: cannot open the database {tmp_path}/bridge.db: file is not a database\n"
