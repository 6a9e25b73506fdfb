"""Checks of what ``spntune predict`` and ``spntune evaluate`` are given, light enough to run before
torch and the model load (numpy, PIL and pydantic only): a bad image, output path, ``--set`` key or
split is refused at once, before anything is written.

Also the names ``predict`` writes (``mask_name``, ``overlay_name``, ``CLASSES_FILE``), so the checks
and the writer agree on them.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import zipfile
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from spntune.config import DataConfig
from spntune.data.listing import FILE_DATASETS
from spntune.errors import ConfigError, DatasetError
from spntune.images import read_rgb

__all__ = [
    "CHECKPOINT_FILE",
    "CLASSES_FILE",
    "SPLITS",
    "available_splits",
    "check_checkpoint_path",
    "check_data_sets",
    "check_evaluate_split",
    "check_json_path",
    "check_out_dir",
    "check_predict_images",
    "check_predict_inputs",
    "check_split",
    "checkpoint_config",
    "mask_name",
    "overlay_name",
]

CHECKPOINT_FILE = "checkpoint.pt"  # a trial's checkpoint in its folder (trainables imports it from here)
CLASSES_FILE = "classes.txt"

#: Splits of the dataset without files: synthetic builds "train" and "val" (any other name would silently
#: be val). A file dataset's splits are what ``listing.FILE_DATASETS`` finds (pets: its two list files).
SPLITS: dict[str, tuple[str, ...]] = {"synthetic": ("train", "val")}


def mask_name(image: Path) -> str:
    return f"{image.stem}_mask.png"


def overlay_name(image: Path) -> str:
    return f"{image.stem}_overlay.png"


def check_checkpoint_path(checkpoint: str | Path) -> Path:
    """The checkpoint file ``checkpoint`` names: itself, or ``checkpoint.pt`` in a folder (what
    ``trainables.load_checkpoint`` loads).

    Raises:
        FileNotFoundError: nothing there.
    """
    path = Path(checkpoint)
    path = path / CHECKPOINT_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return path


_PLAIN_CLASSES: dict[tuple[str, str], Any] = {("collections", "OrderedDict"): OrderedDict}
_MAX_PICKLE_BYTES = 4 << 20  # a checkpoint's data.pkl holds names and numbers, the weights lie beside it: ~60 KB
#: The pickle opcodes a checkpoint's data.pkl may hold (torch's own use protocol 2: dicts, tuples, lists,
#: strings, numbers, GLOBAL + REDUCE for OrderedDict and the tensor rebuilders, BINPERSID for storages, one BUILD
#: for a state dict's metadata). Sets, bytearrays, buffers, INST / OBJ / NEWOBJ and extension codes are not.
_PLAIN_OPCODES = frozenset(
    "PROTO FRAME STOP MARK POP POP_MARK DUP NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 LONG LONG1 LONG4 FLOAT "
    "BINFLOAT STRING BINSTRING SHORT_BINSTRING UNICODE SHORT_BINUNICODE BINUNICODE BINUNICODE8 BINBYTES "
    "SHORT_BINBYTES BINBYTES8 EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_LIST LIST APPEND APPENDS EMPTY_DICT DICT "
    "SETITEM SETITEMS GLOBAL STACK_GLOBAL REDUCE BUILD BINPERSID PUT BINPUT LONG_BINPUT MEMOIZE GET BINGET "
    "LONG_BINGET".split()
)


def _plain_pickle(data: bytes) -> bool:
    """Whether ``data`` is a whole pickle of only ``_PLAIN_OPCODES`` whose memo indices count up from 0: read
    with ``pickletools.genops``, which builds nothing. The index bound matters: C pickle keeps its memo in an
    array as long as the largest index, so one PUT of index 2**26 in a 9-byte file took 1 GB."""
    puts = 0
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name not in _PLAIN_OPCODES:
                return False
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                if op.name != "MEMOIZE" and int(arg) > puts:
                    return False
                puts += 1
            elif op.name in ("GET", "BINGET", "LONG_BINGET") and int(arg) >= puts:
                return False
    except (ValueError, TypeError):  # not a whole pickle
        return False
    return True


class _PlainDataReader(pickle.Unpickler):
    """Reads a pickle's plain data; every class or function it names (torch's tensor rebuilders, or
    whatever a hostile file names) becomes a fresh placeholder that returns None, never imported or called;
    tensors' storages (persistent ids) are None too. Run only on what ``_plain_pickle`` passed."""

    def find_class(self, module: str, name: str) -> Any:
        return _PLAIN_CLASSES.get((module, name)) or (lambda *args, **kwargs: None)

    def persistent_load(self, pid: Any) -> None:
        return None


