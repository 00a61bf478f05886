"""What a run is and how it ends: the run context (where it reads and writes, who it reports to),
the SIGTERM guard, and the failure classification (reason -> exit code, allocation failures ->
OutOfMemory) that the CLI turns into the termination message."""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from ragtune.api import pods
from ragtune.api.finetunejob import FineTuneJobSpec, TrainingProgress
from ragtune.clock import utc_now_iso
from ragtune.storage import Storage


class TrainerFailure(Exception):
    """A run that cannot succeed; `reason` is the CamelCase reason of the termination message."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


class Preempted(TrainerFailure):
    def __init__(self, message: str = "SIGTERM received"):
        super().__init__("Preempted", message)


ProgressFn = Callable[[TrainingProgress], None]


@dataclass
class RunContext:
    """Where a run reads and writes, and who it reports to."""

    spec: FineTuneJobSpec
    run_id: str
    run_uri: str
    """Run prefix (`run_prefix(...)`), ends with `/`."""
    job: dict[str, Any] = field(default_factory=dict)
    """`{namespace, name, uid, generation}` of the FineTuneJob."""
    work_dir: Optional[Path] = None
    progress: Optional[ProgressFn] = None
    storage: Optional[Storage] = None
    image: Optional[str] = None

    def __post_init__(self):
        self.storage = self.storage or Storage(self.spec.s3)
        self._own_work_dir = self.work_dir is None
        self.work_dir = Path(self.work_dir or tempfile.mkdtemp(prefix="ragtune-run-"))

    def cleanup(self) -> None:
        """Remove the scratch folder when this context created it (everything worth keeping is uploaded)."""
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def report(self, stage: str, **fields) -> None:
        if self.progress:
            self.progress(TrainingProgress(stage=stage, updated_at=utc_now_iso(), **fields))


@dataclass
class RunState:
    """What the SIGTERM handler and the training callbacks share."""

    preempt_requested: bool = False
    training: bool = False
    start_step: int = 0
    last_checkpoint: Optional[int] = None
    trainer: Any = None
    answer_tokens: int = 0
    """Loss-bearing (answer) tokens the SFT stage trained on in this attempt, over all ranks."""
    control: Any = None
    """`control.ControlState` of the SFT stage: best checkpoint, early stopping (restored on resume)."""


@contextmanager
def sigterm_guard(state: RunState) -> Iterator[None]:
    """SIGTERM during training asks for a checkpoint and a stop (the callbacks do it); outside
    training there is nothing to save, so it stops the run right there."""
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        state.preempt_requested = True
        if not state.training:
            raise Preempted("SIGTERM received outside training")

    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:  # signal handlers can only be set there (e.g. not when a test harness runs us in a thread)
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


# --- How a run ends --------------------------------------------------------------------


def exit_code(result: pods.TrainerResult) -> int:
    if result.outcome == "Succeeded":
        return 0
    return pods.EXIT_PERMANENT if result.reason in pods.PERMANENT_REASONS else pods.EXIT_RETRYABLE


def failed(reason: str, message: str, run_id: Optional[str] = None) -> pods.TrainerResult:
    return pods.TrainerResult(outcome="Failed", reason=reason, message=" ".join(message.split())[:1000],
                              run_id=run_id)


def from_failure(exc: TrainerFailure, run_id: Optional[str]) -> pods.TrainerResult:
    """The full text (e.g. every bad dataset row) goes to the log; the result keeps the headline."""
    print(f"ragtune train: {exc.reason}: {exc.message}", file=sys.stderr)
    lines = exc.message.strip().splitlines()
    headline = exc.message
    if exc.reason == "InvalidDataset" and len(lines) > 1:
        headline = f"{lines[0]} ... {lines[-1]}"
    return failed(exc.reason, headline, run_id)


def out_of_memory(exc: BaseException) -> Optional[str]:
    """What ran out, if `exc` is an allocation failure (GPU: torch.OutOfMemoryError; host: MemoryError
    or the CPU allocator's RuntimeError "can't allocate memory"); None otherwise."""
    if isinstance(exc, MemoryError):
        return "host memory"
    if not isinstance(exc, RuntimeError):
        return None
    text = str(exc).lower()
    # torch raises OutOfMemoryError for the CPU allocator too: its text tells which memory it was.
    if "can't allocate memory" in text or "cannot allocate memory" in text or "cpuallocator" in text:
        return "host memory"
    torch = sys.modules.get("torch")  # only a run that imported torch can raise its errors
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return "GPU memory"
    if "out of memory" in text:
        return "GPU memory" if "cuda" in text or "gpu" in text else "memory"
    return None


def oom_failure(what: str, detail: str, run_id: Optional[str]) -> pods.TrainerResult:
    message = f"out of {what} ({headline(detail)}); {pods.OOM_REMEDIES}"
    print(f"ragtune train: OutOfMemory: {message}", file=sys.stderr, flush=True)
    return failed("OutOfMemory", message, run_id)


def headline(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
