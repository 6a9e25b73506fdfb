"""Coarse cache: two-stage trials that share their coarse phase train it once.

In two-stage training the coarse network is trained first and then frozen, and the refiner starts as
the identity, so everything the coarse phase produces (its weights and its per-epoch metrics) depends
only on the *coarse part* of the trial config: the data (a fingerprint of the files), image size and
augmentation, the coarse architecture, encoder and its weights, the loss, optimiser, batch size, coarse
epochs, seed and device type. ``coarse_key`` hashes exactly that; refiner settings, refine epochs and
tracking do not enter it.

An entry is one file ``<key>.pt`` in the cache folder (a search puts it at ``<storage>/coarse_cache``)
holding the coarse weights after the coarse phase, the weights of its best epoch, the GradScaler's
state and the phase's per-epoch metric rows, so a trial that reuses it still reports every coarse epoch.

Several trials in several processes (or nodes sharing a file system with working ``flock``) may ask for
the same key at once: ``CoarseCache.claim`` takes an exclusive lock on ``<key>.lock``; the first trains
and stores, the others wait on the lock and then read the entry. Entries are written to a temporary
file and renamed into place (``os.replace``), so a reader never sees a half-written one; an entry that
cannot be read is deleted with a warning and trained again.

Pure of Ray and MLflow: ``trainables`` uses it, anything can.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spntune import __version__
from spntune.config import TrialConfig
from spntune.data.cache import data_fingerprint
from spntune.filelock import held
from spntune.models.coarse import cpu_bf16_native

__all__ = [
    "CACHED_MARK",
    "CACHE_FORMAT",
    "CoarseCache",
    "CoarseClaim",
    "CoarseEntry",
    "coarse_key",
    "coarse_key_fields",
    "data_fingerprint",
    "key_of",
    "replay_row",
]

log = logging.getLogger("spntune.coarse_cache")

#: Bumped when an entry's layout or what the key covers changes: old entries are then simply not found.
CACHE_FORMAT = 1
#: Metric set to 1 on the epochs a trial took from the cache instead of training them.
CACHED_MARK = "coarse_cached"

#: ``train.*`` settings that do not affect the coarse phase (everything else in ``train`` does).
_NOT_COARSE_TRAIN = {"stage", "epochs", "refine_epochs", "coarse_loss_weight", "viz_samples", "final_eval",
                     "coarse_cache", "coarse_cache_dir", "device", "amp", "cpu_bf16", "channels_last",
                     "memory_limit_gb"}  # fmt: skip


def coarse_key_fields(cfg: TrialConfig, fingerprint: str, device_type: str,
                      reading: Mapping[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """What the coarse phase depends on, as a JSON-able dict (the key is its hash). ``reading``: how the
    trial actually reads its training images (``trainables``: from the image cache or the files, and the
    resolved number of loader workers, which seeds augmentation), rather than the settings asking for it."""
    train = {k: v for k, v in cfg.train.model_dump(mode="json").items() if k not in _NOT_COARSE_TRAIN}
    amp = cfg.train.uses_autocast(device_type, cpu_bf16_native())  # what the trial actually uses
    return {
        "format": CACHE_FORMAT,
        "spntune": __version__,
        "torch": str(torch.__version__),
        "device": device_type,
        "amp": amp,
        "channels_last": cfg.train.uses_channels_last(device_type),  # as amp: what the trial actually uses
        "data": cfg.data.model_dump(mode="json", exclude={"cache", "cache_dir", "num_workers"}),
        "reading": dict(reading or {}),
        "data_files": fingerprint,
        "model": cfg.model.model_dump(mode="json"),
        "optim": cfg.optim.model_dump(mode="json"),
        "train": train,
    }


def coarse_key(cfg: TrialConfig, fingerprint: str, device_type: str, reading: Mapping[str, Any] | None = None) -> str:
    """Content address of a trial's coarse phase: sha256 of ``coarse_key_fields`` (64 hex digits)."""
    return key_of(coarse_key_fields(cfg, fingerprint, device_type, reading))


def key_of(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


@dataclass
class CoarseEntry:
    """One trained coarse phase.

    Attributes:
        rows: per-epoch metrics of the coarse phase as the training trial reported them.
        coarse_state: the coarse network's ``state_dict`` after the last coarse epoch (on the CPU).
        best_epoch: 1-based epoch of the best coarse mIoU (the first, on ties).
        best_state: the coarse ``state_dict`` of ``best_epoch``; None when that is the last epoch.
        scaler_state: the GradScaler's state after the phase (matters with AMP on CUDA).
        fields: what the key was computed from (for people reading the cache).
    """

    rows: list[dict[str, Any]]
    coarse_state: dict[str, Tensor]
    best_epoch: int
    best_state: dict[str, Tensor] | None = None
    scaler_state: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)

    def weights_of(self, epoch: int) -> dict[str, Tensor]:
        """Coarse weights after ``epoch`` (1-based): the best epoch's or the last one's."""
        if epoch == self.best_epoch and self.best_state is not None:
            return self.best_state
        return self.coarse_state


