"""What the kernel says about a process: resident memory, open file descriptors, threads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcessStats:
    rss_bytes: int
    num_fds: int
    num_threads: int


def _status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    raise KeyError(f"/proc/{pid}/status has no {name}")


def rss_bytes(pid: int) -> int:
    value, unit = _status_field(pid, "VmRSS").split()
    assert unit == "kB", unit
    return int(value) * 1024


def peak_rss_bytes(pid: int) -> int:
    """The high-water mark of resident memory since start or the last `reset_peak_rss`."""
    value, unit = _status_field(pid, "VmHWM").split()
    assert unit == "kB", unit
    return int(value) * 1024


def reset_peak_rss(pid: int) -> None:
    """Sets the high-water mark back to the current RSS (Linux: clear_refs 5; root or owner)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def num_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def num_threads(pid: int) -> int:
    return int(_status_field(pid, "Threads"))


def stats(pid: int) -> ProcessStats:
    return ProcessStats(rss_bytes(pid), num_fds(pid), num_threads(pid))


def listening_addresses(pid: int) -> set[str]:
    """The local IPv4/IPv6 addresses of the process's listening TCP sockets, as text."""
    inodes = _socket_inodes(pid)
    found: set[str] = set()
    for table, decode in (("tcp", _ipv4), ("tcp6", _ipv6)):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                found.add(decode(local.split(":")[0]))
    return found


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target.removeprefix("socket:[").removesuffix("]"))
    return inodes


def _ipv4(hex_address: str) -> str:
    return ".".join(str(b) for b in reversed(bytes.fromhex(hex_address)))


def _ipv6(hex_address: str) -> str:
    import ipaddress

    words = bytes.fromhex(hex_address)
    ordered = b"".join(words[i : i + 4][::-1] for i in range(0, 16, 4))
    return str(ipaddress.IPv6Address(ordered))
