"""The benchmark: the real daemon against a bare aiohttp baseline, same machine, same load, same run.

    .venv/bin/python bench/run.py                      # what `make bench` runs (about two minutes)
    .venv/bin/python bench/run.py --preload 1000000    # also: a second daemon on a 1M + 1M row database

Everything runs as subprocesses on 127.0.0.1, on free ports, with storage in a temporary directory:
the fake TikTok (tests/fake_tiktok.py), the baseline (bench/baseline.py) and the daemon
(`python -m bridge run`, tiktok.dry_run false, pointed at the fake). The load generator is wrk with
bench/unique.lua when installed (`apt-get install wrk`), else bench/load.py. Both get the same number
of connections for the same time, and every request carries a new click id, so every postback is a new
conversion committed with synchronous=FULL before its 200 "accepted".

Rates are only compared within one run: the ratio bridge/baseline is the result, not the raw rates.
The servers run side by side and are measured in turns (baseline, bridge, baseline, bridge, ...), a
few rounds of each, so that whatever else the machine does weighs on both alike; each figure
reported is the median over the rounds, and each ratio the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bridge.store import Store  # noqa: E402 -- after the repo is on the path, when run as a script

PIXEL_CODE = "CBENCHPIXEL000000001"
PIXEL_TOKEN = "bench-token-0123456789"
POSTBACK_KEY = "bench-postback-key"
# What Keitaro sends for a sale (config/trackers/keitaro.yaml), with the TikTok click id and ip + UA.
POSTBACK_PATH = (
    f"/postback/keitaro?key={POSTBACK_KEY}&subid={{id}}&external_id=E.{{id}}&status=sale&revenue=12.50"
    "&currency=USD&tid=&ip=203.0.113.7&user_agent=Mozilla%2F5.0%20(iPhone%3B%20CPU%20iPhone%20OS%2017_4)"
)
# What bridge.js sends from a landing page.
CLICK_PATH = (
    "/click?click_id={id}&ttclid=E.{id}&ttp=2cBxSOKsVr0RxQ5mjbKnSsCDuRM"
    "&url=https%3A%2F%2Flp.example.com%2Foffer%3Fsub1%3D{id}"
)

TRACKER = """\
name: keitaro
key: {key}
pixel: main
params:
  click_id: subid
  ttclid: external_id
  status: status
  value: revenue
  currency: currency
  transaction_id: tid
  ip: ip
  user_agent: user_agent
events:
  lead: Lead
  sale: Purchase
  rebill: Purchase
  rejected: null
default_currency: USD
event_id: "{{click_id}}_{{event}}"
"""


# -- processes -------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Child:
    """A subprocess this benchmark started; stopped by its own pid, never by name."""

    name: str
    proc: subprocess.Popen[str]
    log: Path

    def pids(self) -> list[int]:
        """The server's process and its children (the daemon's listener processes)."""
        pids = [self.proc.pid]
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if parent == self.proc.pid:
                pids.append(int(entry.name))
        return pids

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def peak_rss_mb(self) -> float:
        """Peak RSS of the server's processes, added up."""
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) / 1024
        return total

    def stop(self, timeout: float = 20.0) -> str:
        """SIGTERM, wait, return what it printed on stdout; SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            raise RuntimeError(f"{self.name} did not stop within {timeout}s; see {self.log}") from None
        return out or ""


def start(name: str, argv: list[str], workdir: Path, *, prints_url: bool = True) -> Child:
    """Start a server; one that prints its URL keeps stdout on a pipe, the daemon logs to the file."""
    log = workdir / f"{name}.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE if prints_url else stderr,
            stderr=stderr,
            text=True,
            cwd=REPO,
        )
    return Child(name, proc, log)


def first_line(child: Child, timeout: float = 20.0) -> str:
    """The URL a server prints when it listens (fake TikTok, baseline)."""
    assert child.proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = child.proc.stdout.readline()
        if line.strip():
            return line.strip()
        if child.proc.poll() is not None:
            break
    raise RuntimeError(f"{child.name} printed no URL; see {child.log}")


def wait_healthy(url: str, child: Child, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}; see {child.log}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/healthz", timeout=1) as answer:
            if answer.status == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{child.name} not healthy after {timeout}s; see {child.log}")


# -- load ------------------------------------------------------------------------------------------------


@dataclass
class Load:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    server_cpu: float  # share of one core the server used
    loadgen_cpu: float
    ended_at: float = 0.0  # time.time() when the last answer had arrived
    server_cpu_seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_per_request_us(self) -> float:
        """The server's CPU (all its threads and processes) per answered request."""
        return self.server_cpu_seconds / self.requests * 1e6 if self.requests else 0.0