def replay_row(row: Mapping[str, Any], steps: int) -> tuple[dict[str, Any], list[float]]:
    """A cached coarse-phase row as *this* trial reports it, and its per-step mIoU.

    In the coarse phase the refiner is still the identity, so every refined metric equals its coarse
    twin and each of this trial's ``steps`` (T + 1) per-step mIoUs is the coarse mIoU; the refined
    numbers of the trial that trained the entry (another refiner, other T) are not carried over.
    """
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key.startswith("refined_miou_t"):
            continue
        if key.startswith("refined_") and f"coarse_{key.removeprefix('refined_')}" in row:
            value = row[f"coarse_{key.removeprefix('refined_')}"]
        out[key] = value
    miou = float(row["coarse_miou"])
    out |= {"refined_miou_gain": 0.0, **{f"refined_miou_t{t}": miou for t in range(steps)}, CACHED_MARK: 1}
    return out, [miou] * steps


class CoarseCache:
    """A folder of coarse-phase entries, one file per key.

    Args:
        root: the folder (created on first use). On a cluster it must be one folder every node sees
            at the same path, on a file system whose ``flock`` works across nodes.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def entry_path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def load(self, key: str) -> CoarseEntry | None:
        """The entry for ``key``, or None if there is none. An unreadable entry (truncated, not ours,
        another key's) is deleted with a warning, so it is trained again; call with the key's lock held."""
        path = self.entry_path(key)
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or state.get("format") != CACHE_FORMAT or state.get("key") != key:
                raise ValueError("not an entry of this key and cache format")
            return CoarseEntry(
                rows=list(state["rows"]), coarse_state=dict(state["coarse_state"]), best_epoch=int(state["best_epoch"]),
                best_state=state["best_state"], scaler_state=dict(state["scaler_state"]), fields=dict(state["fields"]),
            )  # fmt: skip
        except Exception as exc:  # a corrupt entry costs one retraining, never a failed trial
            self.discard(key, f"unreadable ({(str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]})")
            return None

    def discard(self, key: str, reason: str) -> None:
        """Delete ``key``'s entry with a warning saying why (call with the key's lock held)."""
        path = self.entry_path(key)
        warnings.warn(f"coarse cache: entry {path} is {reason}; deleting it and training the coarse network again",
                      RuntimeWarning, stacklevel=3)  # fmt: skip
        path.unlink(missing_ok=True)

    def store(self, key: str, entry: CoarseEntry) -> Path:
        """Write ``entry`` atomically: to a temporary file in the same folder, then renamed into place."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.entry_path(key)
        state = {"format": CACHE_FORMAT, "key": key, "rows": entry.rows, "coarse_state": entry.coarse_state,
                 "best_epoch": entry.best_epoch, "best_state": entry.best_state, "scaler_state": entry.scaler_state,
                 "fields": entry.fields}  # fmt: skip
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(state, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        # For people browsing the cache: what each entry was trained from.
        (self.root / f"{key}.json").write_text(json.dumps(entry.fields, indent=1, sort_keys=True))
        return path

    @contextmanager
    def claim(self, fields: Mapping[str, Any]) -> Iterator[CoarseClaim]:
        """Hold the lock of the key of ``fields`` (``coarse_key_fields``): the claim's ``entry`` is the
        stored one (a hit), or None and this process trains the coarse phase and calls ``claim.store``.
        Others asking for the key meanwhile wait."""
        key = key_of(fields)
        with held(self.root / f"{key}.lock", log, f"coarse cache: another trial is training coarse network {key[:12]}"):
            yield CoarseClaim(self, key, dict(fields), self.load(key))


@dataclass
class CoarseClaim:
    """A held lock on one key: ``entry`` (None on a miss) and ``store`` for the trial that trains."""

    cache: CoarseCache
    key: str
    fields: dict[str, Any]
    entry: CoarseEntry | None

    def store(self, entry: CoarseEntry) -> Path:
        """Store ``entry`` (its ``fields`` set to the key's) as the key's entry."""
        entry.fields = self.fields
        return self.cache.store(self.key, entry)
