"""Terminal output of `spntune train`: a progress bar, one line per epoch, the final table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from spntune.cli import format_metric as _fmt
from spntune.trainables import Reporter

__all__ = ["ConsoleReporter", "print_results"]


class ConsoleReporter(Reporter):
    """Rich progress bar over batches plus one line per epoch."""

    wants_checkpoints = False

    def __init__(self, console: Any, total_epochs: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self.total_epochs = total_epochs
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), console=console, transient=True,
        )  # fmt: skip
        self.task: Any = None

    def progress(self, stage: str, epoch: int, batch: int, num_batches: int, loss: float) -> None:
        desc = f"epoch {epoch}/{self.total_epochs} \\[{stage}]"
        if self.task is None or batch == 1:
            if self.task is not None:
                self.bar.remove_task(self.task)
            else:
                self.bar.start()
            self.task = self.bar.add_task(desc, total=num_batches, loss=loss)
        self.bar.update(self.task, completed=batch, loss=loss)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self.console.print(
            f"epoch {metrics['epoch']:>3} \\[{metrics['phase']}] loss {metrics['train_loss']:.4f}  "
            f"mIoU coarse {_fmt(metrics['coarse_miou'])} refined {_fmt(metrics['refined_miou'])}  "
            f"bIoU coarse {_fmt(metrics['coarse_boundary_iou'])} refined {_fmt(metrics['refined_boundary_iou'])}  "
            f"{metrics['epoch_seconds']:.1f}s"
        )

    def close(self) -> None:
        if self.task is not None:
            self.bar.stop()


def print_results(console: Any, metrics: dict[str, Any], class_names: list[str]) -> None:
    """Final table: coarse vs refined, per class, and mIoU after each propagation step."""
    from rich.table import Table

    from spntune.trainables import _sanitize

    table = Table(title=f"final metrics (epoch {metrics['epoch']})")
    table.add_column("metric")
    table.add_column("coarse", justify="right")
    table.add_column("refined", justify="right")
    table.add_column("gain", justify="right")
    rows = [("mIoU", "miou"), ("boundary IoU", "boundary_iou"), ("pixel acc", "pixel_acc"), ("mean Dice", "mean_dice")]
    rows += [(f"IoU {n}", f"iou_{_sanitize(n)}") for n in class_names]
    for label, key in rows:
        c, r = metrics[f"coarse_{key}"], metrics[f"refined_{key}"]
        gain = r - c if not (math.isnan(c) or math.isnan(r)) else math.nan
        table.add_row(label, _fmt(c), _fmt(r), ("+" if gain > 0 else "") + _fmt(gain))
    console.print(table)
    steps = [
        metrics[k] for k in sorted((k for k in metrics if k.startswith("refined_miou_t")), key=lambda k: int(k[14:]))
    ]
    if len(steps) > 1:
        console.print("refined mIoU by propagation step: " + "  ".join(f"t{t}={_fmt(v)}" for t, v in enumerate(steps)))
    console.print(f"{metrics['train_images_per_s']:.1f} train images/s, {metrics['epoch_seconds']:.1f} s/epoch")
