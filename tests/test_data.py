import numpy as np
import pytest
import torch
from fixtures import make_folder, make_pets, make_voc, write_jpg, write_png
from PIL import Image

from spntune.config import DataConfig
from spntune.data import DatasetError, build_datasets
from spntune.data.folder import load_folder
from spntune.data.pets import load_pets
from spntune.data.synthetic import SyntheticShapes, render_sample
from spntune.data.transforms import build_transform
from spntune.data.voc import load_voc

# ---------------------------------------------------------------- pets


def test_pets_targets(tmp_path):
    root = make_pets(tmp_path / "pets")
    binary = load_pets(root, "trainval", "binary")
    assert len(binary) == 2 and binary.class_names == ["background", "pet"]
    _, mask = binary.load_raw(0)
    assert set(np.unique(mask)) == {0, 1}  # border (3) counts as pet
    _, mask = load_pets(root, "trainval", "binary_ignore_border").load_raw(0)
    assert set(np.unique(mask)) == {0, 1, 255}
    _, mask = load_pets(root, "test", "trimap").load_raw(0)
    assert set(np.unique(mask)) == {0, 1, 2}


def test_pets_errors_name_the_file(tmp_path):
    root = make_pets(tmp_path / "pets")
    (root / "images" / "beagle_1.jpg").unlink()
    with pytest.raises(DatasetError, match=r"beagle_1\.jpg.*listed in .*trainval\.txt"):
        load_pets(root, "trainval")
    with pytest.raises(DatasetError, match="Oxford-IIIT Pet root not found"):
        load_pets(tmp_path / "nope", "trainval")
    (root / "annotations" / "test.txt").unlink()
    with pytest.raises(DatasetError, match=r"split file not found.*test\.txt"):
        load_pets(root, "test")


def test_bad_trimap_value_names_the_file(tmp_path):
    root = make_pets(tmp_path / "pets")
    bad = np.full((40, 50), 2, np.uint8)
    bad[0, 0] = 7
    write_png(root / "annotations" / "trimaps" / "Abyssinian_1.png", bad)
    ds = load_pets(root, "trainval")
    with pytest.raises(DatasetError, match=r"Abyssinian_1\.png has values \[7\].*trimap values 1, 2, 3"):
        ds[0]


