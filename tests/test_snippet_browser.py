"""The landing-page snippet /bridge.js in a real headless Chromium, on a page served from another origin."""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import os
import shutil
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bridge.matching import sha256_hex
from bridge.web import create_app
from tests.conftest import Bridge

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)"
)

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
BROWSER_DEADLINE = 30.0

# The TikTok pixel's cookie, as it would be on the visitor's browser before our script runs.
TTP = "01JTESTTTPCOOKIE0000000000"

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>landing</title>
<script>
  document.cookie = "_ttp={ttp}; Path=/";
  window.onerror = function (message) {{
    var report = {{page: location.pathname, error: String(message)}};
    fetch("/report", {{method: "POST", body: JSON.stringify(report)}});
  }};
</script>
<script src="{src}" {attrs}></script>
</head><body><p>Offer</p>
<script>
  postbackBridge.ready.then(function (stored) {{
    return Promise.resolve({before}).then(function () {{
      return fetch("/report", {{method: "POST", body: JSON.stringify({{
        page: location.pathname,
        stored: stored,
        clickId: postbackBridge.clickId,
        ttclid: postbackBridge.ttclid,
        eventId: postbackBridge.eventId("Purchase"),
        userAgent: navigator.userAgent
      }})}});
    }});
  }}).then(function () {{ if ({next}) location.href = "/next"; }});
</script>
</body></html>
"""


@dataclass
class Landing:
    """A landing page on its own origin that includes the bridge's snippet and reports what it saw."""

    bridge_url: str
    attrs: dict[str, str] = field(default_factory=lambda: {"data-click-param": "subid"})
    reports: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""
    # A JavaScript expression the page evaluates (and awaits) before it reports.
    before: str = "null"

    def page(self, then_next: bool) -> web.Response:
        attrs = " ".join(f'{name}="{html.escape(value)}"' for name, value in self.attrs.items())
        body = PAGE.format(
            ttp=TTP,
            src=f"{self.bridge_url}/bridge.js",
            attrs=attrs,
            before=self.before,
            next="true" if then_next else "false",
        )
        return web.Response(text=body, content_type="text/html")

    def app(self) -> web.Application:
        async def first(request: web.Request) -> web.Response:
            return self.page(then_next=True)

        async def later(request: web.Request) -> web.Response:
            return self.page(then_next=False)

        async def report(request: web.Request) -> web.Response:
            self.reports.append(json.loads(await request.text()))
            return web.Response(status=204)

        app = web.Application()
        app.router.add_get("/page", first)
        app.router.add_get("/next", later)
        app.router.add_post("/report", report)
        return app

    def report_for(self, page: str) -> dict[str, Any] | None:
        for item in self.reports:
            assert "error" not in item, f"script error on {item['page']}: {item['error']}"
            if item["page"] == page:
                return item
        return None


@dataclass
class Seen:
    method: str
    path: str
    status: int
    origin: str | None
    content_type: str | None


@pytest.fixture
async def served(bridge: Bridge) -> AsyncIterator[tuple[Landing, list[Seen]]]:
    """The bridge's real app (on the test bridge's runtime and database) plus the landing page, each on
    127.0.0.1 with its own port: two origins, so the snippet's request is cross-origin as in production."""
    seen: list[Seen] = []

    async def record(request: web.Request, response: web.StreamResponse) -> None:
        seen.append(
            Seen(
                request.method,
                request.path,
                response.status,
                request.headers.get("Origin"),
                request.headers.get("Content-Type"),
            )
        )

    bridge_app = create_app(bridge.runtime)
    bridge_app.on_response_prepare.append(record)
    bridge_server = TestServer(bridge_app, host="127.0.0.1")
    await bridge_server.start_server()
    landing = Landing(bridge_url=str(bridge_server.make_url("")).rstrip("/"))
    landing_server = TestServer(landing.app(), host="127.0.0.1")
    await landing_server.start_server()
    landing.url = str(landing_server.make_url("/page"))
    try:
        yield landing, seen
    finally:
        await landing_server.close()
        await bridge_server.close()


async def browse(url: str, profile: Path, done: Any) -> None:
    """Open `url` in headless Chromium until `done()` is true; the browser is always stopped."""
    assert CHROMIUM is not None
    log = (profile.parent / "chromium.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        url,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,  # its own process group, so its helper processes stop with it
        # Its scratch directories (org.chromium.Chromium.*) go with the test's, not into /tmp for good.
        env={**os.environ, "TMPDIR": str(profile.parent)},
    )
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BROWSER_DEADLINE
        while not done():
            if proc.returncode is not None:
                raise AssertionError(f"chromium exited with {proc.returncode} before the page reported")
            if loop.time() > deadline:
                raise AssertionError(f"page did not report within {BROWSER_DEADLINE}s")
            await asyncio.sleep(0.05)
    finally:
        log.close()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                await asyncio.wait_for(proc.wait(), 5)
                break
            except TimeoutError:
                continue


