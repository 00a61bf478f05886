"""Experiment tracking (`training.reportTo`, off by default): TensorBoard event files of every
training stage, written by transformers' TensorBoardCallback through tensorboardX (no TensorFlow,
no tensorboard server in the image) into `<work>/run/tracking/tensorboard/<stage>/`, uploaded to
`<run>/tracking/tensorboard/<stage>/` with each checkpoint (so a live run can be watched with
`tensorboard --logdir s3://...`) and at the end, where `publish` lists them in the manifest.

A retry downloads the earlier attempts' event files first (`resume_tracking`), so the published
folder holds the whole run; the steps an attempt trained past its last checkpoint appear twice
(TensorBoard draws both).

MLflow is not offered: its tracking server or file store is not part of the trainer image, and
the API refuses any other `reportTo` value.
"""

from __future__ import annotations

from pathlib import Path

from ragtune.storage import StorageError, join

from . import distributed
from .run import RunContext

TRACKING_DIR = "tracking/tensorboard"


def enabled(ctx: RunContext) -> bool:
    return "tensorboard" in ctx.spec.training.report_to


def local_root(ctx: RunContext) -> Path:
    """Where the event files are written: inside the folder `publish` uploads (`<work>/run`)."""
    return ctx.work_dir / "run" / TRACKING_DIR


def resume_tracking(ctx: RunContext) -> None:
    """Fetch the event files earlier attempts uploaded (none: nothing to do)."""
    if not enabled(ctx) or not distributed.world().main:
        return
    try:
        ctx.storage.download_prefix(join(ctx.run_uri, TRACKING_DIR), local_root(ctx))
    except StorageError as err:
        if err.reason != "S3ObjectNotFound":
            raise


def callbacks(ctx: RunContext, stage: str) -> list:
    """TensorBoard logging of `stage` and its upload on every checkpoint save; rank 0 only."""
    if not enabled(ctx) or not distributed.world().main:
        return []
    from tensorboardX import SummaryWriter
    from transformers import TrainerCallback
    from transformers.integrations import TensorBoardCallback

    folder = local_root(ctx) / stage
    folder.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(logdir=str(folder))

    class UploadTracking(TrainerCallback):
        """Flush and upload the event files with each checkpoint and at the end of the stage."""

        def on_save(self, args, st, control, **kw):
            upload(ctx, writer)

        def on_train_end(self, args, st, control, **kw):
            upload(ctx, writer)

    return [TensorBoardCallback(tb_writer=writer), UploadTracking()]


def upload(ctx: RunContext, writer=None) -> list[str]:
    if writer is not None and getattr(writer, "file_writer", None) is not None:
        writer.flush()
    root = local_root(ctx)
    return ctx.storage.upload_dir(root, join(ctx.run_uri, TRACKING_DIR)) if root.is_dir() else []


def files(ctx: RunContext) -> list[Path]:
    """The event files to publish (listed in the manifest)."""
    root = local_root(ctx)
    return sorted(p for p in root.rglob("*") if p.is_file()) if enabled(ctx) and root.is_dir() else []
