"""Where the commands look: the config file (`-c`, else $POSTBACK_BRIDGE_CONFIG, else config/bridge.yaml
in the current directory) and the database it names; a wrong path is one line, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.cli import main
from tests.conftest import REPO, base_settings, write_config

ENV = "POSTBACK_BRIDGE_CONFIG"


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def checked(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The config file `check-config` read (it names it first on its OK line)."""
    code, out, err = run_cli(capsys, "check-config", *argv)
    assert code == 0, err
    return out.split(": OK, ")[0]


@pytest.fixture
def three(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A valid config for each way of naming one, the default one in the current directory; no
    $POSTBACK_BRIDGE_CONFIG yet."""
    monkeypatch.delenv(ENV, raising=False)
    work = tmp_path / "work"
    monkeypatch.chdir(write_config(work / "config", base_settings()).parent.parent)
    return {
        "option": write_config(tmp_path / "option", base_settings()),
        "environment": write_config(tmp_path / "environment", base_settings()),
        "default": Path("config/bridge.yaml"),
    }


# -- which config file --------------------------------------------------------------------------------


def test_the_config_option_names_the_file(three: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert checked(capsys, "-c", str(three["option"])) == str(three["option"])
    assert checked(capsys, "--config", str(three["option"])) == str(three["option"])


def test_without_the_option_the_environment_variable_names_the_file(
    three: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(ENV, str(three["environment"]))
    assert checked(capsys) == str(three["environment"])


def test_without_either_config_bridge_yaml_in_the_current_directory_is_read(
    three: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert checked(capsys) == "config/bridge.yaml"


def test_the_option_wins_over_the_environment_variable_which_wins_over_the_default(
    three: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(ENV, str(three["environment"]))
    assert checked(capsys, "-c", str(three["option"])) == str(three["option"])
    assert checked(capsys) == str(three["environment"])
    monkeypatch.delenv(ENV)
    assert checked(capsys) == "config/bridge.yaml"


def test_a_missing_file_named_by_the_option_is_not_replaced_by_the_others(
    three: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A typo in -c must fail, not quietly run on the environment's or the default file.
    monkeypatch.setenv(ENV, str(three["environment"]))
    missing = three["option"].parent / "typo.yaml"

    code, out, err = run_cli(capsys, "check-config", "-c", str(missing))

    assert (code, out) == (2, "")
    assert err == f"config error: {missing}: cannot read: No such file or directory\n"


def test_a_missing_file_named_by_the_environment_variable_is_not_replaced_by_the_default(
    three: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = three["environment"].parent / "typo.yaml"
    monkeypatch.setenv(ENV, str(missing))

    code, _, err = run_cli(capsys, "check-config")

    assert code == 2
    assert err == f"config error: {missing}: cannot read: No such file or directory\n"


def test_an_empty_config_option_is_an_error_not_the_next_file(
    three: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `-c "$CONFIG"` with CONFIG unset in the shell.
    monkeypatch.setenv(ENV, str(three["environment"]))

    code, out, err = run_cli(capsys, "check-config", "-c", "")

    assert (code, out) == (2, "")
    assert err == "config error: -c/--config: an empty path\n"


def test_an_empty_environment_variable_counts_as_unset(
    three: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(ENV, "")
    assert checked(capsys) == "config/bridge.yaml"


def test_the_default_is_looked_for_in_the_current_directory_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.chdir(tmp_path)

    code, out, err = run_cli(capsys, "check-config")

    assert (code, out) == (2, "")
    assert err == "config error: config/bridge.yaml: cannot read: No such file or directory\n"


def test_every_command_reads_the_file_the_environment_variable_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Not only check-config: each names the database of the config it read, this one's.
    settings = base_settings()
    settings["storage"]["path"] = "from-the-environment.db"
    path = write_config(tmp_path, settings)
    monkeypatch.setenv(ENV, str(path))
    monkeypatch.chdir(tmp_path)

    for command in (["stats"], ["failed", "list"], ["prune"]):
        code, _, err = run_cli(capsys, *command)
        assert (code, err) == (
            1,
            f"postback-bridge: no database at {tmp_path}/from-the-environment.db yet "
            "(storage.path); has the daemon run?\n",
        ), command


@pytest.mark.parametrize("how", ["option", "environment"])
def test_a_config_path_that_is_a_directory_is_one_line(
    how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    if how == "environment":
        monkeypatch.setenv(ENV, str(tmp_path))
    argv = ["stats", "-c", str(tmp_path)] if how == "option" else ["stats"]

    code, out, err = run_cli(capsys, *argv)

    assert (code, out) == (2, "")
    assert err == f"config error: {tmp_path}: cannot read: Is a directory\n"


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


@pytest.mark.parametrize("command", DATABASE_COMMANDS, ids=" ".join)
def test_a_database_path_that_is_not_a_sqlite_file_is_one_line_naming_it(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, base_settings())
    (tmp_path / "bridge.db").write_text("not a database, but notes someone kept here\n" * 100)

    code, out, err = run_cli(capsys, *command, "-c", str(config))

    assert (code, out) == (1, "")
    assert "Traceback" not in err
    assert err == f"postback-bridge: cannot open the database {tmp_path}/bridge.db: file is not a database\n"