async def visit(landing: Landing, tmp_path: Path, query: str, page: str = "/page") -> dict[str, Any]:
    await browse(f"{landing.url}?{query}", tmp_path / "profile", lambda: landing.report_for(page) is not None)
    report = landing.report_for(page)
    assert report is not None
    return report


async def stored_click(bridge: Bridge, click_id: str) -> Any:
    rows = await bridge.store.fetchall("SELECT * FROM clicks WHERE click_id = ?", (click_id,))
    assert len(rows) == 1, f"click {click_id!r} not stored"
    return rows[0]


async def test_snippet_registers_the_click_with_ttclid_ttp_and_the_browsers_user_agent(
    bridge: Bridge, served: tuple[Landing, list[Seen]], tmp_path: Path
) -> None:
    landing, _ = served
    report = await visit(landing, tmp_path, "ttclid=E.C.P.xyz&subid=abc")

    assert report["stored"] is True
    click = await stored_click(bridge, "abc")
    assert click["ttclid"] == "E.C.P.xyz"
    assert click["ttp"] == TTP
    assert click["user_agent"] == report["userAgent"]
    assert click["ip"] == "127.0.0.1"
    assert click["url"] == f"{landing.url}?ttclid=E.C.P.xyz&subid=abc"


async def test_event_id_the_page_gets_is_the_one_the_bridge_sends_to_tiktok(
    bridge: Bridge, served: tuple[Landing, list[Seen]], tmp_path: Path
) -> None:
    landing, _ = served
    report = await visit(landing, tmp_path, "ttclid=E.C.P.xyz&subid=abc")
    await bridge.postback("keitaro", subid="abc", status="sale", revenue="10")
    await bridge.deliver()

    assert report["eventId"] == "abc_Purchase"
    [event] = bridge.fake.received
    assert event["event_id"] == report["eventId"]
    assert event["user"]["ttclid"] == "E.C.P.xyz"
    assert event["user"]["ttp"] == TTP


async def test_snippet_calls_the_bridge_cross_origin_without_a_preflight(
    bridge: Bridge, served: tuple[Landing, list[Seen]], tmp_path: Path
) -> None:
    landing, seen = served
    await visit(landing, tmp_path, "ttclid=E.C.P.xyz&subid=abc")

    landing_origin = landing.url.removesuffix("/page")
    # The page goes on to /next, which registers again: one or two requests, never an OPTIONS.
    clicks = [s for s in seen if s.path == "/click"]
    assert clicks
    for request in clicks:
        assert (request.method, request.status, request.origin) == ("POST", 204, landing_origin)
        assert (request.content_type or "").startswith("application/x-www-form-urlencoded")


async def test_later_page_without_url_parameters_remembers_click_id_and_ttclid(
    bridge: Bridge, served: tuple[Landing, list[Seen]], tmp_path: Path
) -> None:
    landing, _ = served
    await visit(landing, tmp_path, "ttclid=E.C.P.xyz&subid=abc", page="/next")

    later = landing.report_for("/next")
    assert later is not None
    assert (later["clickId"], later["ttclid"], later["eventId"]) == ("abc", "E.C.P.xyz", "abc_Purchase")


async def test_click_param_event_id_template_and_pixel_come_from_data_attributes(
    bridge: Bridge, served: tuple[Landing, list[Seen]], tmp_path: Path
) -> None:
    landing, _ = served
    landing.attrs = {
        "data-click-param": "clickid",
        "data-ttclid-param": "tt",
        "data-event-id": "{click_id}-{event}",
        "data-pixel": "second",
    }
    report = await visit(landing, tmp_path, "tt=E.C.P.b9&clickid=b9&subid=not-this")

    assert report["eventId"] == "b9-Purchase"
    click = await stored_click(bridge, "b9")
    assert (click["ttclid"], click["pixel"]) == ("E.C.P.b9", "second")


async def test_identify_adds_form_identifiers_to_the_click_hashed(
    bridge: Bridge, served: tuple[Landing, list[Seen]], tmp_path: Path
) -> None:
    landing, _ = served
    landing.before = 'postbackBridge.identify({email: " Alice@Example.COM ", phone: "+1 (213) 373-4253"})'
    await visit(landing, tmp_path, "ttclid=E.C.P.xyz&subid=abc")

    click = await stored_click(bridge, "abc")
    assert click["email_hash"] == sha256_hex("alice@example.com")
    assert click["phone_hash"] == sha256_hex("+12133734253")
    assert click["ttclid"] == "E.C.P.xyz"


async def test_unsubstituted_macros_in_the_url_are_not_taken_for_ids(
    bridge: Bridge, served: tuple[Landing, list[Seen]], tmp_path: Path
) -> None:
    landing, seen = served
    report = await visit(landing, tmp_path, "subid=%7Bsubid%7D&ttclid=__CLICKID__")

    assert (report["clickId"], report["ttclid"], report["eventId"]) == (None, None, None)
    assert report["stored"] is False
    assert [s for s in seen if s.path == "/click"] == []