def checkpoint_config(path: Path) -> dict[str, Any] | None:
    """The trial config a checkpoint file holds (``trainables.save_checkpoint``'s ``"config"``), read
    without torch: the ``data.pkl`` of torch's zip format, if at most 4 MB and plain (``_plain_pickle``),
    through ``_PlainDataReader``, the weights left out. None where the file holds no such thing that way
    (another format, or anything odd: the real loader, which runs next, names what is wrong)."""
    try:
        with zipfile.ZipFile(path) as archive:
            entry = next((i for i in archive.infolist() if i.filename.rsplit("/", 1)[-1] == "data.pkl"), None)
            if entry is None or entry.file_size > _MAX_PICKLE_BYTES:
                return None
            data = archive.read(entry)
        if not _plain_pickle(data):
            return None
        state = _PlainDataReader(io.BytesIO(data)).load()
    except Exception:  # anything unreadable here is for the real loader to name
        return None
    config = state.get("config") if isinstance(state, dict) else None
    return config if isinstance(config, dict) else None


def check_predict_images(images: Iterable[str | Path]) -> list[Path]:
    """Every input is an image file that decodes, and no two would write the same mask.

    Each image is decoded here and again when predicted: decoding them all first is what lets a
    corrupt one be refused before the first mask is written.

    Raises:
        DatasetError: naming a folder, missing files, two inputs with one stem, or a file that does
            not decode (``images.read_rgb``).
    """
    paths = [Path(p) for p in images]
    folders = [p for p in paths if p.is_dir()]
    if folders:
        raise DatasetError(
            f"{folders[0]} is a folder: predict takes image files (e.g. {folders[0] / '*.png'})"
            + (f"; {len(folders) - 1} more inputs are folders" if len(folders) > 1 else "")
        )
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DatasetError(f"image not found: {', '.join(missing)}")
    by_name: dict[str, Path] = {}
    for path in paths:
        first = by_name.setdefault(mask_name(path), path)
        if first is not path:
            same = first.resolve() == path.resolve()
            raise DatasetError(
                f"image {path} is given twice: give each image once"
                if same
                else f"images {first} and {path} would both be written as {mask_name(path)} and "
                f"{overlay_name(path)}: predict them into separate --out folders, or rename one"
            )
    for path in paths:
        read_rgb(path)
    return paths


def check_predict_inputs(images: Iterable[str | Path], out: str | Path) -> list[Path]:
    """``check_predict_images``, then ``check_out_dir`` for the files predict writes, none of which may be
    one of the inputs (``predict a.png a_mask.png --out .`` would overwrite the second before reading it).
    Returns the images as paths."""
    paths = check_predict_images(images)
    names = [CLASSES_FILE, *(name for p in paths for name in (mask_name(p), overlay_name(p)))]
    check_out_dir(out, names)
    inputs = {p.resolve(): p for p in paths}
    clash = next((Path(out) / name for name in names if (Path(out) / name).resolve() in inputs), None)
    if clash is not None:
        raise ConfigError(
            f"--out {out}: predict would overwrite the input {inputs[clash.resolve()]} with its output {clash}"
        )
    return paths


def _first_existing(path: Path) -> Path:
    return next(p for p in (path, *path.parents) if p.exists())  # a relative path ends at '.'


