"""The decoded-image cache (data/cache.py) and the loader settings (data.num_workers, pin_memory)."""

import logging
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import make_folder, write_jpg, write_png

from spntune.config import DataConfig, TrialConfig
from spntune.data import build_datasets
from spntune.data.base import DatasetError, PairedFileDataset
from spntune.data.cache import TRAIN_SCALE, CachedDataset, ImageCache, data_fingerprint
from spntune.trainables import loader_workers

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid-mini"


def _cfg(root: Path, cache_dir: Path | None, **extra) -> DataConfig:
    """make_folder's images are 40x50 (h x w): 128x160 keeps their aspect, so the training split is cached."""
    extra = {"image_size": (128, 160), **extra}
    return DataConfig(name="folder", root=str(root), cache_dir=str(cache_dir) if cache_dir else None, **extra)


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
    # the training copy: the original size here (smaller than TRAIN_SCALE x 128x160); items come out
    # augmented at the training size
    assert train.images.shape == (2, 40, 50, 3) and train.masks.dtype == np.uint8
    assert np.array_equal(train.images[1], train.base.load_raw(1)[0])
    image, mask = train[0]
    assert image.shape == (3, 128, 160) and mask.shape == (128, 160)
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
    build_datasets(_cfg(root, cache, image_size=(256, 320)), cache=True)
    assert len(list(cache.glob("*.images.npy"))) == 3  # a new val entry; the train copy (original size) is shared
    mask = np.ones((40, 50), np.uint8)
    write_png(root / "masks" / "val" / "img0.png", mask)
    os.utime(root / "masks" / "val" / "img0.png", (1, 1))  # another mtime for sure
    _, val, _ = build_datasets(_cfg(root, cache), cache=True)
    assert len(list(cache.glob("*.images.npy"))) == 4  # only the val entry changed
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
        with pytest.raises(Exception, match="must be an integer in 0..64 or auto"):
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
    cfg = {"data.name": "folder", "data.root": str(root), "data.image_size": [128, 160], "data.cache_dir": str(tmp_path / "c"),
           "train.batch_size": 2, "train.epochs": 1, "refiner.channels": 8, "refiner.iterations": 2}  # fmt: skip
    rep = Rows()
    train_segmentation(cfg, rep)
    assert _entries(tmp_path / "c") == ["images.npy", "images.npy", "masks.npy", "masks.npy"]
    (row,) = rep.rows
    assert row["final_images"] == 2 and 0.0 <= row["final_refined_miou"] <= 1.0  # scored on the 40x50 originals
    train_segmentation({**cfg, "data.cache": False, "data.cache_dir": str(tmp_path / "off")}, Rows())
    assert not (tmp_path / "off").exists()


def test_images_of_many_shapes_or_another_aspect_are_not_squashed_into_a_training_copy(tmp_path):
    root = make_folder(tmp_path / "data")
    # 40x50 images trained at 64x64: a training copy would squash them (random crops would see other shapes)
    train, val, _ = build_datasets(_cfg(root, tmp_path / "cache", image_size=(64, 64)), cache=True)
    assert isinstance(train, PairedFileDataset) and isinstance(val, CachedDataset)
    write_jpg(root / "images" / "train" / "img1.png", seed=1, h=60, w=50)  # now two sizes in the split
    write_png(root / "masks" / "train" / "img1.png", np.zeros((60, 50), np.uint8))
    train, _, _ = build_datasets(_cfg(root, tmp_path / "cache"), cache=True)
    assert isinstance(train, PairedFileDataset)


def test_large_originals_are_cached_at_twice_the_training_size(tmp_path):
    root = make_folder(tmp_path / "data")
    for split in ("train", "val"):
        for i in range(2):
            write_jpg(root / "images" / split / f"img{i}.png", seed=i, h=400, w=500)
            write_png(root / "masks" / split / f"img{i}.png", np.ones((400, 500), np.uint8))
    train, _, _ = build_datasets(_cfg(root, tmp_path / "cache"), cache=True)  # 400x500 trained at 128x160
    assert train.images.shape == (2, 128 * TRAIN_SCALE, 160 * TRAIN_SCALE, 3) and (train.masks[:] == 1).all()


def test_a_cache_folder_that_cannot_be_written_costs_speed_not_the_trial(tmp_path):
    root = make_folder(tmp_path / "data")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.warns(
        RuntimeWarning, match="image cache: cannot write .*a_file/cache.*reading the images from their files"
    ):
        train, val, _ = build_datasets(_cfg(root, blocker / "cache"), cache=True)
    assert isinstance(train, PairedFileDataset) and isinstance(val, PairedFileDataset)


def test_temporary_files_of_a_builder_that_died_are_removed(tmp_path):
    root = make_folder(tmp_path / "data")
    cfg = _cfg(root, tmp_path / "cache")
    _, val, _ = build_datasets(cfg, cache=False)
    key = ImageCache(tmp_path / "cache").key(val, (128, 160), "val")
    (tmp_path / "cache").mkdir()
    stale = tmp_path / "cache" / f".{key}.12345.images.tmp"
    stale.write_bytes(b"half an entry")
    _, cached, _ = build_datasets(cfg, cache=True)
    assert isinstance(cached, CachedDataset) and not stale.exists()
    assert (tmp_path / "cache" / f"{key}.images.npy").stat().st_mode & 0o044  # others may read a shared cache


def test_the_coarse_key_follows_how_images_are_read():
    from spntune.coarse_cache import coarse_key

    cfg = TrialConfig.model_validate({"data": {"num_workers": "auto"}})
    keys = {coarse_key(cfg, "files", "cpu", reading) for reading in
            ({"workers": 0, "train_images": "files"}, {"workers": 2, "train_images": "files"},
             {"workers": 0, "train_images": "cache [192, 256]"})}  # fmt: skip
    assert len(keys) == 3
    # the settings asking for it do not enter the key: what they resolve to does
    other = cfg.model_copy(update={"data": cfg.data.model_copy(update={"num_workers": 0, "cache_dir": "/x"})})
    assert coarse_key(other, "files", "cpu", {"workers": 0}) == coarse_key(cfg, "files", "cpu", {"workers": 0})
