"""server.listeners: 2 with the real daemon: a second process on the port answers postbacks by itself,
reloads with the daemon, is restarted when it dies, and never outlives the daemon.

Which process answered a request is read from /proc: the test opens a connection, finds the server side
of it in /proc/net/tcp and the process holding that socket in /proc/<pid>/fd, and only then sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SHIPPED_TRACKERS, base_settings, until, write_config
from tests.daemon_proc import DaemonProcess, free_port
from tests.fake_tiktok import FakeTikTok

REQUEST_TIMEOUT = 10.0


# -- processes, read from /proc ------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None when there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    """Running or stopped; a zombie has exited (it only waits for its parent to read its code)."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def stopped(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] in ("T", "t")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def rundir_of(listener_pid: int) -> Path | None:
    """The daemon's private directory (its Unix socket, the metrics files), read from a listener
    process's environment: a daemon killed by the teardown leaves it behind."""
    try:
        environ = Path(f"/proc/{listener_pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in environ:
        name, _, value = entry.decode(errors="replace").partition("=")
        if name == "POSTBACK_BRIDGE_MAIN_SOCKET":
            directory = Path(value).parent
            return directory if directory.name.startswith("postback-bridge-") else None
    return None


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def listener_children(daemon_pid: int) -> list[int]:
    """The daemon's live listener processes, as the system sees them."""
    found = []
    for pid in all_pids():
        stat = _stat(pid)
        if stat is not None and stat[1] == daemon_pid and alive(pid) and "bridge.listeners" in cmdline(pid):
            found.append(pid)
    return found


def processes_of(config: Path) -> list[int]:
    """Every live process (daemon or listener) started with this test's own config file."""
    return [pid for pid in all_pids() if str(config) in cmdline(pid) and alive(pid)]


def _socket_owners(server_port: int, client_ports: Iterable[int], pids: Iterable[int]) -> dict[int, int]:
    """client port -> pid of the process that accepted that connection (not yet accepted: absent)."""
    wanted = set(client_ports)
    inodes: dict[str, int] = {}
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            parts = line.split()
            local, remote, inode = parts[1], parts[2], parts[9]
            if int(local.split(":")[1], 16) != server_port or inode == "0":
                continue  # inode 0: still in the accept queue, no process has it
            port = int(remote.split(":")[1], 16)
            if port in wanted:
                inodes[f"socket:[{inode}]"] = port
    owners: dict[int, int] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target in inodes:
                        owners[inodes[target]] = pid
    return owners


def _locks_held(pid: int, paths: Iterable[Path]) -> list[str]:
    """Write locks (flock or fcntl) `pid` holds on these files: /proc/locks, waiters left out."""
    inodes = {}
    for path in paths:
        with contextlib.suppress(OSError):
            inodes[os.stat(path).st_ino] = path.name
    held = []
    for line in Path("/proc/locks").read_text().splitlines():
        parts = line.split()
        if len(parts) < 6 or parts[1] == "->":
            continue
        mode, owner, where = parts[3], parts[4], parts[5]
        if mode == "WRITE" and owner == str(pid) and int(where.rsplit(":", 1)[1]) in inodes:
            held.append(f"{inodes[int(where.rsplit(':', 1)[1])]}: {line}")
    return held


# -- HTTP on connections of known owner ------------------------------------------------------------------


@dataclass
class Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    port: int
    owner: int | None = None

    async def get(self, path: str, timeout: float = REQUEST_TIMEOUT) -> tuple[int, bytes]:
        """One GET on this connection (Connection: close); (status, body)."""
        try:
            self.writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            await self.writer.drain()
            data = await asyncio.wait_for(self.reader.read(), timeout)
        finally:
            self.writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 "), data[:200]
        assert b"transfer-encoding: chunked" not in head.lower(), head
        return int(head.split()[1]), body

    def close(self) -> None:
        self.writer.close()


def postback_path(click_id: str, tracker: str = "keitaro") -> str:
    query = urlencode({"subid": click_id, "external_id": f"E.C.P.{click_id}", "status": "lead"})
    return f"/postback/{tracker}?{query}"


def parse(body: bytes) -> Any:
    """The JSON answer; a body that is not JSON stays as it is, for the assertion to show."""
    try:
        return json.loads(body)
    except ValueError:
        return {"not json": body}


# -- the daemon with one listener process ------------------------------------------------------------------


@dataclass
class Bridge:
    daemon: DaemonProcess
    settings: dict[str, Any]
    fake: FakeTikTok
    seen_pids: set[int] = field(default_factory=set)
    rundirs: set[Path] = field(default_factory=set)

    @property
    def pid(self) -> int:
        assert self.daemon.proc is not None
        return self.daemon.proc.pid

    @property
    def directory(self) -> Path:
        return self.daemon.config.parent

    async def start(self) -> list[int]:
        """Start the daemon; once its listener processes are ready, their pids."""
        write_config(self.directory, self.settings)
        earlier = len(self.daemon.log_lines())  # a restart appends to the same log
        self.daemon.start()
        self.seen_pids.add(self.pid)
        await self.daemon.wait_ready()
        listening = await until(
            lambda: next(
                (line for line in self.daemon.log_lines()[earlier:] if line.get("event") == "listening"),
                None,
            ),
            20,
            "the daemon's listening line",
        )
        children = listening["listener_processes"]
        self.seen_pids.update(children)
        assert len(children) == 1, listening
        for child in children:
            await self.wait_child_ready(child)
        return children

    async def wait_child_ready(self, child: int) -> None:
        self.seen_pids.add(child)
        if (rundir := rundir_of(child)) is not None:
            self.rundirs.add(rundir)
        await self.daemon.wait_log(
            lambda line: line.get("event") == "listener process ready" and line.get("pid") == child
        )

    def children(self) -> list[int]:
        found = listener_children(self.pid)
        self.seen_pids.update(found)
        return found

    async def connect(self, count: int, owners_from: Iterable[int], timeout: float = 10.0) -> list[Conn]:
        """`count` fresh connections, each returned once a process of `owners_from` has accepted it;
        connections none of them accepted within `timeout` are closed and left out."""
        pids = list(owners_from)
        opened = await asyncio.wait_for(
            asyncio.gather(*(asyncio.open_connection("127.0.0.1", self.daemon.port) for _ in range(count))),
            timeout,
        )
        conns = [Conn(reader, writer, writer.get_extra_info("sockname")[1]) for reader, writer in opened]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            owners = _socket_owners(self.daemon.port, (c.port for c in conns), pids)
            for conn in conns:
                conn.owner = owners.get(conn.port)
            if all(conn.owner is not None for conn in conns):
                break
            await asyncio.sleep(0.02)
        for conn in conns:
            if conn.owner is None:
                conn.close()
        return [conn for conn in conns if conn.owner is not None]

    @contextlib.asynccontextmanager
    async def parent_stopped(self) -> AsyncIterator[None]:
        """SIGSTOP the daemon at a moment it holds no write lock on the database (its delivery worker
        claims once a second), so that only what runs in the listener process is tested; SIGCONT after."""
        db = self.directory / "bridge.db"
        files = [db, db.with_name("bridge.db.writers"), db.with_name("bridge.db-wal")]
        files.append(db.with_name("bridge.db-shm"))
        try:
            for _ in range(100):
                os.kill(self.pid, signal.SIGSTOP)
                await until(lambda: stopped(self.pid), 5, "daemon stopped by SIGSTOP")
                if not _locks_held(self.pid, files):
                    break
                os.kill(self.pid, signal.SIGCONT)
                await asyncio.sleep(0.03)
            else:
                raise AssertionError(f"the daemon always held a write lock: {_locks_held(self.pid, files)}")
            yield
        finally:
            os.kill(self.pid, signal.SIGCONT)

    def states(self) -> Counter[str]:
        db = sqlite3.connect(self.directory / "bridge.db", timeout=10)
        try:
            return Counter(state for (state,) in db.execute("SELECT state FROM conversions"))
        finally:
            db.close()

    async def add_fresh_tracker_and_reload(self) -> None:
        """A tracker `fresh` (the shipped Keitaro file under another name), then SIGHUP until reloaded."""
        tracker = yaml.safe_load((SHIPPED_TRACKERS / "keitaro.yaml").read_text())
        tracker["name"] = "fresh"
        (self.directory / "trackers" / "fresh.yaml").write_text(yaml.safe_dump(tracker))
        self.daemon.signal(signal.SIGHUP)
        await self.daemon.wait_log(
            lambda line: line.get("event") == "reloaded" and "fresh" in line.get("trackers", [])
        )

    async def delivered_once(self, event_ids: set[str], timeout: float = 20.0) -> None:
        """Every one of `event_ids` reached TikTok, nothing is left to send, and none came twice."""
        await self.fake.wait_for(lambda: event_ids <= set(self.fake.event_ids()), timeout=timeout)
        await until(lambda: self.states().get("pending", 0) == 0, timeout, "no conversion pending")
        received = Counter(self.fake.event_ids())
        assert {event_id: n for event_id, n in received.items() if n != 1} == {}
        assert set(received) == event_ids

    def kill_everything(self) -> None:
        """Teardown, whatever happened: the daemon first (so it starts nothing again), then every
        listener process this test saw or that runs with this test's config file."""
        proc = self.daemon.proc
        if proc is not None and proc.poll() is None:
            self.seen_pids.update(listener_children(proc.pid))
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            self.daemon.stop()
        for line in self.daemon.log_lines():
            self.seen_pids.update(line.get("listener_processes") or [])
            if line.get("event") == "listener process ready":
                self.seen_pids.add(line["pid"])
        config = str(self.daemon.config)
        left = {pid for pid in self.seen_pids | set(processes_of(self.daemon.config)) if alive(pid)}
        for pid in left:
            if config in cmdline(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(alive(pid) and config in cmdline(pid) for pid in left) and time.monotonic() < deadline:
            time.sleep(0.02)
        # Also when no listener process lived long enough to be asked: named after the database (as the
        # daemon names it), so this one is this test's.
        digest = hashlib.sha256(str((self.directory / "bridge.db").resolve()).encode()).hexdigest()[:16]
        self.rundirs.add(Path(tempfile.gettempdir()) / f"postback-bridge-{digest}")
        for rundir in self.rundirs:
            shutil.rmtree(rundir, ignore_errors=True)


@pytest.fixture
def bridge(tmp_path: Path, fake: FakeTikTok) -> Iterator[Bridge]:
    port = free_port()
    settings = base_settings(fake.url)
    settings["server"].update(port=port, listeners=2)
    settings["tiktok"]["dry_run"] = False
    setup = Bridge(DaemonProcess(tmp_path / "bridge.yaml", port), settings, fake)
    try:
        yield setup
    finally:
        setup.kill_everything()


async def metric(url: str, name: str, **labels: str) -> float:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)) as session,
        session.get(f"{url}/metrics") as resp,
    ):
        assert resp.status == 200, await resp.text()
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


