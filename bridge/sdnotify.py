"""Tells systemd how the daemon is doing (sd_notify READY/RELOADING/STOPPING/WATCHDOG), without libsystemd.

The protocol is one AF_UNIX datagram of newline-separated `KEY=value` assignments sent to the socket named
by $NOTIFY_SOCKET (a path, or `@name` for the abstract namespace). Outside systemd the variable is unset and
every method is a no-op, so the daemon calls these unconditionally.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Mapping

# PID 1 drains its notification socket promptly; waiting longer than this would stall the event loop that
# sends the notification, and a watchdog ping or status line is not worth that. (READY=1 is the one that
# matters; if PID 1 cannot take it within a second, the start timeout will say so in the journal.)
_SEND_TIMEOUT = 1.0


def _socket_address(value: str) -> bytes | None:
    """$NOTIFY_SOCKET as a sockaddr_un path, or None for a form we do not speak (e.g. systemd's vsock:)."""
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    return None


def _positive_int(value: str | None) -> int | None:
    try:
        number = int(value) if value else None
    except ValueError:
        return None
    return number if number and number > 0 else None


class Notifier:
    """A connection to the service manager's notification socket, or a no-op when there is none."""

    def __init__(
        self,
        address: bytes | None = None,
        watchdog_usec: int | None = None,
        watchdog_pid: int | None = None,
    ) -> None:
        self._address = address
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        self._sock: socket.socket | None = None
        if address is not None:
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            except OSError:
                # e.g. AF_UNIX denied by a seccomp filter: notifications are advisory, run without them.
                self._sock = None
            else:
                self._sock.settimeout(_SEND_TIMEOUT)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Reads NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID (from os.environ by default)."""
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        return cls(
            address=_socket_address(raw) if raw else None,
            watchdog_usec=_positive_int(env.get("WATCHDOG_USEC")),
            watchdog_pid=_positive_int(env.get("WATCHDOG_PID")),
        )

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *assignments: str) -> None:
        """Sends the assignments as one datagram; never raises: a lost notification must not stop work."""
        if self._sock is None or self._address is None or not assignments:
            return
        # A newline inside a value would start a new assignment (a STATUS text could forge READY=1).
        payload = "\n".join(a.replace("\n", " ") for a in assignments).encode("utf-8", "replace")
        with contextlib.suppress(OSError):
            self._sock.sendto(payload, self._address)

    def ready(self, status: str | None = None) -> None:
        if status is None:
            self.notify("READY=1")
        else:
            self.notify("READY=1", f"STATUS={status}")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def reloading(self) -> None:
        # systemd >= 253 (Type=notify-reload) ignores RELOADING=1 without the CLOCK_MONOTONIC timestamp that
        # lets it tell this reload from an earlier one; older versions ignore the extra field.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def reloaded(self, status: str | None = None) -> None:
        self.ready(status)

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half the deadline, as sd_watchdog_enabled(3) advises).

        None when there is no watchdog for this process, or no socket to ping it through.
        """
        if self._watchdog_usec is None or self._sock is None:
            return None
        # WATCHDOG_PID names the process the deadline is for; a child that inherited the variables must not
        # ping on its parent's behalf.
        if self._watchdog_pid is not None and self._watchdog_pid != os.getpid():
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
