"""Config errors: `check-config` and `run` exit non-zero with one line (file: key: why) per problem."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.cli import main
from bridge.config import ConfigError, load_config
from bridge.mapping import build_conversion
from tests.conftest import MAIN_CODE, REPO, base_settings, write_config

KEITARO = yaml.safe_load((REPO / "config" / "trackers" / "keitaro.yaml").read_text())


def tracker(**changes: Any) -> dict[str, Any]:
    """The shipped Keitaro tracker as another tracker file, with changes (None removes a key)."""
    data = {**KEITARO, "name": "other", "key": "", **changes}
    return {k: v for k, v in data.items() if v is not None}


def check_config(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """`postback-bridge check-config -c PATH`: exit status and the problem lines, each checked for form."""
    code = main(["check-config", "-c", str(path)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert all(line.startswith("config error: ") for line in lines), err
    return code, [line.removeprefix("config error: ") for line in lines]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
    )


@pytest.fixture
def settings() -> dict[str, Any]:
    return base_settings()


def write(
    directory: Path, settings: dict[str, Any], trackers: dict[str, dict[str, Any]] | None = None
) -> Path:
    return write_config(directory, settings, trackers)


# -- the main file ------------------------------------------------------------------------------------


def test_the_shipped_config_passes(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["check-config", "-c", str(REPO / "config" / "bridge.yaml")])

    assert code == 0
    assert "OK" in capsys.readouterr().out


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, base_settings())
    path.write_text("server:\n  port: 8080\n  host: [127.0.0.1\n")

    code, problems = check_config(path, capsys)

    assert code == 2
    [problem] = problems
    assert problem.startswith(f"{path}: YAML syntax error at line ")


def test_unknown_key_is_named_with_its_section(
    tmp_path: Path, settings: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    settings["server"]["prot"] = 8081

    code, problems = check_config(write(tmp_path, settings), capsys)

    assert code == 2
    assert problems == [f"{tmp_path / 'bridge.yaml'}: server.prot: unknown key"]


def test_a_key_written_twice_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, base_settings())
    path.write_text(path.read_text() + "default_pixel: second\ndefault_pixel: main\n")

    code, problems = check_config(path, capsys)

    assert code == 2
    [problem] = problems
    assert problem.startswith(f"{path}: YAML syntax error at line ")
    assert problem.endswith("key 'default_pixel' appears twice")


def test_statuses_are_the_text_they_are_written_as_while_settings_read_yes_as_true(
    tmp_path: Path, settings: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    # YAML 1.1 reads yes/no/on/off as booleans and 010 as 8: `yes: Lead` would be the status "true".
    path = write(tmp_path, settings)
    path.write_text(path.read_text().replace("dry_run: false", "dry_run: yes"))
    net = tmp_path / "trackers" / "net.yaml"
    net.write_text(
        "name: net\nparams: {click_id: clickid, status: status}\n"
        "events:\n  yes: Lead\n  on: Purchase\n  no: null\n  off: null\n  true: AddToCart\n  010: Contact\n"
    )

    config = load_config(path, {})

    assert config.settings.tiktok.dry_run is True
    statuses = [("yes", "Lead"), ("ON", "Purchase"), ("no", None), ("true", "AddToCart"), ("010", "Contact")]
    for status, event in statuses:
        conversion = build_conversion(config.trackers["net"], {"clickid": "c1", "status": status}, 0.0, "US")
        assert (conversion.event, conversion.ignored_reason is None) == (event, event is not None)
    # A value is still read as YAML reads it: `key: off` is no key at all, not the key "off".
    net.write_text(net.read_text() + "key: off\n")
    code, problems = check_config(path, capsys)
    assert code == 2
    assert problems == [f"{net}: key: Input should be a valid string"]


def test_wrong_type_is_named(
    tmp_path: Path, settings: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    settings["server"]["port"] = "eighty"

    code, problems = check_config(write(tmp_path, settings), capsys)

    assert code == 2
    [problem] = problems
    assert problem.startswith(f"{tmp_path / 'bridge.yaml'}: server.port: Input should be a valid integer")


@pytest.mark.parametrize(
    ("size", "why"), [(0, "greater than or equal to 1"), (1001, "less than or equal to 1000")]
)
def test_batch_size_outside_1_to_1000_is_an_error(
    tmp_path: Path, settings: dict[str, Any], capsys: pytest.CaptureFixture[str], size: int, why: str
) -> None:
    settings["tiktok"]["batch_size"] = size

    code, problems = check_config(write(tmp_path, settings), capsys)

    assert code == 2
    assert problems == [f"{tmp_path / 'bridge.yaml'}: tiktok.batch_size: Input should be {why}"]


@pytest.mark.parametrize("value", [".inf", ".nan"])
def test_a_duration_that_is_not_a_finite_number_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    path = write(tmp_path, base_settings())
    path.write_text(path.read_text() + f"delivery:\n  max_event_age: {value}\n")

    code, problems = check_config(path, capsys)

    assert code == 2
    [problem] = problems
    assert problem.startswith(f"{path}: delivery.max_event_age: ")


def test_unset_environment_variable_names_the_key(
    tmp_path: Path,
    settings: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("BRIDGE_TEST_UNSET_TOKEN", raising=False)
    settings["pixels"]["main"]["access_token"] = "${BRIDGE_TEST_UNSET_TOKEN}"

    code, problems = check_config(write(tmp_path, settings), capsys)

    assert code == 2
    assert problems == [
        f"{tmp_path / 'bridge.yaml'}: pixels.main.access_token: environment variable BRIDGE_TEST_UNSET_TOKEN "
        "is not set (add BRIDGE_TEST_UNSET_TOKEN=... to the service's env file and run commands through `pb`,"
        " as docs/deployment.md shows; or write ${BRIDGE_TEST_UNSET_TOKEN:-default})"
    ]


def test_a_default_is_taken_for_a_variable_set_but_empty(tmp_path: Path, settings: dict[str, Any]) -> None:
    # As the shell does: `TIKTOK_PIXEL_MAIN=` left empty in the env file keeps the default in force.
    settings["pixels"]["main"]["code"] = f"${{BRIDGE_TEST_PIXEL:-{MAIN_CODE}}}"

    config = load_config(write(tmp_path, settings), environ={"BRIDGE_TEST_PIXEL": ""})

    assert config.pixel("main").code == MAIN_CODE


def test_a_variable_set_but_empty_without_a_default_stays_empty(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    settings["pixels"]["second"]["test_event_code"] = "before-${BRIDGE_TEST_CODE}-after"

    config = load_config(write(tmp_path, settings), environ={"BRIDGE_TEST_CODE": ""})

    assert config.pixel("second").test_event_code == "before--after"


@pytest.mark.parametrize("written", ["${BRIDGE_TEST_TOKEN-fallback}", "${BRIDGE_TEST_TOKEN:=x}", "a${B C}"])
def test_a_shell_form_that_is_not_expanded_is_an_error_that_quotes_nothing(
    tmp_path: Path, settings: dict[str, Any], capsys: pytest.CaptureFixture[str], written: str
) -> None:
    # Kept as text, the token would be sent to TikTok as it is written.
    settings["pixels"]["main"]["access_token"] = written

    code, problems = check_config(write(tmp_path, settings), capsys)

    assert code == 2
    [problem] = problems
    at = written.index("${") + 1
    assert problem == (
        f"{tmp_path / 'bridge.yaml'}: pixels.main.access_token: the '${{' at character {at} is not expanded:"
        " only ${NAME} and ${NAME:-default} are"
    )


def test_an_unset_variable_does_not_hide_the_other_problems(
    tmp_path: Path,
    settings: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("BRIDGE_TEST_UNSET_TOKEN", raising=False)
    settings["pixels"]["main"]["access_token"] = "${BRIDGE_TEST_UNSET_TOKEN}"
    settings["tiktok"]["batch_size"] = 5000
    settings["server"]["serverr"] = 1

    code, problems = check_config(write(tmp_path, settings), capsys)

    assert code == 2
    # Its empty value is not reported again as an empty token.
    assert [p.split(": ")[1] for p in problems] == [
        "pixels.main.access_token",
        "server.serverr",
        "tiktok.batch_size",
    ]
    assert "environment variable BRIDGE_TEST_UNSET_TOKEN is not set" in problems[0]


def test_default_pixel_that_does_not_exist_is_named(
    tmp_path: Path, settings: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    settings["default_pixel"] = "nosuch"

    code, problems = check_config(write(tmp_path, settings), capsys)

    assert code == 2
    assert problems == [f"{tmp_path / 'bridge.yaml'}: default_pixel: 'nosuch' is not one of pixels"]


def test_yaml_python_tags_are_refused_and_never_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "ran"
    path = write(tmp_path, base_settings())
    path.write_text(path.read_text() + f'partner: !!python/object/apply:os.system ["touch {marker}"]\n')

    code, problems = check_config(path, capsys)

    assert code == 2
    [problem] = problems
    assert problem.startswith(f"{path}: YAML syntax error at line ")
    assert "could not determine a constructor for the tag" in problem
    assert not marker.exists()


def test_missing_config_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, problems = check_config(tmp_path / "nosuch.yaml", capsys)

    assert code == 2
    assert problems == [f"{tmp_path / 'nosuch.yaml'}: cannot read: No such file or directory"]


def test_every_problem_is_reported_at_once(
    tmp_path: Path, settings: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    settings["server"]["port"] = 0
    settings["tiktok"]["batch_size"] = 5000
    settings["matching"] = {"default_phone_region": "XX"}

    code, problems = check_config(write(tmp_path, settings), capsys)

    assert code == 2
    assert [p.split(": ")[1] for p in problems] == [
        "server.port",
        "tiktok.batch_size",
        "matching.default_phone_region",
    ]


# -- tracker files ------------------------------------------------------------------------------------


def tracker_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], **changes: Any
) -> tuple[Path, int, list[str]]:
    path = write(tmp_path, base_settings(), {"other": tracker(**changes)})
    code, problems = check_config(path, capsys)
    return tmp_path / "trackers" / "other.yaml", code, problems


def test_tracker_yaml_syntax_error_names_the_tracker_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, base_settings())
    bad = tmp_path / "trackers" / "broken.yaml"
    bad.write_text("name: broken\nparams: {click_id: subid\n")

    code, problems = check_config(path, capsys)

    assert code == 2
    [problem] = problems
    assert problem.startswith(f"{bad}: YAML syntax error at line ")


def test_unknown_tracker_key_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file, code, problems = tracker_problems(tmp_path, capsys, allowed_ips=["10.0.0.0/8"])

    assert code == 2
    assert problems == [f"{file}: allowed_ips: unknown key"]


def test_tracker_without_a_click_id_mapping_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file, code, problems = tracker_problems(tmp_path, capsys, params={"status": "status"})

    assert code == 2
    assert problems == [f"{file}: params: click_id must be mapped to the tracker's click id parameter"]


def test_tracker_without_params_at_all_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file, code, problems = tracker_problems(tmp_path, capsys, params=None)

    assert code == 2
    assert problems == [f"{file}: params: click_id must be mapped to the tracker's click id parameter"]


def test_tracker_parameter_name_must_not_be_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file, code, problems = tracker_problems(tmp_path, capsys, params={"click_id": "subid", "status": ""})

    assert code == 2
    assert problems == [f"{file}: params: status: empty parameter name"]


@pytest.mark.parametrize("name", ["Keitaro Main", "../keitaro", "a/b", "keitaro?x=1", "", "-x"])
def test_tracker_name_that_is_not_url_safe_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    file, code, problems = tracker_problems(tmp_path, capsys, name=name)

    assert code == 2
    assert problems == [f"{file}: name: must be URL-safe: lowercase letters, digits, '-' or '_', at most 64"]


def test_two_trackers_with_one_name_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file, code, problems = tracker_problems(tmp_path, capsys, name="keitaro")

    assert code == 2
    [problem] = problems
    # The files are read in name order: the second one with the name is the one named.
    assert problem.startswith(f"{file}: name: 'keitaro' is already used by ")
    assert problem.endswith("keitaro.yaml")


def test_tracker_pixel_that_does_not_exist_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file, code, problems = tracker_problems(tmp_path, capsys, pixel="nosuch")

    assert code == 2
    assert problems == [f"{file}: pixel: 'nosuch' is not one of pixels in the main config"]


def test_event_routed_to_a_pixel_that_does_not_exist_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file, code, problems = tracker_problems(
        tmp_path, capsys, events={"sale": {"event": "Purchase", "pixel": "nosuch"}, "lead": "Lead"}
    )

    assert code == 2
    assert problems == [f"{file}: events.sale.pixel: 'nosuch' is not one of pixels in the main config"]


def test_empty_event_name_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file, code, problems = tracker_problems(tmp_path, capsys, events={"sale": ""})

    assert code == 2
    assert problems == [f"{file}: events.sale.event: String should have at least 1 character"]


def test_event_id_template_with_a_format_spec_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file, code, problems = tracker_problems(tmp_path, capsys, event_id="{click_id:d}_{event}")

    assert code == 2
    [problem] = problems
    assert problem.startswith(f"{file}: event_id: fields take no format spec or conversion")


def test_tracker_default_currency_must_be_an_iso_4217_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file, code, problems = tracker_problems(tmp_path, capsys, default_currency="ZZZ")

    assert code == 2
    assert problems == [f"{file}: default_currency: must be a three-letter ISO 4217 code"]


def test_tracker_unset_environment_variable_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BRIDGE_TEST_UNSET_KEY", raising=False)

    file, code, problems = tracker_problems(tmp_path, capsys, key="${BRIDGE_TEST_UNSET_KEY}")

    assert code == 2
    [problem] = problems
    assert problem.startswith(f"{file}: key: environment variable BRIDGE_TEST_UNSET_KEY is not set")


def warnings_of(path: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    code = main(["check-config", "-c", str(path)])
    err = capsys.readouterr().err
    assert code == 0, err
    return [line.removeprefix("warning: ") for line in err.splitlines()]


def test_tracker_traps_that_lose_every_postback_are_warned_about(
    service_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "Ab+cd/ef=="  # what `openssl rand -base64` gives; '+' arrives as a space unless encoded
    trackers = {
        "plus": tracker(name="plus", key=secret),
        "mute": tracker(name="mute", events={"sale": None, "lead": None}),
        "flat": tracker(name="flat", params={"click_id": "subid"}),
        "fine": tracker(name="fine", key="k3y-0123456789abcdef"),
    }
    trackers_dir = service_dir / "trackers"
    path = write(service_dir, base_settings(), trackers)
    (trackers_dir / "extra.yml").write_text(yaml.safe_dump(tracker(name="extra")))

    warnings = warnings_of(path, capsys)

    assert warnings == [
        f"{trackers_dir / 'extra.yml'}: not read: tracker files end in .yaml",
        f"{trackers_dir / 'flat.yaml'}: params: no status parameter, so every postback is recorded as ignored"
        " (map status to the tracker's status parameter)",
        f"{trackers_dir / 'mute.yaml'}: events: no status is mapped to an event, so nothing this tracker"
        " reports is sent",
        f"{trackers_dir / 'plus.yaml'}: key: has characters a URL carries only percent-encoded ('+' '/' '='):"
        " paste the key into the postback URL encoded, or use letters and digits only (openssl rand -hex 16)",
    ]
    assert not any(secret in w for w in warnings)


def test_a_test_event_code_left_in_is_warned_about_and_named_in_the_mode(
    service_dir: Path, settings: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    settings["pixels"]["second"]["test_event_code"] = "TEST12345"
    path = write(service_dir, settings)

    assert warnings_of(path, capsys) == [
        f"{path}: pixels.second.test_event_code: set, so every event sent for this pixel is a test event"
        " (shown under Test Events, not counted as a conversion); clear it once the test is done"
    ]
    main(["check-config", "-c", str(path)])
    assert capsys.readouterr().out.rstrip().endswith("live, test events only for second")

    settings["tiktok"]["dry_run"] = True  # nothing reaches TikTok: the code does no harm
    assert warnings_of(write(service_dir, settings), capsys) == []


def test_finished_conversions_kept_shorter_than_events_are_sent_is_warned_about(
    service_dir: Path, settings: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    settings["retention"] = {"finished_conversions": 86400}
    path = write(service_dir, settings)

    assert warnings_of(path, capsys) == [
        f"{path}: retention.finished_conversions: 86400 s is shorter than delivery.max_event_age (604800 s):"
        " a tracker's resend of a conversion pruned already is taken as new and sent again (and a rebill"
        " after it loses its _{transaction_id} suffix)"
    ]
    settings["retention"] = {"finished_conversions": 604800}
    assert warnings_of(write(service_dir, settings), capsys) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="only root reads a file other users cannot")
def test_a_file_the_service_user_cannot_read_is_warned_about_when_root_checks_it(
    service_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        service_dir, base_settings(), {"private": tracker(name="private", key="k3y-0123456789abcdef")}
    )
    private = service_dir / "trackers" / "private.yaml"
    private.chmod(0o600)  # as `install -m 600`, or an editor under umask 077, leaves it

    assert warnings_of(path, capsys) == [
        f"{private}: not readable by other users (mode 600), so the service's own user cannot read it:"
        f" chmod 644 {private}"
    ]
    private.chmod(0o644)
    assert warnings_of(path, capsys) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="only root passes through a directory other users cannot")
@pytest.mark.parametrize(
    ("mode", "cannot", "grant"), [(0o700, "list or enter", "rx"), (0o711, "list", "r")], ids=["700", "711"]
)
def test_a_trackers_directory_the_service_user_cannot_list_is_warned_about_when_root_checks_it(
    service_dir: Path, capsys: pytest.CaptureFixture[str], mode: int, cannot: str, grant: str
) -> None:
    path = write(service_dir, base_settings())
    trackers_dir = service_dir / "trackers"
    trackers_dir.chmod(mode)  # as `install -d -m 700`, or mkdir under umask 077, leaves it

    assert warnings_of(path, capsys) == [
        f"{trackers_dir}: a directory other users cannot {cannot} (mode {mode:03o}), so the service's own"
        f" user cannot read the tracker files in it: chmod o+{grant} {trackers_dir}"
    ]
    trackers_dir.chmod(0o755)
    assert warnings_of(path, capsys) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="only root passes through a directory other users cannot")
def test_a_directory_above_the_config_the_service_user_cannot_enter_is_warned_about_when_root_checks_it(
    service_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    etc = service_dir / "etc"
    path = write(etc / "postback-bridge", base_settings())
    etc.chmod(0o700)

    assert warnings_of(path, capsys) == [
        f"{etc}: a directory other users cannot enter (mode 700), so the service's own user cannot reach the"
        f" config files below it: chmod o+x {etc}"
    ]
    etc.chmod(0o755)
    assert warnings_of(path, capsys) == []


def test_a_value_written_as_a_shell_variable_is_warned_about(
    service_dir: Path, settings: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    settings["pixels"]["main"]["access_token"] = "$TIKTOK_TOKEN"
    path = write(service_dir, settings, {"other": tracker(key="$KEITARO_KEY")})

    warnings = warnings_of(path, capsys)

    assert warnings == [
        f"{path}: pixels.main.access_token: a value of the form $NAME is taken as it is;"
        " write ${NAME} to use the variable",
        f"{service_dir / 'trackers' / 'other.yaml'}: key: a value of the form $NAME is taken as it is;"
        " write ${NAME} to use the variable",
    ]


def test_a_variable_whose_value_looks_like_one_is_neither_warned_about_nor_shown(
    service_dir: Path, settings: dict[str, Any]
) -> None:
    secret = "$abcTOKEN123"
    settings["pixels"]["main"]["access_token"] = "${BRIDGE_TEST_TOKEN}"
    path = write(service_dir, settings)

    # A subprocess: the variable is read from its environment, as the daemon reads it.
    config_out = subprocess.run(
        [sys.executable, "-m", "bridge", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "BRIDGE_TEST_TOKEN": secret},
    )

    assert config_out.returncode == 0
    assert config_out.stderr == ""
    assert secret not in config_out.stdout


def test_an_unset_trackers_dir_is_one_problem_not_every_file_around(
    tmp_path: Path,
    settings: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Empty, trackers_dir would be the config's own directory, where bridge.yaml is no tracker file.
    monkeypatch.delenv("BRIDGE_TEST_UNSET_DIR", raising=False)
    settings["trackers_dir"] = "${BRIDGE_TEST_UNSET_DIR}"
    path = write(tmp_path, settings)
    (tmp_path / "stray.yaml").write_text("name: stray\n")

    code, problems = check_config(path, capsys)

    assert code == 2
    assert problems == [
        f"{path}: trackers_dir: environment variable BRIDGE_TEST_UNSET_DIR is not set"
        " (add BRIDGE_TEST_UNSET_DIR=... to the service's env file and run commands through `pb`,"
        " as docs/deployment.md shows; or write ${BRIDGE_TEST_UNSET_DIR:-default})"
    ]


def test_an_unset_variable_in_a_list_is_reported_once(
    tmp_path: Path,
    settings: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("BRIDGE_TEST_UNSET_PROXY", raising=False)
    settings["server"]["trusted_proxies"] = ["127.0.0.1/32", "${BRIDGE_TEST_UNSET_PROXY}"]

    code, problems = check_config(write(tmp_path, settings), capsys)

    assert code == 2
    [problem] = problems
    assert "server.trusted_proxies[1]: environment variable BRIDGE_TEST_UNSET_PROXY is not set" in problem


def test_tracker_problems_are_named_in_the_same_run_as_the_main_files(
    tmp_path: Path, settings: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    settings["tiktok"]["batch_size"] = 5000
    path = write(
        tmp_path,
        settings,
        {
            "other": tracker(allowed_ips=["10.0.0.0/8"]),
            # Which pixels there are is known only from a valid main file: checked once it is.
            "elsewhere": tracker(name="elsewhere", pixel="nosuch"),
        },
    )

    code, problems = check_config(path, capsys)

    assert code == 2
    assert [p.split(": ")[:2] for p in problems] == [
        [str(path), "tiktok.batch_size"],
        [str(tmp_path / "trackers" / "other.yaml"), "allowed_ips"],
    ]


def test_a_main_file_with_problems_still_says_where_its_tracker_files_are(
    tmp_path: Path, settings: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    settings["server"]["port"] = 0
    settings["trackers_dir"] = "networks"
    path = write(tmp_path, settings, {"other": tracker(name="Bad Name")})
    (tmp_path / "trackers").rename(tmp_path / "networks")

    code, problems = check_config(path, capsys)

    assert code == 2
    assert [p.split(": ")[:2] for p in problems] == [
        [str(path), "server.port"],
        [str(tmp_path / "networks" / "other.yaml"), "name"],
    ]


@pytest.mark.parametrize("where", ["misspelt", "in another section"])
def test_a_main_file_with_an_unknown_key_reads_no_tracker_file_from_the_default_directory(
    tmp_path: Path, settings: dict[str, Any], capsys: pytest.CaptureFixture[str], where: str
) -> None:
    # The unknown key may be the trackers_dir meant: the default directory holds files it does not use.
    meant = settings.pop("trackers_dir")
    if where == "misspelt":
        settings["tracker_dir"] = meant
    else:
        settings["server"]["trackers_dir"] = meant
    path = write(tmp_path, settings, {"old": tracker(name="Bad Name")})

    code, problems = check_config(path, capsys)

    assert code == 2
    [problem] = problems
    assert problem.endswith(": unknown key")


def test_a_main_file_that_cannot_be_read_names_no_tracker_file(
    tmp_path: Path, settings: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    # Where its trackers_dir points is unknown: the default directory may hold files it does not use.
    path = write(tmp_path, settings, {"other": tracker(name="Bad Name")})
    path.write_text(path.read_text() + "server: [\n")

    code, problems = check_config(path, capsys)

    assert code == 2
    [problem] = problems
    assert problem.startswith(f"{path}: YAML syntax error")


def test_tracker_problems_never_show_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = "pk-do-not-print-5b1e"
    _, code, problems = tracker_problems(tmp_path, capsys, key=secret, name="Bad Name", pixel="nosuch")

    assert code == 2
    assert problems
    assert not any(secret in p for p in problems)


# -- the real commands, as subprocesses ---------------------------------------------------------------


def broken_config(directory: Path) -> Path:
    settings = base_settings()
    settings["tiktok"]["batch_size"] = 0
    return write_config(directory, settings, {"other": tracker(params={"status": "status"})})


def test_check_config_command_exits_2_with_one_line_per_problem(tmp_path: Path) -> None:
    path = broken_config(tmp_path)

    result = cli("check-config", "-c", str(path))

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"config error: {path}: tiktok.batch_size: Input should be greater than or equal to 1",
        f"config error: {path.parent / 'trackers' / 'other.yaml'}: params: click_id must be mapped to the"
        " tracker's click id parameter",
    ]


def test_run_with_an_invalid_config_exits_2_before_starting(tmp_path: Path) -> None:
    settings = base_settings()
    settings["server"]["port"] = 70000
    path = write_config(tmp_path, settings, {"other": tracker(params={"status": "status"})})

    result = cli("run", "-c", str(path))

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"config error: {path}: server.port: Input should be less than or equal to 65535",
        f"config error: {path.parent / 'trackers' / 'other.yaml'}: params: click_id must be mapped to the"
        " tracker's click id parameter",
    ]


def test_run_with_a_broken_tracker_file_names_it(tmp_path: Path) -> None:
    path = write_config(tmp_path, base_settings(), {"other": tracker(name="Not/Safe")})

    result = cli("run", "-c", str(path))

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"config error: {tmp_path / 'trackers' / 'other.yaml'}: name: must be URL-safe: "
        "lowercase letters, digits, '-' or '_', at most 64",
    ]


def test_run_on_a_port_already_in_use_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = base_settings()
        settings["server"]["port"] = taken.getsockname()[1]

        result = cli("run", "-c", str(write_config(tmp_path, settings)))

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("postback-bridge: ")
    assert "address already in use" in last
    assert str(settings["server"]["port"]) in last


def test_run_with_an_unusable_storage_path_is_one_line_and_exit_1(tmp_path: Path) -> None:
    (tmp_path / "not-a-directory").write_text("")
    settings = base_settings()
    settings["storage"]["path"] = "not-a-directory/bridge.db"

    result = cli("run", "-c", str(write_config(tmp_path, settings)))

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    database = tmp_path / "not-a-directory" / "bridge.db"
    last = result.stderr.splitlines()[-1]
    assert last.startswith("postback-bridge: storage.path: cannot ")
    assert str(database) in last


def problems_as_nobody(path: Path) -> list[str]:
    """load_config's problems as the unprivileged user `nobody` sees them, from a forked child that
    gives up root first (its Python need not be runnable by that user: it is already loaded)."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only os._exit leaves it, whatever happens
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            try:
                load_config(path)
                problems = []
            except ConfigError as exc:
                problems = exc.problems
            os.write(write_end, json.dumps(problems).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as answer:
        text = answer.read()
    os.waitpid(pid, 0)
    return json.loads(text)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can become another user to check its access")
def test_a_tracker_directory_the_service_user_cannot_list_is_a_config_problem(service_dir: Path) -> None:
    path = write(service_dir, base_settings(), {"net": tracker(name="net")})
    (service_dir / "trackers").chmod(0o711)  # enterable, not listable: as under `umask 066`

    # What the service's user would see. Listed, the directory seemed empty: no tracker, every URL a 404.
    assert problems_as_nobody(path) == [
        f"{path}: trackers_dir: cannot list {service_dir / 'trackers'}: Permission denied"
    ]