async def postbacks(conns: list[Conn], prefix: str, tracker: str = "keitaro") -> dict[str, tuple[int, Any]]:
    """One postback (a new click id) on each connection, all at once: click id -> (status, body)."""
    ids = [f"{prefix}{i}" for i in range(len(conns))]
    answers = await asyncio.gather(
        *(conn.get(postback_path(click_id, tracker)) for conn, click_id in zip(conns, ids, strict=True))
    )
    return {click_id: (status, parse(body)) for click_id, (status, body) in zip(ids, answers, strict=True)}


async def one_connection_each(bridge: Bridge, pids: list[int], rounds: int = 50) -> dict[int, Conn]:
    """A fresh connection accepted by each of `pids` (the kernel hands connections to either process:
    open some until each one has taken one); the others are closed."""
    found: dict[int, Conn] = {}
    for _ in range(rounds):
        for conn in await bridge.connect(4, pids):
            if conn.owner is not None and conn.owner not in found:
                found[conn.owner] = conn
            else:
                conn.close()
        if set(found) == set(pids):
            return found
    for conn in found.values():
        conn.close()
    raise AssertionError(f"no connection taken by each of {pids} in {rounds} rounds: {sorted(found)}")


GAUGES = ("bridge_conversions", "bridge_queue_depth", "bridge_oldest_pending_seconds", "bridge_pixel_healthy")


