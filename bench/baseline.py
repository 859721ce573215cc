"""The benchmark's yardstick: a bare aiohttp app that parses the same query and answers like the bridge.

It does what the bridge's listener cannot avoid (uvloop, aiohttp, parsing the query string, a JSON answer
for /postback, a 204 with CORS headers for /click) and nothing else: no validation, no storage, no logs.
The bridge's rate divided by this app's rate, measured in the same run by the same load generator, is
the number the benchmark reports, so the machine's speed cancels out.

    python bench/baseline.py --port 0     # prints the URL it listens on, serves until SIGTERM
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from aiohttp import web

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type",
    "Access-Control-Max-Age": "86400",
}


def _params(request: web.Request) -> dict[str, str]:
    # The first value of a repeated name wins, as in the bridge.
    params: dict[str, str] = {}
    for name, value in request.query.items():
        params.setdefault(name, value)
    return params


async def postback(request: web.Request) -> web.Response:
    params = _params(request)
    click_id = params.get("subid", "")
    body = {"result": "accepted", "conversion_id": 1, "event": "Purchase", "event_id": f"{click_id}_Purchase"}
    return web.Response(body=json.dumps(body).encode(), content_type="application/json")


async def click(request: web.Request) -> web.Response:
    _params(request)
    return web.Response(status=204, headers=CORS_HEADERS)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_route("GET", "/postback/{tracker}", postback)
    app.router.add_route("GET", "/click", click)
    app.router.add_route("GET", "/healthz", healthz)
    return app


async def serve(host: str, port: int) -> None:
    runner = web.AppRunner(create_app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    print(f"http://{host}:{runner.addresses[0][1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Bare aiohttp baseline for the benchmark.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port; the URL is printed")
    args = parser.parse_args(argv)
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - the daemon falls back the same way
        runner = asyncio.Runner()
    with runner:
        runner.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
