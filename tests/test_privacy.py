"""Email, phone and external_id are hashed where they enter: none of their raw forms reach the database
files, the logs, `explain` or an error message, while their SHA-256 hashes reach TikTok."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from bridge.cli import main as cli_main
from bridge.logs import configure
from bridge.matching import sha256_hex
from tests.conftest import Bridge, BridgeFactory

# A tracker that forwards the identifiers a network collected on its form.
SHOP = {
    "name": "shop",
    "params": {
        "click_id": "cid",
        "status": "status",
        "currency": "cur",
        "ttclid": "ttclid",
        "email": "email",
        "phone": "phone",
        "external_id": "uid",
        "page_url": "page",
    },
    "events": {"sale": "Purchase", "lead": "Lead"},
}

# What the landing page's form sent with the click, and what the network sent with the postback.
CLICK_EMAIL, CLICK_PHONE, CLICK_UID = " Bob.Clicker@Example.ORG ", "(213) 373-4253", "crm-bob-7781"
POST_EMAIL, POST_PHONE, POST_UID = "Alice.Buyer+promo@Example.COM", "+44 20 7946 0958", "crm-alice-9924"

# Every form in which a raw identifier could leak: as given, trimmed, lower-cased, E.164, digits
# only, and URL-encoded the way a logged query string would show it.
RAW_FORMS = (
    "bob.clicker",
    "bob.clicker@example.org",
    "+12133734253",
    "2133734253",
    "213) 373-4253",
    "213%29+373-4253",
    CLICK_UID,
    "alice.buyer",
    "alice.buyer+promo@example.com",
    "alice.buyer%2bpromo%40example.com",
    "+442079460958",
    "442079460958",
    "2079460958",
    "20 7946 0958",
    "20+7946+0958",
    "20%207946%200958",
    POST_UID,
)

HASHES = {
    "click_email": sha256_hex("bob.clicker@example.org"),
    "click_phone": sha256_hex("+12133734253"),
    "click_uid": sha256_hex(CLICK_UID),
    "post_email": sha256_hex("alice.buyer+promo@example.com"),
    "post_phone": sha256_hex("+442079460958"),
    "post_uid": sha256_hex(POST_UID),
}


def leaks(text: str | bytes) -> list[str]:
    """The raw forms found in `text`, compared case-insensitively."""
    haystack = (text.decode("latin-1") if isinstance(text, bytes) else text).lower()
    return [form for form in RAW_FORMS if form.lower() in haystack]


async def shop_bridge(make_bridge: BridgeFactory, **settings: Any) -> Bridge:
    def edit(config: dict[str, Any]) -> None:
        config["tiktok"].update(settings)

    return await make_bridge(edit=edit, trackers={"shop": SHOP})


async def register_and_convert(bridge: Bridge) -> None:
    """One click carrying the form's identifiers, one postback carrying the network's, delivered."""
    status = await bridge.click(
        click_id="priv1",
        ttclid="E.C.P.priv1",
        email=CLICK_EMAIL,
        phone=CLICK_PHONE,
        external_id=CLICK_UID,
        headers={"User-Agent": "Mozilla/5.0 (Privacy test)"},
    )
    assert status == 204
    # A second click whose identifiers the postback does not override: they reach TikTok from the click.
    assert await bridge.click(click_id="priv2", email=CLICK_EMAIL, phone=CLICK_PHONE) == 204
    for click_id, extra in (
        ("priv1", {"email": POST_EMAIL, "phone": POST_PHONE, "uid": POST_UID}),
        ("priv2", {}),
    ):
        code, body = await bridge.postback("shop", cid=click_id, status="sale", **extra)
        assert (code, body["result"]) == (200, "accepted")
    await bridge.deliver()


def database_bytes(bridge: Bridge) -> bytes:
    db = bridge.config.db_path
    return b"".join(path.read_bytes() for path in sorted(db.parent.glob(db.name + "*")))


# -- the database ------------------------------------------------------------------------------------


async def test_raw_identifiers_never_reach_the_database_files(make_bridge: BridgeFactory) -> None:
    bridge = await shop_bridge(make_bridge)
    await register_and_convert(bridge)

    # Before a checkpoint the rows live in the -wal file; after it, in the main file.
    before = database_bytes(bridge)
    assert Path(f"{bridge.config.db_path}-wal").stat().st_size > 0
    await bridge.store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    after = bridge.config.db_path.read_bytes()

    assert leaks(before) == []
    assert leaks(after) == []
    for name, digest in HASHES.items():
        assert digest.encode() in before, name
        assert digest.encode() in after, name


async def test_tiktok_gets_the_hashes_from_the_postback_and_from_the_click(
    make_bridge: BridgeFactory,
) -> None:
    bridge = await shop_bridge(make_bridge)
    await register_and_convert(bridge)

    users = {event["event_id"]: event["user"] for event in bridge.fake.received}
    # Values in the postback win; the click fills what the postback lacks.
    assert users["priv1_Purchase"]["email"] == [HASHES["post_email"]]
    assert users["priv1_Purchase"]["phone"] == [HASHES["post_phone"]]
    assert users["priv1_Purchase"]["external_id"] == [HASHES["post_uid"]]
    assert users["priv2_Purchase"]["email"] == [HASHES["click_email"]]
    assert users["priv2_Purchase"]["phone"] == [HASHES["click_phone"]]
    assert leaks(json.dumps(bridge.fake.received)) == []


async def test_already_hashed_identifiers_are_passed_through_not_hashed_again(
    make_bridge: BridgeFactory,
) -> None:
    bridge = await shop_bridge(make_bridge)
    digest = HASHES["post_email"]
    await bridge.click(click_id="h1", ttclid="E.C.P.h1", phone=HASHES["click_phone"].upper())
    await bridge.postback("shop", cid="h1", status="lead", email=digest.upper())
    await bridge.deliver()

    [event] = bridge.fake.received
    assert event["user"]["email"] == [digest]
    assert event["user"]["phone"] == [HASHES["click_phone"]]


async def test_page_url_loses_query_parameters_that_carry_an_email_or_phone(bridge: Bridge) -> None:
    await bridge.click(
        click_id="u1",
        ttclid="E.C.P.u1",
        url="https://lp.example/thanks?step=2&email=Alice.Buyer%2Bpromo%40Example.COM&tel=%2B442079460958#top",
        # A phone number under a name no list could foresee gives itself away by its '+'.
        referrer="https://lp.example/form?next=%2Fthanks&contact=alice.buyer%2Bpromo%40example.com&n=%2B14155550100",
    )
    await bridge.postback("keitaro", subid="u1", status="lead")
    await bridge.deliver()

    [row] = await bridge.store.fetchall("SELECT url, referrer FROM clicks WHERE click_id = 'u1'")
    assert tuple(row) == ("https://lp.example/thanks?step=2", "https://lp.example/form?next=%2Fthanks")
    assert bridge.fake.received[0]["page"] == {"url": "https://lp.example/thanks?step=2"}


async def test_a_postbacks_page_url_loses_query_parameters_that_carry_an_email_or_phone(
    make_bridge: BridgeFactory,
) -> None:
    bridge = await shop_bridge(make_bridge)
    page = "https://shop.example/thanks?order=7&email=Alice.Buyer%2Bpromo%40Example.COM&n=%2B442079460958"

    _, body = await bridge.postback("shop", cid="pg1", ttclid="E.C.P.pg1", status="sale", page=page)
    await bridge.deliver()

    assert (await bridge.row(body["conversion_id"]))["page_url"] == "https://shop.example/thanks?order=7"
    [event] = bridge.fake.received
    assert event["page"] == {"url": "https://shop.example/thanks?order=7"}
    assert leaks(database_bytes(bridge)) == []


# -- what the bridge writes or prints --------------------------------------------------------------------


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """The bridge's log output (structlog and the standard library) as JSON lines, at DEBUG."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    configure(stream, json=True, level=logging.DEBUG)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.reset_defaults()


