"""The benches' stdout contract: exactly one JSON document on stdout, every log line on stderr.

`run(main)` calls `main()` with file descriptor 1 pointed at stderr, so nothing a bench does
while measuring can reach stdout: not a `print`, not the local platform's start-up lines, not
a C library or a child process that inherits fd 1. Then it writes the document `main` returned
to the real stdout. Every bench ends with `sys.exit(benchio.run(main))`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any, Callable


def run(main: Callable[[], Any]) -> int:
    """`main()` returns the JSON document, or `(document, exit_code)`."""
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        result = main()
    finally:
        sys.stdout.flush()
        os.dup2(real_stdout, 1)
        os.close(real_stdout)
    doc, code = result if isinstance(result, tuple) else (result, 0)
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    sys.stdout.flush()
    return code


def stop_session(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM the session a bench started (`start_new_session=True`), SIGKILL it after `grace` s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
