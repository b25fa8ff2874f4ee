"""What the tests see of processes and sockets, read from /proc: which processes carry a marker in their
environment (everything a test started inherits it), and every TCP socket a process holds."""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path
from typing import Callable, NamedTuple

TCP_LISTEN = "0A"  # the state column of /proc/net/tcp


def processes_with(marker: str) -> list[int]:
    """Pids of live processes whose environment carries `marker` (a zombie's environment reads empty)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:  # exited meanwhile, or not ours to read
            continue
    return found


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` every 20 ms; fail the test when it is still false after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


class TcpSocket(NamedTuple):
    listening: bool
    local: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int  # the local one
    remote: ipaddress.IPv4Address | ipaddress.IPv6Address


def tcp_sockets(pid: int) -> list[TcpSocket]:
    """The TCP sockets (IPv4 and IPv6) process `pid` holds open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                port = int(fields[1].split(":")[1], 16)
                found.append(TcpSocket(fields[3] == TCP_LISTEN, _address(fields[1]), port, _address(fields[2])))
    return found


def _address(field: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The IP of a /proc/net/tcp address field (hex, each 32-bit word in host byte order: little-endian)."""
    raw = bytes.fromhex(field.split(":")[0])
    return ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))