async def test_raw_identifiers_never_reach_the_logs(
    make_bridge: BridgeFactory, captured_logs: io.StringIO
) -> None:
    # Dry run logs every payload in full: the most a log line ever holds about an event.
    bridge = await shop_bridge(make_bridge, dry_run=True)
    await register_and_convert(bridge)
    # Rejected and partly unusable requests are logged too.
    await bridge.postback("shop", cid="bad", status="sale", cur="dollars", email=POST_EMAIL, phone=POST_PHONE)
    await bridge.postback("shop", cid="drop", status="sale", email=POST_EMAIL, phone="20 7946 0958 ext")
    await bridge.click(click_id="drop", email=CLICK_EMAIL, phone="213) 373-4253 x")
    await bridge.deliver()

    text = captured_logs.getvalue()
    assert "priv1_Purchase" in text and "dry run" in text  # the log was captured
    assert leaks(text) == []


async def test_raw_identifiers_never_reach_explain_output(
    make_bridge: BridgeFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    bridge = await shop_bridge(make_bridge)
    await bridge.click(click_id="ex1", email=CLICK_EMAIL, external_id=CLICK_UID)
    url = "/postback/shop?cid=ex1&status=sale&phone=%2B44+20+7946+0958&uid=" + POST_UID

    code = await asyncio.to_thread(cli_main, ["explain", "-c", str(bridge.config.path), url])
    out, err = capsys.readouterr()

    assert code == 0
    result = json.loads(out)
    assert result["click_found"] is True
    user = result["event"]["user"]
    assert (user["email"], user["phone"], user["external_id"]) == (
        [HASHES["click_email"]],
        [HASHES["post_phone"]],
        [HASHES["post_uid"]],
    )
    assert leaks(out + err) == []


async def test_error_answers_never_echo_raw_identifiers(make_bridge: BridgeFactory) -> None:
    bridge = await shop_bridge(make_bridge)
    answers = [
        await bridge.postback("shop", cid="e1", status="sale", cur="dollars", email=POST_EMAIL),
        await bridge.postback("shop", cid="e2", status="sale", email=POST_EMAIL + "x" * 400),
        await bridge.postback("shop", cid="e3", status="sale", phone=POST_PHONE * 10),
    ]
    resp = await bridge.client.get("/click", params={"click_id": "e4", "email": POST_EMAIL * 20})
    answers.append((resp.status, await resp.json()))

    assert [status for status, _ in answers] == [400, 400, 400, 400]
    assert leaks(json.dumps([body for _, body in answers])) == []
    assert await bridge.states() == {}


# -- unusable identifiers ------------------------------------------------------------------------------


async def metric(bridge: Bridge, sample: str) -> float:
    text = await (await bridge.client.get("/metrics")).text()
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


async def test_unparseable_phone_on_a_click_is_dropped_and_counted(bridge: Bridge) -> None:
    assert await bridge.click(click_id="p1", phone="call me maybe", email=CLICK_EMAIL) == 204

    [row] = await bridge.store.fetchall("SELECT phone_hash, email_hash FROM clicks WHERE click_id = 'p1'")
    assert tuple(row) == (None, HASHES["click_email"])
    assert await metric(bridge, 'bridge_identifiers_dropped_total{field="phone"}') == 1


async def test_unparseable_phone_on_a_postback_is_dropped_and_counted(make_bridge: BridgeFactory) -> None:
    bridge = await shop_bridge(make_bridge)
    _, body = await bridge.postback("shop", cid="p2", status="lead", phone="12", email=POST_EMAIL)

    row = await bridge.row(body["conversion_id"])
    assert (row["phone_hash"], row["email_hash"]) == (None, HASHES["post_email"])
    assert await metric(bridge, 'bridge_identifiers_dropped_total{field="phone"}') == 1
