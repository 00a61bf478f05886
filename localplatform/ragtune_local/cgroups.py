"""Memory limits for local containers, enforced like a kubelet does: one memory cgroup per container.

The runner makes its cgroups under its own (`/proc/self/cgroup`), so it needs no more rights than
writing there. cgroup v1 (`memory.limit_in_bytes`, `memory.oom_control`) and v2 (`memory.max`,
`memory.events`) are both supported; `detect()` returns None where neither can be written, and the
runner then runs containers without limits (and says so once).
"""

from __future__ import annotations

import errno
import os
import re
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Optional

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT = "ragtune-pods"
"""Folder under the runner's own cgroup; each runner has its own folder `runner-<pid>` in it (several
platforms may share a cgroup), which holds one child per container."""

_SUFFIXES = {"": 1, "k": 1000, "M": 1000 ** 2, "G": 1000 ** 3, "T": 1000 ** 4, "P": 1000 ** 5, "E": 1000 ** 6,
             "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50, "Ei": 1 << 60}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([+-]?[0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m))?$")


def parse_quantity(text: str | int) -> int:
    """A Kubernetes memory quantity ("64Mi", "1.5G", "128974848", "129e6", "1k") -> bytes (rounded up,
    as the API server canonicalises). Raises ValueError naming the bad value."""
    if isinstance(text, int):
        return text
    match = _QUANTITY.match(str(text).strip())
    if not match:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. 512Mi, 2Gi, 1G, 1048576)")
    number, exponent, suffix = match.groups()
    value = Decimal(number)
    if exponent is not None:
        value *= Decimal(10) ** int(exponent)
    elif suffix == "m":  # milli-bytes: legal, if odd
        value /= 1000
    else:
        value *= _SUFFIXES[suffix or ""]
    return int(value.to_integral_value(rounding="ROUND_CEILING"))


@dataclass(frozen=True)
class MemoryCgroups:
    """Where container cgroups go, and which cgroup version's files to use."""

    parent: Path
    version: int

    def create(self, name: str, limit: int) -> Path:
        """A fresh child cgroup limited to `limit` bytes (swap included where the kernel accounts it)."""
        path = self.parent / name
        if path.exists():  # a leftover of a crashed runner with the same name: start clean
            remove(path)
        path.mkdir()
        try:
            if self.version == 1:
                (path / "memory.limit_in_bytes").write_text(str(limit))
                _write_optional(path / "memory.memsw.limit_in_bytes", str(limit))  # no escape into swap
            else:
                (path / "memory.max").write_text(str(limit))
                _write_optional(path / "memory.swap.max", "0")
        except OSError:
            remove(path)
            raise
        return path

    def oom_kills(self, path: Path) -> int:
        """How many processes the kernel's OOM killer ended in this cgroup."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            fields = dict(line.split() for line in (path / name).read_text().splitlines() if line.strip())
        except (OSError, ValueError):
            return 0
        return int(fields.get("oom_kill", 0))

    def sweep(self) -> None:
        """Removes what runners that are gone left behind (a cgroup with live processes stays)."""
        for runner in self.parent.parent.glob("runner-*"):
            pid = runner.name.removeprefix("runner-")
            if runner != self.parent and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                release_all(runner)

    def close(self) -> None:
        """Removes this runner's folder (at shutdown, once its containers are gone)."""
        release_all(self.parent)


def release_all(folder: Path) -> None:
    for child in folder.iterdir():
        if child.is_dir():
            remove(child, wait=0)
    remove(folder, wait=0)


def remove(path: Path, wait: float = 2.0) -> bool:
    """rmdir a cgroup; its last processes may take a moment to leave after they are reaped."""
    deadline = time.monotonic() + wait
    while True:
        try:
            path.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def _write_optional(path: Path, value: str) -> None:
    """Writes a control file that only some kernels have (swap accounting)."""
    try:
        path.write_text(value)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EACCES, errno.EPERM):
            raise


def _own_cgroups(proc_cgroup: str) -> tuple[Optional[str], Optional[str]]:
    """(v1 memory cgroup path, v2 unified path) of this process from /proc/self/cgroup text."""
    v1 = v2 = None
    for line in proc_cgroup.splitlines():
        hid, controllers, path = line.split(":", 2)
        if hid == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v1, v2


def _v2_mount() -> Optional[Path]:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[:1] == ["cgroup2"]:
            return Path(left.split()[4])
    return None


def _delegate_memory(cgroup: Path) -> None:
    """Enables the memory controller for the children of `cgroup` (v2)."""
    control = cgroup / "cgroup.subtree_control"
    if "memory" not in control.read_text().split():
        control.write_text("+memory")


def _usable(own: Path, version: int) -> MemoryCgroups:
    """Makes this runner's folder below `own` and proves a limited child can be made in it (raises
    OSError otherwise)."""
    parent = own / PARENT / f"runner-{os.getpid()}"
    for level in (own, own / PARENT, parent):
        level.mkdir(exist_ok=True)
        if version == 2:
            # v2 limits apply only below cgroups that delegate the memory controller; a cgroup that
            # holds processes cannot delegate (EBUSY), so the runner must start in one that does.
            _delegate_memory(level)
    groups = MemoryCgroups(parent, version)
    probe = groups.create(f"probe-{os.getpid()}", 1 << 30)
    remove(probe)
    return groups


def detect() -> tuple[Optional[MemoryCgroups], str]:
    """The memory cgroups this process may create, or (None, why not)."""
    try:
        v1, v2 = _own_cgroups(Path("/proc/self/cgroup").read_text())
    except OSError as exc:
        return None, f"cannot read /proc/self/cgroup: {exc}"
    problems = []
    if v1 is not None:
        base = CGROUP_ROOT / "memory" / v1.lstrip("/")
        try:
            return _usable(base, 1), ""
        except OSError as exc:
            problems.append(f"cgroup v1 memory hierarchy at {base}: {exc}")
    if v2 is not None:
        mount = _v2_mount()
        if mount is None:
            problems.append("no cgroup2 file system is mounted")
        else:
            own = mount / v2.lstrip("/")
            try:
                available = (own / "cgroup.controllers").read_text().split()
            except OSError:
                available = []
            if "memory" not in available:
                problems.append(f"cgroup v2 at {own}: the memory controller is not available there")
            else:
                try:
                    return _usable(own, 2), ""
                except OSError as exc:
                    problems.append(f"cgroup v2 at {own}: {exc}")
    if not problems:
        problems.append("this process is in no memory cgroup")
    return None, "; ".join(problems)
