"""Shared fixtures: real config files, a real SQLite file, the real app on 127.0.0.1, a fake TikTok."""

from __future__ import annotations

import asyncio
import io
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from bridge import logs
from bridge.config import Config, load_config
from bridge.runtime import Runtime
from bridge.store import Store
from bridge.web import PARSER_LIMITS, create_app
from bridge.worker import Worker
from tests.fake_tiktok import PATH, FakeTikTok

REPO = Path(__file__).resolve().parent.parent
SHIPPED_TRACKERS = REPO / "config" / "trackers"

MAIN_TOKEN = "token-main-0123456789"
SECOND_TOKEN = "token-second-0123456789"
MAIN_CODE = "CMAINPIXEL0000000001"
SECOND_CODE = "CSECONDPIXEL00000002"


def base_settings(endpoint: str = "http://127.0.0.1:9/open_api/v1.3/event/track/") -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": 8080},
        "storage": {"path": "bridge.db"},
        "tiktok": {"endpoint": endpoint, "dry_run": False, "timeout": 2, "batch_size": 500},
        "default_pixel": "main",
        "pixels": {
            "main": {"code": MAIN_CODE, "access_token": MAIN_TOKEN},
            "second": {"code": SECOND_CODE, "access_token": SECOND_TOKEN},
        },
        "trackers_dir": "trackers",
    }


def write_config(
    directory: Path,
    settings: dict[str, Any],
    trackers: dict[str, dict[str, Any]] | None = None,
    shipped: bool = True,
) -> Path:
    """Write a main file plus tracker files (the shipped ones, and/or given ones) into `directory`."""
    tracker_dir = directory / "trackers"
    tracker_dir.mkdir(parents=True, exist_ok=True)
    if shipped:
        for file in SHIPPED_TRACKERS.glob("*.yaml"):
            shutil.copy(file, tracker_dir / file.name)
    for name, data in (trackers or {}).items():
        (tracker_dir / f"{name}.yaml").write_text(yaml.safe_dump(data))
    path = directory / "bridge.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


async def until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Wait for `condition()` to be true (and return it), failing with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still not true after {timeout}s")
        await asyncio.sleep(0.01)


Track = Callable[[web.Request], Awaitable[web.Response]]


async def tiktok_stand_in(aiohttp_server: Any, track: Track) -> str:
    """The endpoint of a TikTok on 127.0.0.1 whose every answer `track` gives, for answers the fake
    has no switch for; `aiohttp_server` is pytest-aiohttp's fixture, which stops it after the test."""
    app = web.Application()
    app.router.add_post(PATH, track)
    server = await aiohttp_server(app, host="127.0.0.1")
    return str(server.make_url(PATH))


class Clock:
    """Real time plus an offset the test moves by hand, so backoff and expiry need no waiting.

    `freeze()` stops real time from counting: a test whose expectation depends on how little time
    passed (a pacing gap of a tenth of a second) then holds on a loaded machine too.
    """

    def __init__(self) -> None:
        self.offset = 0.0
        self.frozen_at: float | None = None

    def __call__(self) -> float:
        return (time.time() if self.frozen_at is None else self.frozen_at) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def freeze(self) -> None:
        self.frozen_at = time.time()


