"""The benchmark: the real daemon against a bare aiohttp baseline, same machine, same load, same run.

    .venv/bin/python bench/run.py                      # what `make bench` runs (about a minute)
    .venv/bin/python bench/run.py --preload 1000000    # also: the same load on a database of 1M + 1M rows

Everything runs as subprocesses on 127.0.0.1, on free ports, with storage in a temporary directory:
the fake TikTok (tests/fake_tiktok.py), the baseline (bench/baseline.py) and the daemon
(`python -m bridge run`, tiktok.dry_run false, pointed at the fake). The load generator is wrk with
bench/unique.lua when installed (`apt-get install wrk`), else bench/load.py. Both get the same number
of connections for the same time, and every request carries a new click id, so every postback is a new
conversion committed with synchronous=FULL before its 200 "accepted".

Rates are only compared within one run: the ratio bridge/baseline is the result, not the raw rates.
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

    def cpu_seconds(self) -> float:
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

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

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


@dataclass
class Options:
    duration: float
    warmup: float
    connections: int
    loadgen: str  # wrk | python
    workdir: Path
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
    )


# -- the two servers -------------------------------------------------------------------------------------


@dataclass
class Result:
    postbacks: Load
    clicks: Load
    delivery_lag: float | None = None
    pending_left: int = 0
    peak_rss_mb: float = 0.0
    stored_conversions: int = 0
    stored_clicks: int = 0
    delivered: int = 0


def run_baseline(options: Options) -> Result:
    argv = [sys.executable, str(REPO / "bench" / "baseline.py"), "--port", "0"]
    child = start("baseline", argv, options.workdir)
    try:
        url = first_line(child)
        wait_healthy(url, child)
        drive(options, url, POSTBACK_PATH, child, options.warmup)
        postbacks = drive(options, url, POSTBACK_PATH, child, options.duration)
        clicks = drive(options, url, CLICK_PATH, child, options.duration)
        return Result(postbacks, clicks, peak_rss_mb=child.peak_rss_mb())
    finally:
        child.stop()


def write_config(directory: Path, port: int, endpoint: str) -> Path:
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
    path = directory / "bridge.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


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


def run_bridge(options: Options, endpoint: str, directory: Path, preload: int = 0) -> Result:
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = write_config(directory, port, endpoint)
    db = directory / "bridge.db"
    if preload:
        fill(db, preload)
    child = start(
        "bridge", [sys.executable, "-m", "bridge", "run", "-c", str(config)], directory, prints_url=False
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, child)
        drive(options, url, POSTBACK_PATH, child, options.warmup)
        wait_delivered(db, time.time(), 30)
        postbacks = drive(options, url, POSTBACK_PATH, child, options.duration)
        lag, pending = wait_delivered(db, postbacks.ended_at, 30)
        clicks = drive(options, url, CLICK_PATH, child, options.duration)
        result = Result(postbacks, clicks, lag, pending, child.peak_rss_mb())
        result.stored_conversions = count(db, "SELECT COUNT(*) FROM conversions")
        result.stored_clicks = count(db, "SELECT COUNT(*) FROM clicks")
        result.delivered = count(db, "SELECT COUNT(*) FROM conversions WHERE state = 'delivered'")
    finally:
        child.stop()
    if child.proc.returncode != 0:
        raise RuntimeError(f"the daemon exited with {child.proc.returncode}; see {child.log}")
    return result


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
                i // 500 + 1,
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
            "request_id, match_keys, received_at, finished_at, ingest_batch) "
            "VALUES ('keitaro', ?, 'sale', 'Purchase', '', ?, ?, 12.5, 'USD', 'main', ?, '203.0.113.7', "
            "'Mozilla/5.0', 'delivered', 1, 'main', ?, 'ttclid,ip_ua', ?, ?, ?)",
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


def report(
    options: Options, base: Result, bridge: Result, fake: dict[str, int], preloaded: Result | None
) -> dict[str, Any]:
    lines = []
    info = machine()
    lines.append(
        f"machine: {info['cpus']} CPUs ({info['cpu']}), {info['ram']}, Linux {info['kernel']}, "
        f"Python {info['python']}, SQLite {info['sqlite']}"
    )
    lines.append(
        f"load: {options.loadgen}, {options.connections} connections, {options.duration:.0f}s per phase"
    )
    lines.append("")
    lines.append(
        f"{'':28}{'req/s':>9}{'ratio':>8}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'srv cpu':>9}{'gen cpu':>9}"
    )

    def row(name: str, load: Load, against: Load | None) -> None:
        share = f"{ratio(load.rate, against.rate):.2f}x" if against else ""
        lines.append(
            f"{name:28}{load.rate:9.0f}{share:>8}{load.p50_ms:9.2f}{load.p99_ms:9.2f}{load.errors:8d}"
            f"{load.server_cpu:8.0%} {load.loadgen_cpu:8.0%}"
        )

    row("baseline /postback", base.postbacks, None)
    row("bridge /postback", bridge.postbacks, base.postbacks)
    row("baseline /click", base.clicks, None)
    row("bridge /click", bridge.clicks, base.clicks)
    if preloaded is not None:
        row("bridge /postback, 1M+1M db", preloaded.postbacks, base.postbacks)
        row("bridge /click, 1M+1M db", preloaded.clicks, base.clicks)
    lines.append("")
    lag = f"NOT DONE ({bridge.pending_left} pending)"
    if bridge.delivery_lag is not None:
        lag = f"{bridge.delivery_lag:.2f}s"
    requests = fake.get("requests", 0)
    batch = fake.get("events", 0) / requests if requests else 0.0
    lines.append(f"delivery lag after the last postback: {lag}")
    lines.append(
        f"fake TikTok: {fake.get('events', 0)} events in {requests} requests "
        f"(mean batch {batch:.0f}), {fake.get('unique_event_ids', 0)} unique event_ids"
    )
    lines.append(
        f"stored: {bridge.stored_conversions} conversions ({bridge.delivered} delivered), "
        f"{bridge.stored_clicks} clicks"
    )
    lines.append(f"peak RSS: bridge {bridge.peak_rss_mb:.0f} MB, baseline {base.peak_rss_mb:.0f} MB")
    if preloaded is not None:
        plag = f"{preloaded.delivery_lag:.2f}s" if preloaded.delivery_lag is not None else "NOT DONE"
        lines.append(
            f"1M+1M db: postbacks {ratio(preloaded.postbacks.rate, bridge.postbacks.rate):.2f}x and "
            f"clicks {ratio(preloaded.clicks.rate, bridge.clicks.rate):.2f}x the empty-db rate, "
            f"delivery lag {plag}, "
            f"peak RSS {preloaded.peak_rss_mb:.0f} MB"
        )
    print("\n".join(lines), flush=True)

    def load_dict(load: Load) -> dict[str, Any]:
        return {
            "rate": round(load.rate, 1),
            "requests": load.requests,
            "p50_ms": load.p50_ms,
            "p99_ms": load.p99_ms,
            "errors": load.errors,
            "server_cpu": round(load.server_cpu, 3),
            "loadgen_cpu": round(load.loadgen_cpu, 3),
        }

    data: dict[str, Any] = {
        "machine": info,
        "loadgen": options.loadgen,
        "connections": options.connections,
        "duration": options.duration,
        "baseline": {"postback": load_dict(base.postbacks), "click": load_dict(base.clicks)},
        "bridge": {
            "postback": load_dict(bridge.postbacks),
            "click": load_dict(bridge.clicks),
            "postback_ratio": round(ratio(bridge.postbacks.rate, base.postbacks.rate), 3),
            "click_ratio": round(ratio(bridge.clicks.rate, base.clicks.rate), 3),
            "delivery_lag_s": bridge.delivery_lag,
            "mean_batch": round(batch, 1),
            "peak_rss_mb": round(bridge.peak_rss_mb, 1),
        },
        "fake_tiktok": fake,
    }
    if preloaded is not None:
        data["preloaded"] = {
            "postback": load_dict(preloaded.postbacks),
            "click": load_dict(preloaded.clicks),
            "postback_vs_empty": round(ratio(preloaded.postbacks.rate, bridge.postbacks.rate), 3),
            "click_vs_empty": round(ratio(preloaded.clicks.rate, bridge.clicks.rate), 3),
            "delivery_lag_s": preloaded.delivery_lag,
            "peak_rss_mb": round(preloaded.peak_rss_mb, 1),
        }
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the bridge against a bare aiohttp baseline.")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured phase (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring (2)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument(
        "--preload",
        type=int,
        default=0,
        metavar="N",
        help="also run on a database preloaded with N clicks + N finished conversions",
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
    options = Options(args.duration, args.warmup, args.connections, loadgen, workdir)
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
    fake_summary: dict[str, int] = {}
    try:
        endpoint = first_line(fake)
        print(f"benchmark in {workdir} (load generator: {loadgen})", flush=True)
        print("  baseline ...", flush=True)
        base = run_baseline(options)
        print("  bridge, empty database ...", flush=True)
        bridge = run_bridge(options, endpoint, workdir / "empty")
        preloaded = None
        if args.preload:
            print(f"  bridge, database preloaded with {args.preload} clicks + {args.preload} conversions ...")
            preloaded = run_bridge(options, endpoint, workdir / "preloaded", args.preload)
        out = fake.stop()
        for line in out.splitlines():
            if line.startswith("{"):
                fake_summary = json.loads(line)
        print("", flush=True)
        data = report(options, base, bridge, fake_summary, preloaded)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(data, indent=2) + "\n")
    except BaseException:
        args.keep = True  # the logs in it say why
        raise
    finally:
        if fake.proc.poll() is None:
            fake.proc.kill()
            fake.proc.wait()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