def gauge_samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the gauge families in a /metrics answer: (name, labels) -> value."""
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        if family.type == "gauge":
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


# -- tests -------------------------------------------------------------------------------------------


async def test_200_postbacks_on_parallel_connections_are_all_accepted_delivered_once_and_counted(
    bridge: Bridge,
) -> None:
    [child] = await bridge.start()

    # One connection taken by each process for sure (a process short of CPU during the burst could
    # otherwise take none, and the test would prove nothing about it), then a burst of 198.
    first = await one_connection_each(bridge, [bridge.pid, child])
    conns = [*first.values(), *await bridge.connect(198, [bridge.pid, child])]
    assert len(conns) == 200, "every connection is accepted by one of the two processes"
    owners = Counter(conn.owner for conn in conns)
    answers = await postbacks(conns, "par")

    assert {click_id: status for click_id, (status, _) in answers.items() if status != 200} == {}
    assert {body.get("result") for _, body in answers.values()} == {"accepted"}
    assert len({body["conversion_id"] for _, body in answers.values()}) == 200
    # Both processes took connections from the one port (else this proves nothing about the child).
    assert owners[child] > 0 and owners[bridge.pid] > 0, owners

    await bridge.delivered_once({f"par{i}_Lead" for i in range(200)})
    # /metrics adds up the counters of both processes, whichever of them is asked.
    for _ in range(4):
        counted = await metric(
            bridge.daemon.url, "bridge_postbacks_total", result="accepted", tracker="keitaro"
        )
        assert counted == 200


async def test_the_listener_process_accepts_and_commits_postbacks_while_the_daemon_is_stopped(
    bridge: Bridge,
) -> None:
    [child] = await bridge.start()

    async with bridge.parent_stopped():
        # The stopped daemon accepts nothing: what is accepted, the listener process accepted.
        conns = await bridge.connect(12, [bridge.pid, child], timeout=3)
        assert conns, "the listener process accepted no connection while the daemon was stopped"
        assert {conn.owner for conn in conns} == {child}
        answers = await postbacks(conns, "stop")
        assert {click_id: status for click_id, (status, _) in answers.items() if status != 200} == {}
        assert {body.get("result") for _, body in answers.values()} == {"accepted"}
        assert all(isinstance(body["conversion_id"], int) for _, body in answers.values())
        # Committed to the database while the daemon could not have done anything.
        assert bridge.states()["pending"] == len(answers)
        assert bridge.fake.event_ids() == []

    await bridge.delivered_once({f"{click_id}_Lead" for click_id in answers})


async def test_sighup_gives_the_listener_process_a_new_tracker_too(bridge: Bridge) -> None:
    [child] = await bridge.start()
    conns = await bridge.connect(1, [bridge.pid, child])
    assert (await conns[0].get(postback_path("before", "fresh")))[0] == 404

    await bridge.add_fresh_tracker_and_reload()

    conns = await bridge.connect(40, [bridge.pid, child])
    assert len(conns) == 40
    answers = await postbacks(conns, "fresh")
    by_owner = {
        (click_id, "daemon" if conn.owner == bridge.pid else "listener process"): status
        for conn, (click_id, (status, _)) in zip(conns, answers.items(), strict=True)
    }
    assert {key: status for key, status in by_owner.items() if status != 200} == {}

    async with bridge.parent_stopped():
        conns = await bridge.connect(4, [bridge.pid, child], timeout=3)
        assert conns and {conn.owner for conn in conns} == {child}
        stopped_answers = await postbacks(conns, "freshstop", tracker="fresh")
    assert [(status, body.get("result")) for status, body in stopped_answers.values()] == [
        (200, "accepted")
    ] * len(conns)

    await bridge.delivered_once({f"{click_id}_Lead" for click_id in [*answers, *stopped_answers]})


async def test_a_killed_listener_process_is_started_again_and_postbacks_go_on(bridge: Bridge) -> None:
    [child] = await bridge.start()
    answered: dict[str, tuple[int, Any]] = {}

    os.kill(child, signal.SIGKILL)
    # Meanwhile the daemon answers alone.
    for i in range(5):
        answered.update(await postbacks(await bridge.connect(1, [bridge.pid, child]), f"gap{i}-"))
    error = await bridge.daemon.wait_log(
        lambda line: line.get("event") == "listener process exited; starting it again"
    )
    assert (error["level"], error["pid"]) == ("error", child)

    [restarted] = await until(lambda: [pid for pid in bridge.children() if pid != child], 10, "a new one")
    assert not alive(child)
    await bridge.wait_child_ready(restarted)
    answered.update(await postbacks(await bridge.connect(10, [bridge.pid, restarted]), "after"))
    # The new one answers by itself, from the same port.
    async with bridge.parent_stopped():
        conns = await bridge.connect(4, [bridge.pid, restarted], timeout=3)
        assert conns and {conn.owner for conn in conns} == {restarted}
        answered.update(await postbacks(conns, "new"))

    assert {click_id: answer for click_id, answer in answered.items() if answer[0] != 200} == {}
    assert {body.get("result") for _, body in answered.values()} == {"accepted"}
    await bridge.delivered_once({f"{click_id}_Lead" for click_id in answered})
    assert bridge.children() == [restarted]


async def test_sigterm_stops_the_listener_processes_and_the_daemon_exits_0(bridge: Bridge) -> None:
    [child] = await bridge.start()
    answers = await postbacks(await bridge.connect(4, [bridge.pid, child]), "term")
    assert {body.get("result") for _, body in answers.values()} == {"accepted"}

    bridge.daemon.signal(signal.SIGTERM)

    assert await bridge.daemon.wait_exit(timeout=25) == 0
    assert not alive(child)
    assert processes_of(bridge.daemon.config) == []
    events = [line.get("event") for line in bridge.daemon.log_lines()]
    assert "listener process did not stop in time; killed" not in events
    assert "listener process exited; starting it again" not in events
    # The port is free again: nothing is left listening on it.
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", bridge.daemon.port)


async def test_the_listener_process_exits_by_itself_when_the_daemon_is_killed(bridge: Bridge) -> None:
    [child] = await bridge.start()

    bridge.daemon.kill()

    await until(lambda: not alive(child), 5, f"listener process {child} gone after the daemon's kill -9")
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", bridge.daemon.port)
    # Started again (as systemd would), the bridge takes postbacks on the same port and database.
    [child] = await bridge.start()
    answers = await postbacks(await bridge.connect(4, [bridge.pid, child]), "again")
    assert [(status, body.get("result")) for status, body in answers.values()] == [(200, "accepted")] * 4
    await bridge.delivered_once({f"{click_id}_Lead" for click_id in answers})


async def test_readyz_asked_of_the_listener_process_answers_ready(bridge: Bridge) -> None:
    [child] = await bridge.start()
    # Connections made while the daemon is stopped are all the listener process's.
    async with bridge.parent_stopped():
        conns = await bridge.connect(6, [bridge.pid, child], timeout=3)
    assert conns and {conn.owner for conn in conns} == {child}

    answers = await asyncio.gather(*(conn.get("/readyz") for conn in conns))

    assert answers == [(200, b"ready\n")] * len(conns)


async def test_sighups_right_after_start_do_not_kill_the_listener_process_and_reach_it(
    bridge: Bridge,
) -> None:
    write_config(bridge.directory, bridge.settings)
    bridge.daemon.start()
    bridge.seen_pids.add(bridge.pid)

    def logged(event: str, **fields: Any) -> dict[str, Any] | None:
        return next(
            (
                line
                for line in bridge.daemon.log_lines()
                if line.get("event") == event and all(line.get(k) == v for k, v in fields.items())
            ),
            None,
        )

    # "listening" comes once the daemon's own SIGHUP handler is in place (before it, SIGHUP would end the
    # daemon itself): the earliest a reload can be asked for, while the listener process the daemon
    # started a moment before is still starting Python. Every reload sends that process a SIGHUP.
    listening = await until(lambda: logged("listening"), 20, "the daemon's listening line")
    [child] = listening["listener_processes"]
    bridge.seen_pids.add(child)
    child_was_starting = logged("listener process ready", pid=child) is None
    first_second = time.monotonic() + 1.0
    while time.monotonic() < first_second:
        bridge.daemon.signal(signal.SIGHUP)
        await asyncio.sleep(0.1)
    assert child_was_starting, "the listener process was ready before the first SIGHUP: this proves nothing"
    outcome = await bridge.daemon.wait_log(
        lambda line: (
            line.get("pid") == child
            and line.get("event") in ("listener process ready", "listener process exited; starting it again")
        )
    )
    assert outcome["event"] == "listener process ready", outcome  # code -1: ended by SIGHUP
    await bridge.wait_child_ready(child)

    # A tracker the listener process cannot have read at its start: only the last SIGHUP gives it.
    await bridge.add_fresh_tracker_and_reload()

    watched_until = time.monotonic() + 3.0
    while time.monotonic() < watched_until:
        events = [line.get("event") for line in bridge.daemon.log_lines()]
        assert "listener process exited; starting it again" not in events, bridge.daemon.logs_text()
        assert alive(child), f"listener process {child} is gone:\n{bridge.daemon.logs_text()}"
        assert bridge.children() == [child]
        await asyncio.sleep(0.1)
    assert bridge.daemon.proc is not None and bridge.daemon.proc.poll() is None
    assert "reload failed" not in events

    async with bridge.parent_stopped():
        conns = await bridge.connect(4, [bridge.pid, child], timeout=3)
        assert conns and {conn.owner for conn in conns} == {child}
        answers = await postbacks(conns, "early", tracker="fresh")
    assert [(status, body.get("result")) for status, body in answers.values()] == [(200, "accepted")] * len(
        conns
    )
    await bridge.delivered_once({f"{click_id}_Lead" for click_id in answers})


async def test_metrics_forget_the_gauges_of_a_removed_pixel_with_listener_processes(bridge: Bridge) -> None:
    bridge.settings["pixels"]["second"]["access_token"] = "token-refused-0123456789"  # the fake says 40001
    tracker = yaml.safe_load((SHIPPED_TRACKERS / "keitaro.yaml").read_text())
    tracker.update(name="tosecond", pixel="second")
    (bridge.directory / "trackers").mkdir(parents=True, exist_ok=True)
    (bridge.directory / "trackers" / "tosecond.yaml").write_text(yaml.safe_dump(tracker))
    [child] = await bridge.start()

    answers = await postbacks(await bridge.connect(3, [bridge.pid, child]), "held", tracker="tosecond")
    accepted_at = time.time()
    assert [(status, body.get("result")) for status, body in answers.values()] == [(200, "accepted")] * 3

    async def scrape_both() -> dict[int, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
        """/metrics asked of the daemon and of the listener process, each on a fresh connection."""
        conns = await one_connection_each(bridge, [bridge.pid, child])
        answers = await asyncio.gather(*(conn.get("/metrics") for conn in conns.values()))
        assert [status for status, _ in answers] == [200, 200], answers
        return {owner: gauge_samples(body) for owner, (_, body) in zip(conns, answers, strict=True)}

    pixel_2 = (("pixel", "second"),)
    held = {("bridge_pixel_healthy", pixel_2): 0.0, ("bridge_queue_depth", pixel_2): 3.0}

    async def shows_held() -> bool:
        scrapes = await scrape_both()
        return all(samples.get(key) == value for samples in scrapes.values() for key, value in held.items())

    deadline = time.monotonic() + 20
    while not await shows_held():
        assert time.monotonic() < deadline, f"/metrics never showed {held}: {await scrape_both()}"
        await asyncio.sleep(0.2)

    # The pixel goes, and its held events with it: they wait for no pixel but their own, and a
    # max_event_age of 1 s expires them once they are looked at again (at once, after the reload).
    await asyncio.sleep(max(0.0, accepted_at + 2.1 - time.time()))
    del bridge.settings["pixels"]["second"]
    bridge.settings["delivery"] = {"max_event_age": 1}
    write_config(bridge.directory, bridge.settings)
    (bridge.directory / "trackers" / "tosecond.yaml").unlink()
    bridge.daemon.signal(signal.SIGHUP)
    reloaded = await bridge.daemon.wait_log(lambda line: line.get("event") == "reloaded")
    assert reloaded["pixels"] == ["main"] and "tosecond" not in reloaded["trackers"], reloaded

    await until(lambda: bridge.states() == {"expired": 3}, 20, "the removed pixel's events expired")
    assert [r for r in bridge.fake.requests if r.answer_code == 0] == []
    for _ in range(3):
        for owner, samples in (await scrape_both()).items():
            which = "daemon" if owner == bridge.pid else "listener process"
            assert [key for key in samples if ("pixel", "second") in key[1]] == [], (which, samples)
            assert samples[("bridge_pixel_healthy", (("pixel", "main"),))] == 1.0, (which, samples)
            assert samples[("bridge_queue_depth", (("pixel", "main"),))] == 0.0, (which, samples)
    assert "Clearing labels has not been implemented" not in bridge.daemon.logs_text()
