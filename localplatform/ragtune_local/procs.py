"""Process bookkeeping: every part runs in its own process group, recorded by pid + start time.

The start time (from /proc) guards against pid reuse, so `down` never signals a stranger.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


def start_time(pid: int) -> Optional[int]:
    """Clock ticks since boot at which `pid` started, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm may hold spaces/parens: fields after the last ')' are fixed; starttime is field 22.
    return int(stat.rsplit(")", 1)[1].split()[19])


@dataclass(frozen=True)
class ProcRef:
    pid: int
    started: int

    @classmethod
    def of(cls, pid: int) -> "ProcRef":
        return cls(pid, start_time(pid) or 0)

    def alive(self) -> bool:
        if start_time(self.pid) != self.started:
            return False
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        return state != "Z"

    def to_text(self) -> str:
        return f"{self.pid} {self.started}\n"

    @classmethod
    def from_text(cls, text: str) -> "ProcRef":
        pid, started = text.split()
        return cls(int(pid), int(started))


def group_members(pgid: int) -> list[int]:
    """Live pids whose process group is `pgid` (children that outlived the leader included)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def stop_group(ref: ProcRef, grace: float) -> None:
    """SIGTERM the process group led by `ref`, SIGKILL whatever is left after `grace` seconds."""
    if not ref.alive() and not group_members(ref.pid):
        return
    _signal_group(ref.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not group_members(ref.pid):
            return
        time.sleep(0.05)
    _signal_group(ref.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while group_members(ref.pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def terminate_with_parent() -> None:
    """`preexec_fn` for helper processes a test or the demo starts: the kernel sends them SIGTERM
    when the process that started them dies, so a killed pytest leaves no operator behind."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
