"""The decoded-image cache (data/cache.py) and the loader settings (data.num_workers, pin_memory)."""

import logging
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import make_folder, write_png

from spntune.config import DataConfig, TrialConfig
from spntune.data import build_datasets
from spntune.data.base import DatasetError, PairedFileDataset
from spntune.data.cache import TRAIN_SCALE, CachedDataset, data_fingerprint
from spntune.trainables import loader_workers

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid-mini"


def _cfg(root: Path, cache_dir: Path | None, **extra) -> DataConfig:
    return DataConfig(name="folder", root=str(root), image_size=(32, 64), cache_dir=str(cache_dir) if cache_dir else None,
                      **extra)  # fmt: skip


def _entries(cache_dir: Path) -> list[str]:
    return sorted(p.name.split(".", 1)[1] for p in cache_dir.glob("*.npy"))


def test_cached_validation_batches_equal_uncached_ones(tmp_path):
    root = make_folder(tmp_path / "data")
    plain_train, plain_val, names = build_datasets(_cfg(root, None), cache=True)  # no folder: no cache
    assert isinstance(plain_val, PairedFileDataset)
    train, val, cached_names = build_datasets(_cfg(root, tmp_path / "cache"), cache=True)
    assert isinstance(val, CachedDataset) and isinstance(train, CachedDataset) and cached_names == names
    assert _entries(tmp_path / "cache") == ["images.npy", "images.npy", "masks.npy", "masks.npy"]
    for i in range(len(val)):
        for got, want in zip(val[i], plain_val[i], strict=True):
            assert got.dtype == want.dtype and torch.equal(got, want)
    # the training copy is TRAIN_SCALE x the size; items come out augmented at the training size
    assert train.images.shape == (2, 32 * TRAIN_SCALE, 64 * TRAIN_SCALE, 3) and train.masks.dtype == np.uint8
    image, mask = train[0]
    assert image.shape == (3, 32, 64) and mask.shape == (32, 64)
    assert set(torch.unique(mask).tolist()) <= {0, 1, 255}
    # originals (scores at original size, pictures) and fingerprints (coarse-cache keys) are the files'
    assert val.load_raw(0)[0].shape == (40, 50, 3)
    assert data_fingerprint(train, val) == data_fingerprint(plain_train, plain_val)


