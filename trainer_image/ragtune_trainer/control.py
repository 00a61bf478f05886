"""Training control of the SFT stage: the best checkpoint by the validation loss, early stopping,
and what a resumed run needs of both.

With a validation split (`dataset.validationSplit`) every validation point (the Trainer's eval
loop on the validation rows, every `training.evalIntervalSteps` and at the last step) is compared
with the best so far. A new best forces a checkpoint at that step, and the adapter file the
Trainer wrote into it (`adapter_model.safetensors`, gathered the way the Trainer saves under
DDP/FSDP) is kept as the best adapter. `training.earlyStopping` counts the points in a row that
did not improve on the best by more than `minDelta`; `patience` of them stop the run, with a
checkpoint at that step.

Every checkpoint carries the control state (`CONTROL_JSON`: best step and loss, the points since
the last improvement, whether the run stopped early) and a copy of the best adapter
(`BEST_ADAPTER`), so a resumed run knows the best so far whatever checkpoints were pruned, and a
run that had stopped early and failed later goes straight to evaluation. After training, the
model gets the best adapter's weights back (`restore_best`): that is what is evaluated and
published, and what a preference stage continues from.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from ragtune.api.finetunejob import FineTuneJobSpec

from . import distributed

CONTROL_JSON = "ragtune-control.json"
BEST_ADAPTER = "best-adapter.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"


@dataclass
class ControlState:
    """What the best-checkpoint tracking and early stopping know; saved in every checkpoint."""

    best_step: Optional[int] = None
    best_eval_loss: Optional[float] = None
    points_without_improvement: int = 0
    stopped_early: bool = False
    points: int = 0
    """Validation points seen."""

    @property
    def stop_reason(self) -> str:
        return "earlyStopping" if self.stopped_early else "maxSteps"

    @classmethod
    def load(cls, checkpoint_dir: Optional[Path]) -> "ControlState":
        path = Path(checkpoint_dir) / CONTROL_JSON if checkpoint_dir else None
        if path is None or not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        return cls(**{k: data[k] for k in asdict(cls()) if k in data})

    def dump(self) -> str:
        return json.dumps(asdict(self), indent=1)


def make_control_callback(spec: FineTuneJobSpec, control_state: ControlState, best_dir: Path):
    """The callback that tracks the best validation loss and stops early; it must come before
    the callback that uploads checkpoints (it writes into the checkpoint folder in `on_save`)."""
    from transformers import TrainerCallback

    stopping = spec.training.early_stopping
    best_dir = Path(best_dir)

    class BestCheckpointCallback(TrainerCallback):
        """Best checkpoint by `eval_loss`; early stopping by `training.earlyStopping`."""

        def on_evaluate(self, args, st, control, metrics=None, **kw):
            value = (metrics or {}).get("eval_loss")
            if value is None:
                return
            cs = control_state
            cs.points += 1
            finite = math.isfinite(value)
            best = cs.best_eval_loss
            if finite and (best is None or value < best):
                cs.best_step, cs.best_eval_loss = st.global_step, float(value)
                control.should_save = True  # the best adapter is taken from this step's checkpoint
            if stopping is None:
                return
            if finite and (best is None or value < best - stopping.min_delta):
                cs.points_without_improvement = 0
            else:
                cs.points_without_improvement += 1
            if cs.points_without_improvement >= stopping.patience and st.global_step < st.max_steps:
                cs.stopped_early = True
                control.should_training_stop = True
                control.should_save = True  # a retry after a later failure finds the stop in the checkpoint

        def on_save(self, args, st, control, **kw):
            if not distributed.world().main:  # rank 0 holds the adapter file (the Trainer saves there)
                return
            folder = Path(args.output_dir) / f"checkpoint-{st.global_step}"
            best_dir.mkdir(parents=True, exist_ok=True)
            if control_state.best_step == st.global_step and (folder / ADAPTER_FILE).is_file():
                shutil.copyfile(folder / ADAPTER_FILE, best_dir / BEST_ADAPTER)
            if (best_dir / BEST_ADAPTER).is_file():
                shutil.copyfile(best_dir / BEST_ADAPTER, folder / BEST_ADAPTER)
            (folder / CONTROL_JSON).write_text(control_state.dump())

    return BestCheckpointCallback()


def resume_best(resume_dir: Optional[Path], best_dir: Path) -> ControlState:
    """The control state of a downloaded checkpoint (empty without one), its best adapter copied
    to `best_dir`."""
    state = ControlState.load(resume_dir)
    if resume_dir and (Path(resume_dir) / BEST_ADAPTER).is_file():
        Path(best_dir).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(resume_dir) / BEST_ADAPTER, Path(best_dir) / BEST_ADAPTER)
    return state


def restore_best(model, best_file: Path) -> None:
    """Load the best adapter's weights into `model` (the run's PeftModel, unwrapped)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from .sft import unwrap

    inner = unwrap(model)
    weights = load_file(str(best_file), device=str(inner.device))
    loaded = set_peft_model_state_dict(inner, weights)
    if loaded.unexpected_keys:
        raise ValueError(f"{best_file.name}: adapter weights that do not fit this model's adapter: "
                         f"{', '.join(loaded.unexpected_keys[:5])}")
