"""The one way out of a trial: the ``Reporter`` protocol and its composition.

A trial (``trainables.train_segmentation``) tells the world everything through one reporter:
``start`` once, ``progress`` after each batch, ``report`` after each epoch, ``end`` once with the
trial's status. MLflow logging (``tracking.MLflowReporter``), Ray Tune (``tune.RayReporter``) and the
terminal (``console.ConsoleReporter``) are each a reporter; ``Reporters`` calls several in a fixed
order. The trial composes ``Reporters(MLflowReporter, <the caller's reporter>)``: MLflow first,
because Ray stops a trial by raising inside its report call and the epoch must be logged by then.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spntune.status import TrialStatus

if TYPE_CHECKING:
    from spntune.config import TrialConfig

__all__ = ["EpochReport", "Reporter", "Reporters", "TrialStopped"]


class TrialStopped(SystemExit):
    """A reporter stops the trial on purpose (a scheduler's decision, an interrupt): not an error.

    A ``SystemExit`` so that Ray, which stops a trial with ``sys.exit`` inside its report call,
    still sees the exit it expects.
    """


@dataclass
class EpochReport:
    """What a trial reports after each epoch.

    Attributes:
        metrics: flat scalar metrics (plus ``phase``) of this epoch.
        is_best: the search metric (refined mIoU) is the best so far.
        steps_miou: refined mIoU after every propagation step t = 0..T at this epoch.
        write_checkpoint: ``(folder, with_optimiser) -> checkpoint file``; also writes ``history.json``.
            ``with_optimiser=False`` writes weights only (for predict).
        write_pictures: ``(folder, gradcam) -> files``: mask panels, h^0..h^T strips and, with
            ``gradcam``, Grad-CAM overlays of the first validation images (none if the trial draws none).
    """

    metrics: dict[str, Any]
    is_best: bool
    steps_miou: list[float]
    write_checkpoint: Callable[[Path, bool], Path]
    write_pictures: Callable[[Path, bool], list[Path]]


class Reporter:
    """Receives what a trial tells the world. Subclass and override what you need; the base does nothing."""

    def trial_id(self) -> str | None:
        """The scheduler's id for this trial (Ray's trial id), or None in-process."""
        return None

    def resume_checkpoint(self) -> Path | None:
        """A checkpoint folder to resume from (Ray Tune's restored checkpoint), or None."""
        return None

    def start(self, cfg: TrialConfig, trial_id: str | None) -> None:
        """Called once, before data and model are built (so their failures are reported too)."""

    def progress(self, stage: str, epoch: int, batch: int, num_batches: int, loss: float) -> None:
        """Called after each training batch."""

    def report(self, epoch: EpochReport) -> None:
        """Called once per epoch. May raise ``TrialStopped`` to stop the trial."""

    def end(self, status: TrialStatus, reason: str = "") -> None:
        """Called once when the trial ends: completed, stopped or error (with the reason)."""


class Reporters(Reporter):
    """Several reporters, called in the order given; ids and resume points come from the first that has one."""

    def __init__(self, *reporters: Reporter) -> None:
        self.reporters = reporters

    def trial_id(self) -> str | None:
        return next((i for r in self.reporters if (i := r.trial_id()) is not None), None)

    def resume_checkpoint(self) -> Path | None:
        return next((p for r in self.reporters if (p := r.resume_checkpoint()) is not None), None)

    def start(self, cfg: TrialConfig, trial_id: str | None) -> None:
        for r in self.reporters:
            r.start(cfg, trial_id)

    def progress(self, stage: str, epoch: int, batch: int, num_batches: int, loss: float) -> None:
        for r in self.reporters:
            r.progress(stage, epoch, batch, num_batches, loss)

    def report(self, epoch: EpochReport) -> None:
        for r in self.reporters:
            r.report(epoch)

    def end(self, status: TrialStatus, reason: str = "") -> None:
        for r in self.reporters:
            r.end(status, reason)
