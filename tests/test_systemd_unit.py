"""The shipped systemd unit and env file: the directives the daemon relies on, and systemd's own verdict."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD_DIR / "postback-bridge.service"
ENV_EXAMPLE = SYSTEMD_DIR / "postback-bridge.env.example"
DAEMON = "/opt/postback-bridge/.venv/bin/postback-bridge"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value given, in order (systemd allows repeats, which configparser drops)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):  # continuation: systemd joins with a space
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"assignment outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    return parse_unit(UNIT.read_text())["Service"]


def only(service: dict[str, list[str]], key: str) -> str:
    values = service.get(key, [])
    assert len(values) == 1, f"{key}= should be set exactly once, is {values}"
    return values[0]


def test_type_notify_with_a_watchdog(service: dict[str, list[str]]) -> None:
    assert only(service, "Type") == "notify"
    assert only(service, "WatchdogSec") == "30"


def test_exec_start_runs_the_daemon_on_the_etc_config(service: dict[str, list[str]]) -> None:
    assert only(service, "ExecStart").split() == [DAEMON, "run", "-c", "/etc/postback-bridge/bridge.yaml"]


def test_reload_sends_sighup_to_the_main_process(service: dict[str, list[str]]) -> None:
    argv = only(service, "ExecReload").split()
    assert Path(argv[0]).name == "kill"
    assert argv[1:] == ["-HUP", "$MAINPID"]


def test_restarts_on_failure_and_gives_shutdown_time(service: dict[str, list[str]]) -> None:
    assert only(service, "Restart") == "on-failure"
    assert only(service, "RestartSec") == "2"
    assert only(service, "TimeoutStopSec") == "30"


def test_state_directory_holds_the_default_database(service: dict[str, list[str]]) -> None:
    # storage.path defaults to /var/lib/postback-bridge/bridge.db, which only this directory makes writable.
    assert only(service, "StateDirectory") == "postback-bridge"


def test_secrets_come_from_an_optional_env_file(service: dict[str, list[str]]) -> None:
    assert only(service, "EnvironmentFile") == "-/etc/postback-bridge/env"


def test_runs_unprivileged(service: dict[str, list[str]]) -> None:
    assert service.get("DynamicUser") == ["yes"] or only(service, "User") not in ("", "root", "0")
    assert only(service, "CapabilityBoundingSet") == ""
    assert only(service, "AmbientCapabilities") == ""
    assert only(service, "NoNewPrivileges") == "yes"


def test_file_system_is_locked_down(service: dict[str, list[str]]) -> None:
    assert only(service, "ProtectSystem") == "strict"
    assert only(service, "ProtectHome") == "yes"
    assert only(service, "PrivateTmp") == "yes"
    assert only(service, "PrivateDevices") == "yes"
    assert only(service, "UMask") == "0077"


def test_kernel_and_syscall_surface_is_restricted(service: dict[str, list[str]]) -> None:
    for key in (
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectControlGroups",
        "RestrictNamespaces",
        "LockPersonality",
        "MemoryDenyWriteExecute",
    ):
        assert only(service, key) == "yes", key
    assert set(only(service, "RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert only(service, "SystemCallFilter") == "@system-service"
    assert only(service, "SystemCallArchitectures") == "native"


def test_enabled_for_multi_user_target() -> None:
    assert parse_unit(UNIT.read_text())["Install"]["WantedBy"] == ["multi-user.target"]


def test_env_example_is_plain_assignments_with_placeholder_secrets() -> None:
    assignments = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        assert re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", line), f"not NAME=value: {line!r}"
        name, _, value = line.partition("=")
        assignments[name] = value
    assert assignments["TIKTOK_TOKEN_MAIN"].startswith("replace-with-")
    assert assignments["KEITARO_POSTBACK_KEY"].startswith("replace-with-")


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart's binary exists; /opt/postback-bridge does not in a checkout.
    text = UNIT.read_text()
    assert DAEMON in text
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(DAEMON, sys.executable))

    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""}
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    about_unit = [line for line in lines if UNIT.name in line]
    if result.returncode != 0 and not about_unit:
        # e.g. a container without what systemd's manager needs to load units at all: not the unit's fault.
        pytest.skip(f"systemd-analyze verify cannot run here (exit {result.returncode}): {' | '.join(lines)}")
    assert about_unit == []
    assert result.returncode == 0, lines
