"""Tiny datasets in the original layouts, written to a tmp dir; helpers shared by test files."""

import os
import signal
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from spntune.data.voc import voc_palette


def write_jpg(path: Path, h=40, w=50, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def write_png(path: Path, values: np.ndarray, palette: bool = False):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(values.astype(np.uint8), mode="P" if palette else "L")
    if palette:
        img.putpalette(voc_palette())
    img.save(path)


def make_pets(root: Path) -> Path:
    trimap = np.full((40, 50), 2, np.uint8)
    trimap[10:30, 10:40] = 1
    trimap[10, 10:40] = 3
    for i, name in enumerate(["Abyssinian_1", "Abyssinian_2", "beagle_1"]):
        write_jpg(root / "images" / f"{name}.jpg", seed=i)
        write_png(root / "annotations" / "trimaps" / f"{name}.png", trimap)
    (root / "annotations" / "trainval.txt").write_text("Abyssinian_1 1 1 1\nbeagle_1 2 2 1\n")
    (root / "annotations" / "test.txt").write_text("Abyssinian_2 1 1 1\n")
    return root


def make_voc(root: Path) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    mask = np.zeros((40, 50), np.uint8)
    mask[5:20, 5:20] = 15
    mask[5:20, 20] = 255
    for i, name in enumerate(["2007_000001", "2007_000002"]):
        write_jpg(voc / "JPEGImages" / f"{name}.jpg", seed=i)
        write_png(voc / "SegmentationClass" / f"{name}.png", mask, palette=True)
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("2007_000001\n")
    (sets / "val.txt").write_text("2007_000002\n")
    return root / "VOCdevkit"


def make_folder(root: Path, classes=("road", "car", "sky")) -> Path:
    (root).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    mask = np.zeros((40, 50), np.uint8)
    mask[20:] = 1
    mask[0:3] = 255
    for split in ("train", "val"):
        for i in range(2):
            write_jpg(root / "images" / split / f"img{i}.png", seed=i)
            write_png(root / "masks" / split / f"img{i}.png", mask)
    return root


#: Environment variable that marks every process a test starts (Ray renames its workers, not their
#: environment), so teardown ends exactly those: never `ray stop`, which ends every Ray on the machine.
PROCESS_MARKER = "SPNTUNE_TEST_PROCESSES"


def marked_pids(tag: str, marker: str = PROCESS_MARKER) -> list[int]:
    """Processes whose environment holds ``marker=tag``."""
    needle = f"{marker}={tag}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if needle in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:  # gone, or not ours to read
                pass
    return pids


def end_processes(tag: str, marker: str = PROCESS_MARKER, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, the processes marked ``marker=tag``; returns once none is left (or 10 s)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in marked_pids(tag, marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while marked_pids(tag, marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not marked_pids(tag, marker):
            return


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HostReads(TorchDispatchMode):
    """Records in ``reads`` each read back to the host made inside it, as ``"<file>:<line>: <op>"`` of the
    innermost caller outside torch: ``.item()`` and ``bool(tensor)`` (``aten._local_scalar_dense``) and
    boolean indexing (``aten.nonzero``); on a GPU each waits for the device. ``ignore``: given the call's
    stack as file names, True for reads not to record."""

    OPS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)

    def __init__(self, ignore: Callable[[list[str]], bool] | None = None) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.ignore = ignore

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            stack = traceback.extract_stack()
            files = [f.filename for f in stack]
            if self.ignore is None or not self.ignore(files):
                caller = next((f for f in reversed(stack) if f.filename != __file__ and "/torch/" not in f.filename),
                              stack[-1])  # fmt: skip
                self.reads.append(f"{caller.filename}:{caller.lineno}: {func}")
        return func(*args, **(kwargs or {}))