@dataclass
class Bridge:
    """A bridge wired to a fake TikTok: the real app, store, and worker, driven by the test."""

    config: Config
    store: Store
    runtime: Runtime
    worker: Worker
    client: TestClient
    fake: FakeTikTok
    clock: Clock
    responses: list[Any] = field(default_factory=list)

    async def postback(self, tracker: str, method: str = "GET", **params: Any) -> tuple[int, dict[str, Any]]:
        if method == "GET":
            resp = await self.client.get(f"/postback/{tracker}", params=params)
        else:
            resp = await self.client.post(f"/postback/{tracker}", data=params)
        return resp.status, await resp.json()

    async def click(self, headers: dict[str, str] | None = None, **params: Any) -> int:
        resp = await self.client.get("/click", params=params, headers=headers or {})
        return resp.status

    async def send_raw(self, data: bytes) -> bytes:
        """Raw bytes on a fresh connection, as no HTTP client would send them; the whole answer."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.client.port)
        try:
            writer.write(data)
            await writer.drain()
            return await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()

    async def deliver(self, max_cycles: int = 50) -> int:
        """Run worker cycles until nothing is due at the test clock's time."""
        handled = 0
        for _ in range(max_cycles):
            n = await self.worker.run_once()
            if not n:
                return handled
            handled += n
        raise AssertionError("worker still busy after max_cycles")

    def reload(self, settings: dict[str, Any]) -> None:
        """Write the config file with these settings and swap it in, as SIGHUP does."""
        self.config.path.write_text(yaml.safe_dump(settings))
        self.runtime.config = load_config(self.config.path, environ={})

    async def row(self, conversion_id: int) -> Any:
        return await self.store.conversion(conversion_id)

    async def states(self) -> dict[str, int]:
        rows = await self.store.fetchall("SELECT state, COUNT(*) AS n FROM conversions GROUP BY state")
        return {row["state"]: row["n"] for row in rows}


async def scrape(bridge: Bridge, headers: dict[str, str] | None = None) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics, by name and labels."""
    resp = await bridge.client.get("/metrics", headers=headers or {})
    assert resp.status == 200, await resp.text()
    samples = {}
    for family in text_string_to_metric_families(await resp.text()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    """A sample's value; a series that is not there counts as 0, as Prometheus' increase() treats it."""
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def service_dir() -> Iterator[Path]:
    """A directory other users may enter, as /etc/postback-bridge is. pytest's own are 700, which
    check-config run as root warns about: the service's user could not reach the files in them."""
    directory = Path(tempfile.mkdtemp(prefix="postback-bridge-test-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory)


@pytest.fixture
def log_text() -> Iterator[io.StringIO]:
    """Everything logged, the bridge's lines and the libraries', as JSON lines as the daemon writes them."""
    stream = io.StringIO()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    logs.configure(stream=stream, json=True)
    yield stream
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
async def fake() -> AsyncIterator[FakeTikTok]:
    server = FakeTikTok(tokens={MAIN_CODE: MAIN_TOKEN, SECOND_CODE: SECOND_TOKEN})
    await server.start()
    yield server
    await server.close()


BridgeFactory = Callable[..., Any]


@pytest.fixture
async def make_bridge(tmp_path: Path, fake: FakeTikTok) -> AsyncIterator[BridgeFactory]:
    """Build a bridge; `edit(settings)` may change the main config, `trackers` adds tracker files."""
    opened: list[tuple[Store, TestClient, aiohttp.ClientSession]] = []

    async def build(
        edit: Callable[[dict[str, Any]], None] | None = None,
        trackers: dict[str, dict[str, Any]] | None = None,
        environ: dict[str, str] | None = None,
    ) -> Bridge:
        settings = base_settings(fake.url)
        if edit:
            edit(settings)
        directory = tmp_path / f"bridge{len(opened)}"
        path = write_config(directory, settings, trackers)
        config = load_config(path, environ=environ or {})
        store = await Store(config.db_path).open()
        runtime = Runtime(config=config, store=store)
        session = aiohttp.ClientSession()
        clock = Clock()
        worker = Worker(runtime, session, clock=clock, rand=lambda: 0.5)
        runtime.worker_running = True
        server = TestServer(create_app(runtime), host="127.0.0.1")
        await server.start_server(**PARSER_LIMITS)  # as the daemon's runner: TestServer() drops them
        client = TestClient(server)
        await client.start_server()
        opened.append((store, client, session))
        return Bridge(config, store, runtime, worker, client, fake, clock)

    yield build
    for store, client, session in opened:
        await client.close()
        await session.close()
        await store.close()


@pytest.fixture
async def bridge(make_bridge: BridgeFactory) -> Bridge:
    return await make_bridge()
