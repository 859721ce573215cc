"""Event names in tracker files: TikTok's standard and legacy names pass `check-config` quietly; any
other name is sent as a custom event, with a warning, since a typo would go unoptimised."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.cli import main
from tests.conftest import base_settings, write_config

# The standard events of the Events API reference, and the legacy names TikTok still converts.
STANDARD = [
    "AddPaymentInfo",
    "AddToCart",
    "AddToWishlist",
    "ApplicationApproval",
    "CompleteRegistration",
    "Contact",
    "CustomizeProduct",
    "Download",
    "FindLocation",
    "InitiateCheckout",
    "Lead",
    "Purchase",
    "Schedule",
    "Search",
    "StartTrial",
    "SubmitApplication",
    "Subscribe",
    "ViewContent",
]
LEGACY = ["CompletePayment", "SubmitForm", "PlaceAnOrder", "ClickButton"]


def check_config(directory: Path, capsys: pytest.CaptureFixture[str], events: dict[str, str]) -> str:
    tracker = {"name": "net", "params": {"click_id": "cid", "status": "st"}, "events": events}
    path = write_config(directory, base_settings(), {"net": tracker}, shipped=False)
    assert main(["check-config", "-c", str(path)]) == 0
    return capsys.readouterr().err


def test_every_standard_and_legacy_event_name_passes_without_a_warning(
    service_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = {f"s{i}": name for i, name in enumerate(STANDARD + LEGACY)}

    assert "warning" not in check_config(service_dir, capsys, events)


@pytest.mark.parametrize("name", ["Purchse", "purchase", "Registration"])
def test_any_other_name_is_warned_about_as_a_custom_event(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    err = check_config(tmp_path, capsys, {"sale": "Purchase", "other": name})

    assert f"events.other: {name!r} is not a TikTok standard event" in err
    assert "events.sale" not in err
