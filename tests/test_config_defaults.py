"""Config defaults: a main file holding only its pixel runs on the defaults the contract shows."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import yaml

from bridge.config import load_config
from tests.conftest import MAIN_CODE, MAIN_TOKEN

# The contract's defaults (SPEC, section 3), key by key.
CONTRACT_DEFAULTS = {
    "server": {
        "host": "127.0.0.1",
        "port": 8080,
        "trusted_proxies": [],
        "click_limit_per_minute": 600,
    },
    "storage": {"path": "/var/lib/postback-bridge/bridge.db"},
    "tiktok": {
        "endpoint": "https://business-api.tiktok.com/open_api/v1.3/event/track/",
        "dry_run": False,
        "timeout": 10,
        "batch_size": 500,
        "partner_name": "postback-bridge",
    },
    "default_pixel": "main",
    "matching": {"default_phone_region": "US"},
    "delivery": {"max_attempts": 20, "max_event_age": 604800},
    "trackers_dir": "trackers",
    "retention": {"clicks": 2592000, "finished_conversions": 7776000},
}


def minimal_config(directory: Path) -> Path:
    """A main file with nothing but one pixel's code and token, beside an empty trackers directory."""
    (directory / "trackers").mkdir()
    path = directory / "bridge.yaml"
    path.write_text(yaml.safe_dump({"pixels": {"main": {"code": MAIN_CODE, "access_token": MAIN_TOKEN}}}))
    return path


def test_a_main_file_with_only_a_pixel_gets_every_default_the_contract_shows(tmp_path: Path) -> None:
    settings = load_config(minimal_config(tmp_path), environ={}).settings.model_dump()

    shown = {
        key: {name: settings[key][name] for name in value} if isinstance(value, dict) else settings[key]
        for key, value in CONTRACT_DEFAULTS.items()
    }
    assert shown == CONTRACT_DEFAULTS


def test_a_pixel_with_only_code_and_token_sends_no_test_events(tmp_path: Path) -> None:
    config = load_config(minimal_config(tmp_path), environ={})

    assert config.pixel("main").test_event_code == ""
    assert config.settings.test_event_pixels() == []


def test_the_default_paths_are_the_state_directory_and_trackers_beside_the_config(tmp_path: Path) -> None:
    config = load_config(minimal_config(tmp_path), environ={})

    assert config.db_path == Path("/var/lib/postback-bridge/bridge.db")
    assert config.trackers_dir == tmp_path / "trackers"


def test_the_keys_beyond_the_contract_default_to_one_listener_and_metrics_for_loopback_only(
    tmp_path: Path,
) -> None:
    server = load_config(minimal_config(tmp_path), environ={}).settings.server

    assert server.listeners == 1
    assert server.metrics_token == ""
    assert server.metrics_allow_ips == [
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    ]


def test_a_tracker_file_with_only_a_name_and_click_id_gets_the_contract_defaults(tmp_path: Path) -> None:
    path = minimal_config(tmp_path)
    (tmp_path / "trackers" / "net.yaml").write_text(
        yaml.safe_dump({"name": "net", "params": {"click_id": "cid"}})
    )

    config = load_config(path, environ={})

    net = config.trackers["net"]
    assert net.key == ""  # no key check
    assert net.allow_ips == []  # any source address
    assert net.default_currency == "USD"
    assert net.event_id == "{click_id}_{event}"
    assert net.pixel is None  # no pixel of its own: its conversions go to default_pixel
