"""A running server's processes as the benchmarks and the tests observe them from outside.

Read from ``/proc`` and the server's runtime directory, never from inside the server:
a free port to start it on, its worker processes, which of them have finished their first
repository scan, their CPU time and resident memory. The tests import it too
(``bench.processes``), so a server is watched the same way in both.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_worker_pids(pid: int) -> list[int]:
    """The worker processes of the ``python -m service`` supervisor ``pid``: the children
    multiprocessing spawned (not its resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def workers_scanned(runtime: Path) -> list[int]:
    """Pids of the workers that have finished their first repository scan: each records a
    generation >= 0 in the runtime directory (docs/service.md, "Workers")."""
    pids = []
    for path in (runtime / "workers").glob("*.json"):
        try:
            if json.loads(path.read_text())["generation"] >= 0:
                pids.append(int(path.stem))
        except (OSError, ValueError, KeyError):
            continue  # being replaced
    return pids


def vm_rss_kib(pid: int) -> int:
    """Process ``pid``'s resident memory (VmRSS) in KiB; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def process_tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time that process ``pid`` and its children (a server's workers)
    have used so far, from /proc (0 for a process that is gone)."""
    pids = [pid]
    try:
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


def listening_sockets(port: int) -> int:
    """How many sockets listen on TCP ``port`` (IPv4 and IPv6): with a socket per worker
    (SO_REUSEPORT), how many workers take connections."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            count += state == "0A" and int(local.rsplit(":", 1)[1], 16) == port  # 0A: LISTEN
    return count
