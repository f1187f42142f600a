"""The TCP sockets that this process and its descendants listen on, from /proc (Linux; no psutil needed)."""

from __future__ import annotations

import ipaddress
import os
import socket

def _descendants(root: int) -> list[int]:
    children = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(pid))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found

def _addr(hexaddr: str) -> tuple[str, int]:
    ip, port = hexaddr.split(":")
    raw = bytes.fromhex(ip)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1]), int(port, 16)
    words = b"".join(raw[i:i+4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words), int(port, 16)

def listening(root: int | None = None) -> dict[tuple[int, str], set[tuple[str, int]]]:
    """{(pid, command): {(address, port)}} of sockets in LISTEN state."""
    root = root or os.getpid()
    result = {}
    for pid in _descendants(root):
        inodes = set()
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
        for table in ("tcp", "tcp6"):
            try:
                lines = open(f"/proc/{pid}/net/{table}").read().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                parts = line.split()
                if parts[3] == "0A" and parts[9] in inodes:
                    name = open(f"/proc/{pid}/comm").read().strip()
                    result.setdefault((pid, name), set()).add(_addr(parts[1]))
    return result


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def non_loopback(root: int | None = None) -> dict[tuple[int, str], list[tuple[str, int]]]:
    found = {key: sorted(a for a in addresses if not is_loopback(a[0])) for key, addresses in listening(root).items()}
    return {key: addresses for key, addresses in found.items() if addresses}