def test_corrupt_image_and_size_mismatch(tmp_path):
    root = make_pets(tmp_path / "pets")
    (root / "images" / "Abyssinian_1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=r"cannot read image .*Abyssinian_1\.jpg"):
        load_pets(root, "trainval")[0]
    write_jpg(root / "images" / "beagle_1.jpg", h=41)
    with pytest.raises(
        DatasetError, match=r"size mismatch: image .*beagle_1\.jpg is 50x41 but mask .*beagle_1\.png is 50x40"
    ):
        load_pets(root, "trainval")[1]


# ---------------------------------------------------------------- voc


def test_voc_root_at_devkit_or_voc2012(tmp_path):
    devkit = make_voc(tmp_path)
    for root in (devkit, devkit / "VOC2012"):
        ds = load_voc(root, "train")
        assert ds.num_classes == 21
        _, mask = ds.load_raw(0)
        assert set(np.unique(mask)) == {0, 15, 255}  # palette indices, not colours


def test_voc_errors(tmp_path):
    with pytest.raises(DatasetError, match="no VOC 2012 data under"):
        load_voc(tmp_path, "train")
    devkit = make_voc(tmp_path)
    rgb = Image.new("RGB", (50, 40))
    rgb.save(devkit / "VOC2012" / "SegmentationClass" / "2007_000001.png")
    with pytest.raises(DatasetError, match="mode 'RGB'.*single-channel"):
        load_voc(devkit, "train")[0]
    bad = np.zeros((40, 50), np.uint8)
    bad[0, 0] = 21
    write_png(devkit / "VOC2012" / "SegmentationClass" / "2007_000002.png", bad, palette=True)
    with pytest.raises(DatasetError, match=r"2007_000002\.png has values \[21\].*0\.\.20 or 255"):
        load_voc(devkit, "val")[0]


# ---------------------------------------------------------------- folder


def test_folder_layout(tmp_path):
    root = make_folder(tmp_path / "mine")
    ds = load_folder(root, "train")
    assert ds.class_names == ["road", "car", "sky"] and len(ds) == 2
    image, mask = ds[0]
    assert image.shape == (3, 40, 50) and image.dtype == torch.float32
    assert set(mask.unique().tolist()) == {0, 1, 255}


def test_folder_errors(tmp_path):
    root = make_folder(tmp_path / "mine")
    (root / "masks" / "val" / "img1.png").unlink()
    with pytest.raises(DatasetError, match=r"image .*img1\.png has no mask: expected .*masks/val/img1\.png"):
        load_folder(root, "val")
    with pytest.raises(DatasetError, match="images folder for split 'test' not found"):
        load_folder(root, "test")
    (root / "classes.txt").write_text("road\n")
    with pytest.raises(DatasetError, match=r"img0\.png has values \[1\].*0\.\.0 \(classes\.txt\) or 255"):
        load_folder(root, "train")[0]
    (root / "classes.txt").unlink()
    with pytest.raises(DatasetError, match="classes.txt"):
        load_folder(root, "train")


# ---------------------------------------------------------------- transforms


def test_paired_transform_keeps_labels_and_alignment():
    image = np.zeros((60, 80, 3), np.uint8)
    mask = np.zeros((60, 80), np.uint8)
    image[:, 40:] = 255
    mask[:, 40:] = 3
    mask[0:5] = 255
    torch.manual_seed(0)
    tf = build_transform((64, 64), train=True)
    for _ in range(20):
        out_img, out_mask = tf(image, mask)
        assert out_img.shape == (64, 64, 3) and out_mask.shape == (64, 64)
        assert set(np.unique(out_mask)) <= {0, 3, 255}  # nearest only: no blended labels
        bright = out_img.mean(axis=2) > 100  # colour jitter scales 255 down, never 0 up
        labelled = out_mask != 255
        agree = (bright == (out_mask == 3))[labelled].mean()
        assert agree > 0.95  # flip / crop moved image and mask together


def test_transform_follows_torch_seed():
    image = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    mask = np.zeros((60, 80), np.uint8)
    tf = build_transform((32, 32), train=True)
    torch.manual_seed(5)
    a = tf(image, mask)[0]
    torch.manual_seed(5)
    b = tf(image, mask)[0]
    assert np.array_equal(a, b)


# ---------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_has_every_class():
    a, b = render_sample(3, 64, 96), render_sample(3, 64, 96)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(render_sample(4, 64, 96)[1], a[1])
    masks = np.stack([render_sample(i, 64, 64)[1] for i in range(30)])
    assert set(np.unique(masks)) == {0, 1, 2, 3, 4}
    ds = SyntheticShapes(4, (64, 96), seed=1)
    x, y = ds[0]
    assert x.shape == (3, 64, 96) and y.shape == (64, 96)


def test_build_datasets_synthetic_splits_differ():
    train, val, names = build_datasets(DataConfig(image_size=(64, 64), train_size=4, val_size=2))
    assert len(train) == 4 and len(val) == 2 and names[0] == "background"
    assert not np.array_equal(train.load_raw(0)[1], val.load_raw(0)[1])


# ---------------------------------------------------------------- the real data in ../shared/data


def test_shared_camvid(shared_data):
    cfg = DataConfig(name="folder", root=str(shared_data / "camvid-mini"), image_size=(96, 128))
    train, val, names = build_datasets(cfg)
    assert len(names) == 11 and names[0] == "sky"
    assert len(train) == 367 and len(val) == 101
    image, mask = val[0]
    assert image.shape == (3, 96, 128)
    assert set(mask.unique().tolist()) <= set(range(11)) | {255}


def test_shared_pets(shared_data):
    root = shared_data / "oxford-iiit-pet-mini"
    assert len(load_pets(root, "trainval")) == 16 and len(load_pets(root, "test")) == 4
    ds = load_pets(root, "trainval", "trimap")
    for i in range(len(ds)):
        _, mask = ds.load_raw(i)
        assert set(np.unique(mask)) <= {0, 1, 2}


def test_shared_voc(shared_data):
    for root in (shared_data / "VOCdevkit-mini", shared_data / "VOCdevkit-mini" / "VOC2012"):
        ds = load_voc(root, "trainval")
        assert len(ds) == 2
        _, mask = ds.load_raw(0)
        assert 15 in np.unique(mask) and set(np.unique(mask)) <= set(range(21)) | {255}


# ---------------------------------------------------------------- bad data, one family


def _read_all(root, split="train"):
    ds = load_folder(root, split)
    return [ds[i] for i in range(len(ds))]


def _colour_mask(root):
    Image.new("RGB", (50, 40), (255, 0, 0)).save(root / "masks" / "train" / "img0.png")


def _truncated(root):
    path = root / "images" / "train" / "img1.png"
    path.write_bytes(path.read_bytes()[:60])


@pytest.mark.parametrize(
    ("damage", "expected"),
    [(lambda r: __import__("shutil").rmtree(r), r"not found: expected a directory at .*mine"),
     (lambda r: (r / "classes.txt").unlink(), r"classes\.txt"),
     (lambda r: (r / "classes.txt").write_text(""), r"classes\.txt must list 1\.\.255 class names, found 0"),
     (lambda r: (r / "classes.txt").write_text("a\na\n"), r"classes\.txt lists a class name twice"),
     (lambda r: __import__("shutil").rmtree(r / "images" / "train"), r"images folder for split 'train' not found"),
     (lambda r: [p.unlink() for p in (r / "images" / "train").iterdir()], r"no images .* in .*images/train"),
     (lambda r: (r / "masks" / "train" / "img1.png").unlink(), r"img1\.png has no mask: expected .*masks/train/img1\.png"),
     (lambda r: (r / "images" / "train" / "img0.png").write_bytes(b"not an image"), r"cannot read image .*img0\.png"),
     (_truncated, r"cannot read image .*img1\.png"),
     (_colour_mask, r"mask .*img0\.png"),
     (lambda r: write_png(r / "masks" / "train" / "img0.png", np.full((40, 50), 7, np.uint8)),
      r"img0\.png has values \[7\].*0\.\.2 \(classes\.txt\) or 255"),
     (lambda r: write_jpg(r / "images" / "train" / "img1.png", h=41), r"size mismatch: image .*img1\.png is 50x41"),
     (lambda r: write_png(r / "masks" / "train" / "img9.png", np.zeros((40, 50), np.uint8)),
      r"mask .*img9\.png has no image in .*images/train"),
     (lambda r: write_jpg(r / "images" / "train" / "img0.jpg"),  # one was dropped without a word
      r"images .*img0\.jpg and .*img0\.png share the name 'img0', and so one mask")],
    ids=["no-root", "no-classes", "empty-classes", "duplicate-class", "no-split", "empty-split", "no-mask",
         "not-an-image", "truncated-image", "colour-mask", "value-outside-classes", "size-mismatch", "orphan-mask",
         "two-images-one-stem"],
)  # fmt: skip
def test_bad_folder_data_is_refused_naming_the_file(tmp_path, damage, expected):
    root = make_folder(tmp_path / "mine")
    damage(root)
    with pytest.raises(DatasetError, match=expected):
        _read_all(root)


def test_a_split_smaller_than_one_batch_still_trains_full_batches(tmp_path):
    """Documented, not refused: a split with fewer samples than train.batch_size (tiny debug sets) is
    drawn with replacement to one full batch per epoch, so BatchNorm layers pooling to 1x1 can train."""
    from spntune.trainables import _loader

    root = make_folder(tmp_path / "mine")
    ds = load_folder(root, "train", transform=build_transform((32, 32), True))
    (image, mask), *rest = list(_loader(ds, batch_size=8, train=True, workers=0, seed=0))
    assert not rest and image.shape[0] == 8 and mask.shape[0] == 8