def test_a_second_trial_reads_the_cache_without_decoding(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data")
    cfg = _cfg(root, tmp_path / "cache")
    _, first, _ = build_datasets(cfg, cache=True)

    def no_decoding(self, index):
        raise AssertionError("decoded a file the cache holds")

    monkeypatch.setattr(PairedFileDataset, "load_raw", no_decoding)
    _, again, _ = build_datasets(cfg, cache=True)
    assert np.array_equal(again.images, first.images) and isinstance(again.images, np.memmap)


def test_an_edited_file_or_another_size_is_a_new_entry(tmp_path):
    root = make_folder(tmp_path / "data")
    cache = tmp_path / "cache"
    build_datasets(_cfg(root, cache), cache=True)
    assert len(list(cache.glob("*.images.npy"))) == 2
    build_datasets(_cfg(root, cache).model_copy(update={"image_size": (64, 64)}), cache=True)
    assert len(list(cache.glob("*.images.npy"))) == 4
    mask = np.ones((40, 50), np.uint8)
    write_png(root / "masks" / "val" / "img0.png", mask)
    os.utime(root / "masks" / "val" / "img0.png", (1, 1))  # another mtime for sure
    _, val, _ = build_datasets(_cfg(root, cache), cache=True)
    assert len(list(cache.glob("*.images.npy"))) == 5  # only the val entry changed
    assert (val.masks[0] == 1).all()


def test_a_corrupt_entry_is_rebuilt(tmp_path, caplog):
    root = make_folder(tmp_path / "data")
    cache = tmp_path / "cache"
    _, val, _ = build_datasets(_cfg(root, cache), cache=True)
    want = np.array(val.images)
    path = Path(val.images.filename)
    del val
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with caplog.at_level(logging.WARNING, logger="spntune.data.cache"):
        _, val, _ = build_datasets(_cfg(root, cache), cache=True)
    assert np.array_equal(val.images, want)
    assert "unreadable" in caplog.text and path.name in caplog.text


def test_a_bad_mask_is_refused_naming_it_and_leaves_no_entry(tmp_path):
    root = make_folder(tmp_path / "data")
    bad = np.full((40, 50), 7, np.uint8)  # class 7 of 3
    write_png(root / "masks" / "train" / "img1.png", bad)
    with pytest.raises(DatasetError, match=r"img1\.png has values \[7\]"):
        build_datasets(_cfg(root, tmp_path / "cache"), cache=True)
    assert list((tmp_path / "cache").glob("*.npy")) == [] and list((tmp_path / "cache").glob("*.tmp")) == []


def test_limits_decode_only_the_samples_kept(tmp_path):
    root = make_folder(tmp_path / "data")
    train, val, _ = build_datasets(_cfg(root, tmp_path / "cache", limit_train=1, limit_val=1), cache=True)
    assert len(train) == 1 and len(val) == 1 and train.images.shape[0] == 1 and val.images.shape[0] == 1


def _build_in_child(args: tuple[str, str, str]) -> str:
    root, cache, log_file = args
    import spntune.data.cache as cache_module

    built = cache_module.ImageCache._build

    def counting(self, key, dataset, size, role):
        with open(log_file, "a") as fh:
            fh.write(f"{os.getpid()} {role}\n")
        return built(self, key, dataset, size, role)

    cache_module.ImageCache._build = counting
    _, val, _ = build_datasets(_cfg(Path(root), Path(cache)), cache=True)
    return str(val.images.filename)


def test_trials_asking_at_once_decode_once(tmp_path):
    root = make_folder(tmp_path / "data")
    log_file = tmp_path / "built.txt"
    args = (str(root), str(tmp_path / "cache"), str(log_file))
    with multiprocessing.get_context("fork").Pool(3) as pool:
        files = pool.map(_build_in_child, [args] * 3)
    assert len(set(files)) == 1
    roles = sorted(line.split()[1] for line in log_file.read_text().splitlines())
    assert roles == ["train", "val"]  # each entry decoded by one process; the others waited and read it


@pytest.mark.skipif(not CAMVID.is_dir(), reason="../shared/data/camvid-mini not present")
def test_camvid_cache_holds_the_originals_at_twice_the_training_size(tmp_path):
    cfg = DataConfig(name="folder", root=str(CAMVID), image_size=(96, 128), limit_train=3, limit_val=2,
                     cache_dir=str(tmp_path / "cache"))  # fmt: skip
    train, _, _ = build_datasets(cfg, cache=True)
    for i in range(3):  # CamVid-mini is 192x256: its 2x copy is the original, pixel for pixel
        image, mask = train.base.load_raw(i)
        assert np.array_equal(train.images[i], image) and np.array_equal(train.masks[i], mask)


def test_num_workers_auto_and_bad_values():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [loader_workers("auto", cpu, n) for n in (1, 2, 3, 4, 8, 64)] == [0, 0, 0, 1, 2, 4]
    assert [loader_workers("auto", cuda, n) for n in (1, 2, 4, 16)] == [0, 1, 3, 8]
    assert loader_workers(3, cpu, 1) == 3
    assert TrialConfig.model_validate({"data": {"num_workers": "auto"}}).data.num_workers == "auto"
    for bad in (-1, "many", 1.5, True):
        with pytest.raises(Exception, match="must be an integer >= 0 or auto"):
            TrialConfig.model_validate({"data": {"num_workers": bad}})


def test_a_trial_reads_its_images_from_the_cache(tmp_path):
    from spntune.reporting import Reporter
    from spntune.trainables import train_segmentation

    class Rows(Reporter):
        def __init__(self):
            self.rows = []

        def report(self, epoch):
            self.rows.append(epoch.metrics)

    root = make_folder(tmp_path / "data")
    cfg = {"data.name": "folder", "data.root": str(root), "data.image_size": [64, 64], "data.cache_dir": str(tmp_path / "c"),
           "train.batch_size": 2, "train.epochs": 1, "refiner.channels": 8, "refiner.iterations": 2}  # fmt: skip
    rep = Rows()
    train_segmentation(cfg, rep)
    assert _entries(tmp_path / "c") == ["images.npy", "images.npy", "masks.npy", "masks.npy"]
    (row,) = rep.rows
    assert row["final_images"] == 2 and 0.0 <= row["final_refined_miou"] <= 1.0  # scored on the 40x50 originals
    train_segmentation({**cfg, "data.cache": False, "data.cache_dir": str(tmp_path / "off")}, Rows())
    assert not (tmp_path / "off").exists()
