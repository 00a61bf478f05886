"""Container entry: join the memory cgroup, new mount and UTS namespaces (the pod's hostname), bind
mounts, then exec.
Run as `python -S nsexec.py` with the exec spec (JSON) on stdin.

Stdlib only and no site imports, so starting a container costs one small interpreter.
"""

import ctypes
import json
import os
import sys

CLONE_NEWNS, CLONE_NEWUTS = 0x00020000, 0x04000000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, flags):
    src = source.encode() if source else None
    _check(_libc.mount(src, target.encode(), None, flags, None), f"mount {source} -> {target}")


def main() -> None:
    spec = json.load(sys.stdin)  # from the runner, over a pipe (it holds resolved secrets)
    devnull = os.open(os.devnull, os.O_RDONLY)  # the container's stdin, as with a runtime's default
    os.dup2(devnull, 0)
    os.close(devnull)
    if spec.get("cgroup"):
        # Before anything else: every process the container starts inherits the limit.
        with open(os.path.join(spec["cgroup"], "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUTS), "unshare(CLONE_NEWNS | CLONE_NEWUTS)")
    hostname = spec["hostname"].encode()  # what gethostname() answers in the pod, as in a container
    _check(_libc.sethostname(hostname, len(hostname)), "sethostname")
    _mount(None, "/", MS_REC | MS_PRIVATE)  # nothing we mount leaks back to the host
    # Pin every source first: a volume mounted over e.g. /tmp must not hide later sources under it.
    sources = [(os.open(m["source"], os.O_PATH | os.O_CLOEXEC), os.path.isdir(m["source"]), m)
               for m in spec["mounts"]]
    # The checkout and venv the process runs from, pinned before any volume can cover them.
    kept = [(os.open(path, os.O_PATH | os.O_CLOEXEC), path) for path in spec.get("keep", [])]
    for fd, is_dir, m in sources:
        dst = m["target"]
        if is_dir:
            os.makedirs(dst, exist_ok=True)
        elif not os.path.exists(dst):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            open(dst, "a").close()
        _mount(f"/proc/self/fd/{fd}", dst, MS_BIND | MS_REC)
        if m.get("readOnly"):
            _mount(None, dst, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_REC)
        os.close(fd)
    for fd, path in kept:
        if any(path.startswith(m["target"].rstrip("/") + "/") for m in spec["mounts"]):  # covered: bind it back
            os.makedirs(path, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, MS_BIND | MS_REC)
        os.close(fd)
    os.chdir(spec["cwd"])
    argv = spec["argv"]
    try:
        os.execvpe(argv[0], argv, spec["env"])
    except OSError as exc:
        print(f"ragtune-local: cannot run {argv[0]!r}: {exc.strerror}", file=sys.stderr)
        sys.exit(127 if isinstance(exc, FileNotFoundError) else 126)


if __name__ == "__main__":
    try:
        main()
    except OSError as exc:
        print(f"ragtune-local: container setup failed: {exc}", file=sys.stderr)
        sys.exit(128)
