"""The benchmark's fallback load generator when wrk is not installed: keep-alive GETs over raw sockets.

Each of `--connections` connections sends one request, waits for its answer, sends the next, for
`--duration` seconds. Every request gets a new `{id}` (prefix + counter), like bench/unique.lua.
It is written against asyncio's protocol API on uvloop, parsing only the status line and
Content-Length, so that on a small machine it takes as little CPU from the server as possible.
It prints one JSON line in the same shape as bench/unique.lua's summary.

    python bench/load.py --url http://127.0.0.1:8080 --path '/click?click_id={id}' --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import cast
from urllib.parse import urlsplit


def click_id(prefix: str, counter: int) -> str:
    """A new id that lands anywhere in the index, as trackers' random click ids do, not always at its end."""
    return f"{counter * 2654435761 % 2**32:08x}{prefix}n{counter}"


class _Connection(asyncio.Protocol):
    """One keep-alive connection that sends the next request as soon as the previous is answered."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.sent_at = 0.0
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        if time.perf_counter() >= self.run.deadline:
            self.transport.close()
            return
        self.sent_at = time.perf_counter()
        self.transport.write(self.run.next_request())

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            length = 0
            # Header names are matched case-insensitively; aiohttp writes "Content-Length".
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
                    break
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            status = int(head[9:12])
            self.buffer = self.buffer[total:]
            self.run.answered(status, time.perf_counter() - self.sent_at)
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.run.read_errors += 1
        if not self.closed.done():
            self.closed.set_result(None)


class _Run:
    def __init__(self, host: str, path: str, prefix: str, duration: float) -> None:
        self.host = host
        self.path = path
        self.prefix = prefix
        self.counter = 0
        self.deadline = time.perf_counter() + duration
        self.latencies: list[float] = []
        self.status_errors = 0
        self.read_errors = 0
        self.connect_errors = 0

    def next_request(self) -> bytes:
        self.counter += 1
        path = self.path.replace("{id}", click_id(self.prefix, self.counter))
        return f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\nUser-Agent: bench-load\r\n\r\n".encode()

    def answered(self, status: int, seconds: float) -> None:
        self.latencies.append(seconds)
        if not 200 <= status < 400:
            self.status_errors += 1


async def drive(url: str, path: str, prefix: str, connections: int, duration: float) -> dict[str, float]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    loop = asyncio.get_running_loop()
    run = _Run(f"{host}:{port}", path, prefix, duration)
    started = time.perf_counter()
    protocols: list[_Connection] = []
    for _ in range(connections):
        try:
            _, protocol = await loop.create_connection(lambda: _Connection(run), host, port)
        except OSError:
            run.connect_errors += 1
            continue
        protocols.append(protocol)
    # A server that stops answering must not hold the benchmark: give it a few seconds past the end.
    _, pending = await asyncio.wait([p.closed for p in protocols], timeout=duration + 10)
    for protocol in protocols:
        if protocol.transport is not None and not protocol.closed.done():
            protocol.transport.abort()
    elapsed = time.perf_counter() - started
    latencies = sorted(run.latencies)

    def percentile(q: float) -> float:
        if not latencies:
            return 0.0
        return latencies[min(len(latencies) - 1, int(q / 100 * len(latencies)))] * 1e6

    return {
        "requests": len(latencies),
        "duration_us": int(elapsed * 1e6),
        "connect_errors": run.connect_errors,
        "read_errors": run.read_errors,
        "write_errors": 0,
        "status_errors": run.status_errors,
        "timeouts": len(pending),
        "p50_us": int(percentile(50)),
        "p99_us": int(percentile(99)),
        "max_us": int(latencies[-1] * 1e6) if latencies else 0,
        "mean_us": round(sum(latencies) / len(latencies) * 1e6, 1) if latencies else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Keep-alive HTTP load generator for the benchmark.")
    parser.add_argument("--url", required=True, help="http://host:port of the server")
    parser.add_argument("--path", required=True, help="request path; {id} is replaced by a new id each time")
    parser.add_argument("--prefix", default="load", help="start of every id, unique per run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds")
    args = parser.parse_args(argv)
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover
        runner = asyncio.Runner()
    with runner:
        summary = runner.run(drive(args.url, args.path, args.prefix, args.connections, args.duration))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