@dataclass
class Options:
    duration: float
    warmup: float
    connections: int
    loadgen: str  # wrk | python
    workdir: Path
    rounds: int = 3
    listeners: int = 1
    delivery_timeout: float = 30.0
    prefix: str = field(default_factory=lambda: "b" + secrets.token_hex(3))
    phase: int = 0

    def next_prefix(self) -> str:
        self.phase += 1
        return f"{self.prefix}p{self.phase}"


def drive(options: Options, url: str, path: str, server: Child, seconds: float) -> Load:
    prefix = options.next_prefix()
    if options.loadgen == "wrk":
        argv = [
            "wrk",
            "-t1",
            f"-c{options.connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            str(REPO / "bench" / "unique.lua"),
            url,
            "--",
            path,
            prefix,
        ]
    else:
        argv = [
            sys.executable,
            str(REPO / "bench" / "load.py"),
            "--url",
            url,
            "--path",
            path,
            "--prefix",
            prefix,
            "--connections",
            str(options.connections),
            "--duration",
            str(seconds),
        ]
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = server.cpu_seconds()
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    elapsed = time.monotonic() - started
    ended_at = time.time()
    server_cpu = server.cpu_seconds() - server_before
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    loadgen_cpu = (children_after.ru_utime - children_before.ru_utime) + (
        children_after.ru_stime - children_before.ru_stime
    )
    summary = None
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            summary = json.loads(line)
    if done.returncode != 0 or summary is None:
        raise RuntimeError(f"load generator failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    seconds_run = summary["duration_us"] / 1e6
    errors = sum(
        summary[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    )
    return Load(
        requests=summary["requests"],
        seconds=seconds_run,
        p50_ms=summary["p50_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
        errors=errors,
        server_cpu=server_cpu / elapsed,
        loadgen_cpu=loadgen_cpu / elapsed,
        ended_at=ended_at,
        server_cpu_seconds=server_cpu,
    )


# -- the servers -----------------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    child: Child
    url: str
    db: Path | None = None  # the daemon's database; None for the baseline
    postbacks: list[Load] = field(default_factory=list)
    clicks: list[Load] = field(default_factory=list)
    lags: list[float | None] = field(default_factory=list)
    pending_left: int = 0


def start_baseline(workdir: Path) -> Server:
    argv = [sys.executable, str(REPO / "bench" / "baseline.py"), "--port", "0"]
    child = start("baseline", argv, workdir)
    url = first_line(child)
    wait_healthy(url, child)
    return Server("baseline", child, url)


def write_config(directory: Path, port: int, endpoint: str, listeners: int = 1) -> Path:
    (directory / "trackers").mkdir(parents=True, exist_ok=True)
    (directory / "trackers" / "keitaro.yaml").write_text(TRACKER.format(key=POSTBACK_KEY))
    config = {
        # Every request comes from 127.0.0.1: the per-address click limit would refuse most of them.
        "server": {"host": "127.0.0.1", "port": port, "click_limit_per_minute": 0},
        "storage": {"path": "bridge.db"},
        "tiktok": {"endpoint": endpoint, "dry_run": False, "timeout": 10, "batch_size": 500},
        "default_pixel": "main",
        "pixels": {"main": {"code": PIXEL_CODE, "access_token": PIXEL_TOKEN}},
        "trackers_dir": "trackers",
    }
    if listeners > 1:  # left out at 1, the default, so the bench also runs releases without the key
        config["server"]["listeners"] = listeners
    path = directory / "bridge.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


def start_bridge(name: str, directory: Path, endpoint: str, listeners: int, preload: int = 0) -> Server:
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = write_config(directory, port, endpoint, listeners)
    db = directory / "bridge.db"
    if preload:
        fill(db, preload)
    argv = [sys.executable, "-m", "bridge", "run", "-c", str(config)]
    child = start(name, argv, directory, prints_url=False)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, child)
    return Server(name, child, url, db)


def count(db: Path, sql: str) -> int:
    # Read-only and short-lived: the daemon owns the file; WAL lets this read while it writes.
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        return int(conn.execute(sql).fetchone()[0])


def wait_delivered(db: Path, since: float, timeout: float) -> tuple[float | None, int]:
    """Seconds from `since` until no event is pending (None if some still are after `timeout`)."""
    deadline = time.monotonic() + timeout
    pending = -1
    while time.monotonic() < deadline:
        pending = count(db, "SELECT COUNT(*) FROM conversions WHERE state = 'pending'")
        if pending == 0:
            return time.time() - since, 0
        time.sleep(0.01)
    return None, pending


def measure(options: Options, server: Server, kind: str, seconds: float, record: bool = True) -> None:
    """One phase of load on one server; after postbacks to the daemon, wait until all are delivered."""
    path = POSTBACK_PATH if kind == "postback" else CLICK_PATH
    load = drive(options, server.url, path, server.child, seconds)
    lag: float | None = None
    if server.db is not None and kind == "postback":
        lag, server.pending_left = wait_delivered(server.db, load.ended_at, options.delivery_timeout)
    if record:
        (server.postbacks if kind == "postback" else server.clicks).append(load)
        if server.db is not None and kind == "postback":
            server.lags.append(lag)


# -- preloading ------------------------------------------------------------------------------------------


def fill(db: Path, rows: int) -> None:
    """`rows` clicks and `rows` finished conversions, written straight through sqlite3 in one transaction.

    The schema comes from the Store itself (it migrates the empty file), so the rows land in exactly the
    tables and indexes the daemon uses. Click ids are scattered over the key space like real ones.
    """
    started = time.monotonic()

    async def migrate() -> None:
        store = await Store(db).open()
        await store.close()

    asyncio.run(migrate())
    now = time.time()
    old = now - 86400

    def click_rows() -> Iterator[tuple[Any, ...]]:
        for i in range(rows):
            click_id = f"{i * 2654435761 % 2**32:08x}pre{i}"
            yield (
                click_id,
                f"E.{click_id}",
                "2cBxSOKsVr0RxQ5mjbKnSsCDuRM",
                "203.0.113.7",
                "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4)",
                f"https://lp.example.com/offer?sub1={click_id}",
                old,
                old,
            )

    def conversion_rows() -> Iterator[tuple[Any, ...]]:
        for i in range(rows):
            click_id = f"{i * 2654435761 % 2**32:08x}pre{i}"
            yield (
                click_id,
                f"{click_id}_Purchase",
                int(old),
                f"E.{click_id}",
                f"2024010100000{i:09d}",
                old,
                old,
            )

    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO clicks (click_id, ttclid, ttp, ip, user_agent, url, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            click_rows(),
        )
        conn.executemany(
            "INSERT INTO conversions (tracker, click_id, status, event, transaction_id, event_id, "
            "event_time, value, currency, pixel, ttclid, ip, user_agent, state, attempts, sent_pixel, "
            "request_id, match_keys, received_at, finished_at) "
            "VALUES ('keitaro', ?, 'sale', 'Purchase', '', ?, ?, 12.5, 'USD', 'main', ?, '203.0.113.7', "
            "'Mozilla/5.0', 'delivered', 1, 'main', ?, 'ttclid,ip_ua', ?, ?)",
            conversion_rows(),
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    print(f"  preloaded {rows} clicks + {rows} conversions in {time.monotonic() - started:.1f}s", flush=True)


# -- report ----------------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = "?"
    with contextlib.suppress(OSError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        ram = f"{kib / 1024 / 1024:.1f} GiB"
    return {
        "cpus": str(os.cpu_count()),
        "cpu": cpu,
        "ram": ram,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
    }


def ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def median_load(loads: list[Load]) -> dict[str, Any]:
    return {
        "rate": round(statistics.median(load.rate for load in loads), 1),
        "p50_ms": round(statistics.median(load.p50_ms for load in loads), 2),
        "p99_ms": round(statistics.median(load.p99_ms for load in loads), 2),
        "worst_p99_ms": round(max(load.p99_ms for load in loads), 2),
        "errors": sum(load.errors for load in loads),
        "requests": sum(load.requests for load in loads),
        "server_cpu": round(statistics.median(load.server_cpu for load in loads), 3),
        "server_us_per_request": round(statistics.median(load.cpu_per_request_us for load in loads), 1),
        "loadgen_cpu": round(statistics.median(load.loadgen_cpu for load in loads), 3),
        "rates": [round(load.rate, 1) for load in loads],
    }


def median_ratio(loads: list[Load], against: list[Load]) -> float:
    """The median of the rounds' ratios: each round's pair ran back to back, under the same weather."""
    return statistics.median(ratio(a.rate, b.rate) for a, b in zip(loads, against, strict=True))


def report(
    options: Options, servers: list[Server], fake: dict[str, int], extra: dict[str, Any]
) -> dict[str, Any]:
    base, bridge = servers[0], servers[1]
    preloaded = servers[2] if len(servers) > 2 else None
    info = machine()
    lines = [
        f"machine: {info['cpus']} CPUs ({info['cpu']}), {info['ram']}, Linux {info['kernel']}, "
        f"Python {info['python']}, SQLite {info['sqlite']}",
        f"load: {options.loadgen}, {options.connections} connections, {options.rounds} rounds of "
        f"{options.duration:g}s per server and kind; load average before/after: "
        f"{extra['loadavg_before']} / {extra['loadavg_after']}",
        f"bridge: server.listeners: {options.listeners} (the daemon and {options.listeners - 1} listener "
        "process(es); srv cpu, its µs/req and peak RSS add them up)",
        "",
        f"{'median of rounds':30}{'req/s':>9}{'ratio':>8}{'p50 ms':>9}{'p99 ms':>9}{'worst p99':>10}"
        f"{'errors':>8}{'srv cpu':>9}{'µs/req':>8}{'gen cpu':>9}",
    ]
    data: dict[str, Any] = {
        "machine": info,
        "loadgen": options.loadgen,
        "connections": options.connections,
        "duration": options.duration,
        "rounds": options.rounds,
        **extra,
    }

    def row(name: str, loads: list[Load], against: list[Load] | None) -> dict[str, Any]:
        summary = median_load(loads)
        share = ""
        if against is not None:
            summary["ratio"] = round(median_ratio(loads, against), 3)
            share = f"{summary['ratio']:.2f}x"
        lines.append(
            f"{name:30}{summary['rate']:9.0f}{share:>8}{summary['p50_ms']:9.2f}{summary['p99_ms']:9.2f}"
            f"{summary['worst_p99_ms']:10.2f}{summary['errors']:8d}{summary['server_cpu']:8.0%} "
            f"{summary['server_us_per_request']:8.0f}{summary['loadgen_cpu']:8.0%}"
        )
        return summary

    data["baseline"] = {"postback": row("baseline /postback", base.postbacks, None)}
    data["bridge"] = {"postback": row("bridge /postback", bridge.postbacks, base.postbacks)}
    if preloaded is not None:
        data["preloaded"] = {
            "postback": row(
                f"bridge /postback, {extra['preload']}+{extra['preload']}",
                preloaded.postbacks,
                base.postbacks,
            )
        }
    data["baseline"]["click"] = row("baseline /click", base.clicks, None)
    data["bridge"]["click"] = row("bridge /click", bridge.clicks, base.clicks)
    if preloaded is not None:
        data["preloaded"]["click"] = row(
            f"bridge /click, {extra['preload']}+{extra['preload']}", preloaded.clicks, base.clicks
        )
    lines.append("")

    def lag_text(server: Server) -> str:
        if any(lag is None for lag in server.lags):
            return f"NOT DONE within {options.delivery_timeout:g}s ({server.pending_left} pending)"
        return "worst " + f"{max(lag for lag in server.lags if lag is not None):.2f}s"

    requests = fake.get("requests", 0)
    batch = fake.get("events", 0) / requests if requests else 0.0
    lines.append(f"delivery lag after the last postback of a phase: {lag_text(bridge)}")
    lines.append(
        f"fake TikTok: {fake.get('events', 0)} events in {requests} requests "
        f"(mean batch {batch:.0f}), {fake.get('unique_event_ids', 0)} unique event_ids"
    )
    lines.append(
        f"stored (empty-db daemon): {extra['stored_conversions']} conversions "
        f"({extra['delivered']} delivered), {extra['stored_clicks']} clicks"
    )
    lines.append(
        f"peak RSS: bridge {extra['bridge_rss_mb']:.0f} MB, baseline {extra['baseline_rss_mb']:.0f} MB"
    )
    data["bridge"]["delivery_lags_s"] = bridge.lags
    data["bridge"]["mean_batch"] = round(batch, 1)
    data["fake_tiktok"] = fake
    if preloaded is not None:
        vs_post = median_ratio(preloaded.postbacks, bridge.postbacks)
        vs_click = median_ratio(preloaded.clicks, bridge.clicks)
        lines.append(
            f"{extra['preload']} + {extra['preload']} rows: postbacks {vs_post:.2f}x and "
            f"clicks {vs_click:.2f}x the empty-db rate, "
            f"delivery lag {lag_text(preloaded)}, peak RSS {extra['preloaded_rss_mb']:.0f} MB"
        )
        data["preloaded"]["postback_vs_empty"] = round(vs_post, 3)
        data["preloaded"]["click_vs_empty"] = round(vs_click, 3)
        data["preloaded"]["delivery_lags_s"] = preloaded.lags
    print("\n".join(lines), flush=True)
    return data


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def run(options: Options, preload: int) -> tuple[list[Server], dict[str, int], dict[str, Any]]:
    workdir = options.workdir
    fake = start(
        "fake_tiktok",
        [
            sys.executable,
            str(REPO / "tests" / "fake_tiktok.py"),
            "--port",
            "0",
            "--token",
            f"{PIXEL_CODE}={PIXEL_TOKEN}",
        ],
        workdir,
    )
    servers: list[Server] = []
    try:
        endpoint = first_line(fake)
        servers.append(start_baseline(workdir))
        servers.append(start_bridge("bridge", workdir / "empty", endpoint, options.listeners))
        if preload:
            print(f"  preloading {preload} clicks + {preload} conversions ...", flush=True)
            servers.append(
                start_bridge("preloaded", workdir / "preloaded", endpoint, options.listeners, preload)
            )
        extra: dict[str, Any] = {"loadavg_before": loadavg(), "preload": preload}
        for server in servers:
            measure(options, server, "postback", options.warmup, record=False)
            measure(options, server, "click", options.warmup, record=False)
        for number in range(1, options.rounds + 1):
            print(f"  round {number}/{options.rounds} ...", flush=True)
            for kind in ("postback", "click"):
                for server in servers:
                    measure(options, server, kind, options.duration)
        extra["loadavg_after"] = loadavg()
        bridge = servers[1]
        assert bridge.db is not None
        extra["stored_conversions"] = count(bridge.db, "SELECT COUNT(*) FROM conversions")
        extra["delivered"] = count(bridge.db, "SELECT COUNT(*) FROM conversions WHERE state = 'delivered'")
        extra["stored_clicks"] = count(bridge.db, "SELECT COUNT(*) FROM clicks")
        for server in servers:
            extra[f"{server.name}_rss_mb"] = server.child.peak_rss_mb()
        for server in servers:
            server.child.stop()
            if server.db is not None and server.child.proc.returncode != 0:
                raise RuntimeError(f"{server.name} exited with {server.child.proc.returncode}")
        summary: dict[str, int] = {}
        for line in fake.stop().splitlines():
            if line.startswith("{"):
                summary = json.loads(line)
        return servers, summary, extra
    finally:
        for child in [fake, *(server.child for server in servers)]:
            if child.proc.poll() is None:
                child.proc.kill()
                child.proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the bridge against a bare aiohttp baseline.")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured phase (5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of phases per server (3)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring (2)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--listeners",
        type=int,
        default=1,
        help="the daemon's server.listeners (default 1, as the daemon's)",
    )
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument(
        "--preload",
        type=int,
        default=0,
        metavar="N",
        help="also run a daemon on a database preloaded with N clicks + N finished conversions",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, databases)")
    args = parser.parse_args(argv)
    loadgen = args.loadgen
    if loadgen == "auto":
        loadgen = "wrk" if shutil.which("wrk") else "python"
    elif loadgen == "wrk" and not shutil.which("wrk"):
        parser.error("wrk is not installed (apt-get install wrk), use --loadgen python")

    workdir = Path(tempfile.mkdtemp(prefix="bridge-bench-"))
    options = Options(
        args.duration, args.warmup, args.connections, loadgen, workdir, args.rounds, args.listeners
    )
    print(f"benchmark in {workdir} (load generator: {loadgen})", flush=True)
    try:
        servers, fake, extra = run(options, args.preload)
        print("", flush=True)
        data = report(options, servers, fake, extra)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(data, indent=2) + "\n")
    except BaseException:
        args.keep = True  # the logs in it say why
        raise
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