def check_out_dir(out: str | Path, names: Iterable[str]) -> Path:
    """``out`` is, or can be made as, a writable folder in which ``names`` can be written as files.

    Raises:
        ConfigError: naming ``--out`` and what stands in the way.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: expected a folder for the masks (created if missing)")
    existing = _first_existing(out)
    if not existing.is_dir():
        raise ConfigError(f"--out {out}: {existing} is a file, so no folder can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {existing} is not writable (by this user)")
    if existing == out:
        for name in names:
            target = out / name
            if target.is_dir():
                raise ConfigError(f"--out {out}: {target} is a folder, where predict writes the file {name}")
            if target.exists() and not os.access(target, os.W_OK):
                raise ConfigError(f"--out {out}: {target} exists and is not writable (by this user)")
    return out


def check_json_path(path: str | Path) -> Path:
    """``path`` names a file that can be written in an existing folder.

    Raises:
        ConfigError: naming ``--json`` and what stands in the way.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--json {path} is a folder: expected the name of a file to write")
    parent = path.parent
    if not parent.is_dir():
        existing = _first_existing(parent)
        raise ConfigError(
            f"--json {path}: {existing} is a file, not a folder"
            if not existing.is_dir()
            else f"--json {path}: the folder {parent} does not exist"
        )
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"--json {path}: not writable (by this user)")
    return path


def check_data_sets(sets: dict[str, Any]) -> None:
    """``evaluate --set`` keys are ``data.<field>``: evaluate scores the checkpoint's own model.

    Raises:
        ConfigError: naming every other key.
    """
    fields = sorted(DataConfig.model_fields)
    other = [k for k in sets if not k.startswith("data.")]
    unknown = [k for k in sets if k.startswith("data.") and k.removeprefix("data.") not in fields]
    lines = [f"  {k}: not a data key; evaluate scores the checkpoint's own model, so only data.* keys apply"
             for k in other] + [f"  {k}: unknown data key" for k in unknown]  # fmt: skip
    if lines:
        valid = ", ".join(f"data.{f}" for f in fields)
        raise ConfigError("evaluate --set takes data keys only:\n" + "\n".join(lines) + f"\n  (valid: {valid})")


def available_splits(name: str, root: str | None) -> tuple[list[str], str] | None:
    """The splits a dataset has, and where they were found ("" for a fixed set); None where its files
    cannot tell (no root: the dataset's loader refuses that, naming what it expected)."""
    if name in SPLITS:
        return list(SPLITS[name]), ""
    spec = FILE_DATASETS.get(name)
    return spec.splits(Path(root or "")) if spec is not None else None


def check_evaluate_split(split: str, sets: dict[str, Any], saved: dict[str, Any] | None) -> None:
    """``evaluate --split``: ``split`` is one of the splits of the dataset evaluate would score, where that is
    known before the model loads: the data section of the checkpoint's config (``saved``, from
    ``checkpoint_config``) under the ``data.*`` of ``sets``, or ``sets`` alone where they name the dataset.
    Where these do not make a valid data config (a missing root, a value of the wrong type), nothing is
    checked here: evaluate builds the same config once the model is loaded, and refuses it naming the key.

    Raises:
        ConfigError: naming the split and the ones there are (``check_split``).
    """
    section = saved.get("data") if saved is not None else None
    if not isinstance(section, dict) and "data.name" not in sets:
        return  # the dataset is the checkpoint's, known once it loads
    fields = dict(section) if isinstance(section, dict) else {}
    fields |= {key.removeprefix("data."): value for key, value in sets.items() if key.startswith("data.")}
    try:
        data = DataConfig.model_validate(fields)
    except Exception:  # pydantic's ValidationError, or anything odd in a saved config: evaluate names it later
        return
    check_split(data.name, data.root, split)


def check_split(name: str, root: str | None, split: str) -> None:
    """``split`` is one of the dataset's splits, where they can be known.

    Raises:
        ConfigError: naming the split and the ones there are.
    """
    found = available_splits(name, root)
    if found is not None and split not in found[0]:
        splits, source = found
        there = ", ".join(splits) if splits else "none"
        raise ConfigError(
            f"split {split!r}: dataset {name} has no such split; its splits: {there}"
            + (f" ({source})" if source else "")
        )
