"""What `spntune predict` and `spntune evaluate` refuse, and when: bad images, output paths, splits, data
keys and checkpoints get one clear message (exit 2, no traceback) before anything is written, and the
cheap checks before torch is imported. Images are made with PIL here; one untrained checkpoint (a real
``save_checkpoint`` file, 64x64, synthetic classes) serves every test."""

import io
import json
import pickle
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import make_folder, make_voc
from PIL import Image

from spntune.cli import main
from spntune.config import TrialConfig
from spntune.data.base import read_image
from spntune.data.synthetic import SYNTHETIC_CLASSES
from spntune.errors import CheckpointError, ConfigError, DatasetError
from spntune.predict_input import CHECKPOINT_FILE, SPLITS, _plain_pickle, check_split, checkpoint_config
from spntune.trainables import build_model, load_checkpoint, restore_model, save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A folder holding an untrained 64x64 checkpoint of the synthetic classes (no optimiser state)."""
    folder = tmp_path_factory.mktemp("checkpoint")
    cfg = TrialConfig.from_dict({"data.image_size": [64, 64], "data.val_size": 2, "refiner.channels": 8})
    model = build_model(cfg, len(SYNTHETIC_CLASSES))
    save_checkpoint(folder / CHECKPOINT_FILE, model, cfg, 1, "joint", None, None, {"class_names": SYNTHETIC_CLASSES})
    return folder


def _rgb(path: Path, h: int = 20, w: int = 30, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _predict(checkpoint: Path, *args: object) -> int:
    return main(["predict", "--checkpoint", str(checkpoint), *map(str, args)])


def _refused(capsys, *needles: object) -> str:
    err = capsys.readouterr().err
    assert err.startswith("spntune: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert str(needle) in err, err
    return err


# --- images -----------------------------------------------------------------------------------------------


def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 40 * 50).reshape(40, 50)
    expected = np.rint(ramp.astype(np.uint16) / 257).astype(np.uint8)
    sixteen = tmp_path / "grey16.png"
    Image.fromarray(ramp.astype(np.uint16)).save(sixteen)  # PIL mode I;16
    wide = tmp_path / "grey32.tiff"
    Image.fromarray(ramp.astype(np.int32)).save(wide)  # mode I, values of a 16-bit image
    floats = tmp_path / "float.tiff"
    Image.fromarray((ramp.astype(np.uint16) / 65535).astype(np.float32)).save(floats)  # mode F in 0..1
    assert [Image.open(p).mode for p in (sixteen, wide, floats)] == ["I;16", "I", "F"]
    for path in (sixteen, wide, floats):
        rgb = read_image(path)
        assert rgb.shape == (40, 50, 3) and rgb.dtype == np.uint8
        np.testing.assert_allclose(rgb[..., 0], expected, atol=1)  # a ramp, not black and white
        assert (rgb[..., 0] == rgb[..., 2]).all()
    # 8-bit data in a 32-bit container keeps its values (divided by 257 it was nearly black)
    Image.fromarray(expected.astype(np.int32)).save(tmp_path / "grey32_8bit.tiff")
    np.testing.assert_array_equal(read_image(tmp_path / "grey32_8bit.tiff")[..., 0], expected)
    # grey, RGBA and palette still convert as before
    grey = np.arange(40 * 50, dtype=np.uint8).reshape(40, 50)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(np.dstack([grey] * 4)).save(tmp_path / "rgba.png")
    Image.fromarray(grey).convert("P").save(tmp_path / "palette.png")
    for name in ("grey.png", "rgba.png", "palette.png"):
        np.testing.assert_array_equal(read_image(tmp_path / name)[..., 1], grey)


@pytest.mark.parametrize("values", [np.full((4, 5), 2.0), np.full((4, 5), -0.5), np.full((4, 5), np.nan)])
def test_a_float_image_outside_0_to_1_is_refused_naming_it(tmp_path, values):
    path = tmp_path / "hdr.tiff"
    Image.fromarray(values.astype(np.float32)).save(path)
    with pytest.raises(DatasetError, match=r"hdr\.tiff holds floating-point values .* expected values in 0\.\.1"):
        read_image(path)


def test_predict_writes_masks_of_16_bit_float_grey_rgba_and_palette_images(checkpoint, tmp_path, capsys):
    ramp = np.linspace(0, 65535, 24 * 30).reshape(24, 30)
    grey = np.rint(ramp.astype(np.uint16) / 257).astype(np.uint8)  # what the 16-bit and float images hold
    Image.fromarray(ramp.astype(np.uint16)).save(tmp_path / "a16.png")
    Image.fromarray((ramp.astype(np.uint16) / 65535).astype(np.float32)).save(tmp_path / "b_float.tiff")
    Image.fromarray(grey).save(tmp_path / "c_grey.png")
    Image.fromarray(grey).convert("RGBA").save(tmp_path / "d_rgba.png")
    Image.fromarray(grey).convert("P").save(tmp_path / "e_palette.png")
    images = sorted(p for p in tmp_path.iterdir() if p.is_file())
    assert _predict(checkpoint, *images, "--out", tmp_path / "out") == 0
    overlays = {}
    for image in images:
        assert Image.open(tmp_path / "out" / f"{image.stem}_mask.png").size == (30, 24)
        overlays[image.stem] = np.asarray(Image.open(tmp_path / "out" / f"{image.stem}_overlay.png"))
    for stem in ("a16", "b_float", "d_rgba", "e_palette"):  # the same picture as the 8-bit grey one
        np.testing.assert_allclose(overlays[stem], overlays["c_grey"], atol=1)
    assert (tmp_path / "out" / "classes.txt").read_text().split() == SYNTHETIC_CLASSES


# --- predict's inputs and outputs ------------------------------------------------------------------------


def test_two_inputs_with_one_stem_are_refused_naming_both(checkpoint, tmp_path, capsys):
    tiff, jpg = _rgb(tmp_path / "img" / "rgb.tiff"), _rgb(tmp_path / "img" / "rgb.jpg", seed=1)
    assert _predict(checkpoint, tiff, jpg, "--out", tmp_path / "out") == 2
    _refused(capsys, tiff, jpg, "rgb_mask.png")
    assert _predict(checkpoint, tiff, tiff, "--out", tmp_path / "out") == 2
    _refused(capsys, f"image {tiff} is given twice")
    mask = _rgb(tmp_path / "img" / "rgb_mask.png", seed=2)  # an earlier run's mask, given as an input
    assert _predict(checkpoint, tiff, mask, "--out", tmp_path / "img") == 2
    _refused(capsys, f"would overwrite the input {mask} with its output {mask}")
    assert not (tmp_path / "out").exists()


def _bomb(path: Path) -> Path:
    """A real 20000x20000 1-bit PNG of 50 kB: 400 Mpixels, over twice PIL's decompression-bomb limit."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    side = 20000
    rows = zlib.compress(bytes((1 + side // 8) * side), 1)  # each row: filter byte + 2500 zero bytes
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def _encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (lambda p: p.write_bytes(b""), "the file is empty (0 bytes)"),
        (lambda p: p.write_bytes(np.random.default_rng(1).bytes(3000)), "cannot identify image file"),
        (lambda p: p.write_bytes(_encoded("PNG")[:2000]), "cannot read image"),
        (lambda p: p.write_bytes(_encoded("JPEG")[:1500]), "truncated"),
        (_bomb, "too large to decode safely"),
    ],
    ids=["empty", "random-bytes", "truncated-png", "truncated-jpeg", "decompression-bomb"],
)
def test_a_bad_image_is_refused_before_any_mask_is_written(checkpoint, tmp_path, capsys, bad, message):
    good, broken = _rgb(tmp_path / "a_good.png"), tmp_path / "z_bad.png"
    bad(broken)
    assert _predict(checkpoint, good, broken, "--out", tmp_path / "out") == 2
    _refused(capsys, broken, message)
    assert not (tmp_path / "out").exists()  # not even the good image's mask, nor an empty folder


def test_a_folder_input_is_named_as_a_folder(checkpoint, tmp_path, capsys):
    folder = tmp_path / "img"
    _rgb(folder / "a.png")
    assert _predict(checkpoint, folder, "--out", tmp_path / "out") == 2
    assert "image not found" not in _refused(capsys, f"{folder} is a folder: predict takes image files")


def test_bad_out_paths_are_refused_before_anything_is_written(checkpoint, tmp_path, capsys, monkeypatch):
    image = _rgb(tmp_path / "photo.png")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    assert _predict(checkpoint, image, "--out", a_file) == 2  # FileExistsError before
    _refused(capsys, f"--out {a_file} is a file")
    assert _predict(checkpoint, image, "--out", a_file / "sub" / "out") == 2  # NotADirectoryError before
    _refused(capsys, f"{a_file} is a file, so no folder can be made under it")
    for name in ("classes.txt", "photo_mask.png", "photo_overlay.png"):  # IsADirectoryError before
        out = tmp_path / f"out-{name}"
        (out / name).mkdir(parents=True)
        assert _predict(checkpoint, image, "--out", out) == 2
        _refused(capsys, f"{out / name} is a folder, where predict writes the file {name}")
        assert [p.name for p in out.iterdir()] == [name]  # no mask written
    monkeypatch.setattr("spntune.predict_input.os.access", lambda path, mode: False)  # tests run as root
    assert _predict(checkpoint, image, "--out", tmp_path / "new") == 2  # PermissionError before
    _refused(capsys, f"--out {tmp_path / 'new'}: {tmp_path} is not writable")
    assert not (tmp_path / "new").exists()


# --- evaluate --------------------------------------------------------------------------------------------


def _evaluate(checkpoint: Path, *args: object) -> int:
    return main(["evaluate", "--checkpoint", str(checkpoint), *map(str, args)])


@pytest.mark.parametrize("classes", [("road", "car", "sky"), (*SYNTHETIC_CLASSES, "sign")], ids=["fewer", "more"])
def test_evaluate_refuses_a_dataset_of_other_classes(checkpoint, tmp_path, capsys, classes):
    data = make_folder(tmp_path / "data", classes=classes)
    assert _evaluate(checkpoint, "--set", "data.name=folder", "--set", f"data.root={data}") == 2
    _refused(
        capsys,
        f"at {data} has {len(classes)} classes",
        f"checkpoint {checkpoint} predicts 5",
        "sky" if len(classes) == 3 else "sign",
    )


def test_evaluate_scores_a_folder_dataset_that_has_only_the_scored_split(checkpoint, tmp_path, capsys):
    data = make_folder(tmp_path / "data", classes=SYNTHETIC_CLASSES)
    for kind in ("images", "masks"):  # no train split: evaluate needs only the one it scores
        for path in (data / kind / "train").iterdir():
            path.unlink()
        (data / kind / "train").rmdir()
    report = tmp_path / "scores.json"
    args = ["--set", "data.name=folder", "--set", f"data.root={data}", "--json", report]
    assert _evaluate(checkpoint, *args) == 0
    scores = json.loads(report.read_text())
    assert scores["split"] == "val" and scores["images"] == 2 and scores["class_names"] == SYNTHETIC_CLASSES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "scores.json"]  # no temporary file left
    assert _evaluate(checkpoint, *args[:4], "--split", "train") == 2
    _refused(capsys, "split 'train': dataset folder has no such split; its splits: val", data / "images")


def test_evaluate_refuses_unknown_splits_naming_the_ones_there_are(checkpoint, tmp_path, capsys):
    assert _evaluate(checkpoint, "--split", "nosuchsplit") == 2  # synthetic: was scored as val
    _refused(capsys, "split 'nosuchsplit': dataset synthetic has no such split; its splits: train, val")
    with pytest.raises(ConfigError, match="dataset pets has no such split; its splits: trainval, test"):
        check_split("pets", "/nowhere", "val")
    voc = make_voc(tmp_path)
    with pytest.raises(ConfigError, match=r"dataset voc has no such split; its splits: train, val \(the lists in "):
        check_split("voc", str(voc), "test")
    check_split("voc", str(voc), "val")


def test_a_data_value_of_the_wrong_type_with_split_is_refused_without_a_traceback(checkpoint, capsys):
    """The early split check leaves a data config it cannot validate to evaluate's own (it took YAML's int
    2024 as a folder path and ended in a TypeError)."""
    assert _evaluate(checkpoint, "--set", "data.name=folder", "--set", "data.root=2024", "--split", "val") == 2
    _refused(capsys, "data.root: Input should be a valid string (got 2024)")


def test_the_config_of_a_checkpoint_is_read_without_torch_and_nothing_else_in_it_runs(checkpoint, tmp_path):
    saved = torch.load(checkpoint / CHECKPOINT_FILE, map_location="cpu", weights_only=True)["config"]
    assert checkpoint_config(checkpoint / CHECKPOINT_FILE) == saved
    assert saved["data"]["name"] == "synthetic" and saved["data"]["image_size"] == [64, 64]
    # not torch's zip format, or no config in it: None (the loader names what is wrong later)
    (tmp_path / "notes.txt").write_text("x")
    torch.save({"model": {}}, tmp_path / "no_config.pt")
    whole = (checkpoint / CHECKPOINT_FILE).read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])
    for name in ("notes.txt", "no_config.pt", "cut.pt"):
        assert checkpoint_config(tmp_path / name) is None, name
    # a file that names a function to call: it is never imported nor called, its place is None
    marker = tmp_path / "ran"

    class Hostile:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    with zipfile.ZipFile(tmp_path / "hostile.pt", "w") as archive:
        archive.writestr("hostile/data.pkl", pickle.dumps({"config": {"data": {"name": "x"}}, "x": Hostile()}))
    assert checkpoint_config(tmp_path / "hostile.pt") == {"data": {"name": "x"}}
    assert not marker.exists()
    # read only where every opcode is plain data and memo indices count up: one PUT at index 2**26 in 9 bytes
    # took C pickle 1 GB of memo; sets (8 MB of "add an empty set" took 957 MB) and NEWOBJ are not plain data
    odd = {
        "memo": b"\x80\x04N" + b"r" + struct.pack("<I", 1 << 26) + b".",
        "sets": b"\x80\x04}(\x8c\x06config}\x8c\x01x]" + b"\x8fa" * 1000 + b"u.",
        "newobj": b"\x80\x02}(X\x06\x00\x00\x00config}X\x01\x00\x00\x00xcbuiltins\nobject\n)\x81u.",
    }
    for name, data in odd.items():
        with zipfile.ZipFile(tmp_path / f"{name}.pt", "w") as archive:
            archive.writestr(f"{name}/data.pkl", data)
        assert checkpoint_config(tmp_path / f"{name}.pt") is None, name
        assert not _plain_pickle(data), name  # refused before unpickling, not by what unpickling did
    with zipfile.ZipFile(checkpoint / CHECKPOINT_FILE) as archive:
        real = next(archive.read(n) for n in archive.namelist() if n.endswith("/data.pkl"))
    assert _plain_pickle(real)


def test_the_fixed_splits_and_file_names_agree_with_the_datasets():
    from spntune.data import DATASETS
    from spntune.data.listing import FILE_DATASETS
    from spntune.data.pets import PETS_SPLITS
    from spntune.names import DATASET_NAMES
    from spntune.predict_input import available_splits
    from spntune.trainables import CHECKPOINT_FILE as WRITTEN

    assert available_splits("pets", "/nowhere") == (list(PETS_SPLITS), "") and CHECKPOINT_FILE == WRITTEN
    assert {DATASETS["synthetic"].train_split, DATASETS["synthetic"].val_split} == set(SPLITS["synthetic"])
    assert sorted([*SPLITS, *FILE_DATASETS]) == sorted(DATASET_NAMES)  # each dataset's splits known one way
    assert available_splits("folder", "/nowhere") is None and available_splits("voc", "/nowhere") is None


def test_evaluate_refuses_json_paths_it_could_not_write(checkpoint, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    for path, message in [
        (tmp_path, f"--json {tmp_path} is a folder"),
        (a_file / "scores.json", f"{a_file} is a file, not a folder"),
        (tmp_path / "missing" / "scores.json", f"the folder {tmp_path / 'missing'} does not exist"),
    ]:
        assert _evaluate(checkpoint, "--json", path) == 2
        _refused(capsys, message)


def test_evaluate_refuses_set_keys_outside_data(checkpoint, capsys):
    assert _evaluate(checkpoint, "--set", "model.arch=fpn", "--set", "data.val_sise=2") == 2
    _refused(capsys, "model.arch: not a data key", "data.val_sise: unknown data key", "data.val_size")


# --- checkpoints -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"config": "x"}, "'config' is a str 'x', expected a dict"),
        ({"extra": {}}, "'extra' lacks class_names"),
        ({"extra": []}, "'extra' is a list [], expected a dict holding class_names"),
        ({"model": [1, 2]}, "'model' is a list [1, 2], expected a dict of weight tensors"),
        ({"model": {}}, "'model' holds no weights"),
        ({"epoch": "1"}, "'epoch' is a str '1', expected an integer"),
        ({"extra": {"class_names": "abc"}}, "class_names is a str 'abc', expected a list of class names"),
    ],
)
def test_a_checkpoint_with_values_of_the_wrong_kind_is_refused_naming_them(tmp_path, capsys, change, message):
    path = tmp_path / "odd.pt"
    torch.save(
        {"model": {"w": torch.zeros(1)}, "config": {}, "epoch": 1, "extra": {"class_names": ["a"]}, **change}, path
    )
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    assert f"{path} is not a usable spntune checkpoint" in str(caught.value) and message in str(caught.value)
    assert _predict(path, _rgb(tmp_path / "a.png"), "--out", tmp_path / "out") == 2
    _refused(capsys, message)


def test_a_checkpoint_saved_with_a_model_kwarg_smp_dropped_still_loads(checkpoint, tmp_path):
    """Configs refuse a model.kwargs key the architecture does not take; one saved before they did is left
    out with a warning (smp dropped it unread, so the weights fit the model built without it). A key that
    was used (activation) still makes the config one this version cannot use."""
    state = torch.load(checkpoint / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    for kwargs in ({"decoder_channel": [8, 8, 8, 8, 8]}, {"activation": "softmax"}):
        state["config"]["model"]["kwargs"] = kwargs
        torch.save(state, tmp_path / "old.pt")
        saved = load_checkpoint(tmp_path / "old.pt")
        if "activation" in kwargs:
            with pytest.raises(
                CheckpointError, match=r"(?s)holds a config this version cannot use: .*model.kwargs.activation"
            ):
                restore_model(saved, tmp_path / "old.pt")
        else:
            with pytest.warns(UserWarning, match=r"model.kwargs decoder_channel left out: unet takes no such keyword"):
                cfg, _ = restore_model(saved, tmp_path / "old.pt")
            assert cfg.model.kwargs == {}


def test_weights_that_do_not_fit_are_named(checkpoint, tmp_path):
    state = load_checkpoint(checkpoint)
    weights = dict(state["model"])
    missing = list(weights)[:4]  # in the model's order, as the message lists them
    for key in missing:
        del weights[key]
    reshaped = next(k for k, v in weights.items() if v.ndim == 4)
    weights[reshaped] = torch.zeros(1, 1, 1, 1)
    weights["extra.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError) as caught:
        restore_model({**state, "model": weights}, "odd.pt")
    text = str(caught.value)
    assert text.startswith("checkpoint odd.pt: its weights do not fit this model: 4 missing: ")
    assert f"{missing[0]}, {missing[1]}, {missing[2]} and 1 more" in text
    assert "1 unexpected: extra.weight" in text
    assert f"1 of another shape: {reshaped} (checkpoint [1, 1, 1, 1], model [" in text


# --- refusals answer before torch ------------------------------------------------------------------------


def test_refusals_import_nothing_heavy(checkpoint, tmp_path):
    """Each of these is refused by the checks in cmd_predict / cmd_evaluate, before torch is imported."""
    image, a_file, broken = _rgb(tmp_path / "a.png"), tmp_path / "notes.txt", tmp_path / "b.png"
    a_file.write_text("x")
    broken.write_bytes(b"not a png")
    ck = str(checkpoint)
    calls = [
        ["predict", "--checkpoint", ck, str(tmp_path), "--out", str(tmp_path / "o")],
        ["predict", "--checkpoint", ck, str(image), str(broken), "--out", str(tmp_path / "o")],
        ["predict", "--checkpoint", ck, str(image), "--out", str(a_file / "o")],
        ["predict", "--checkpoint", str(tmp_path / "none.pt"), str(image), "--out", str(tmp_path / "o")],
        ["evaluate", "--checkpoint", ck, "--json", str(tmp_path / "missing" / "s.json")],
        ["evaluate", "--checkpoint", ck, "--set", "model.arch=fpn"],
        ["evaluate", "--checkpoint", ck, "--set", "data.name=synthetic", "--split", "test"],
        ["evaluate", "--checkpoint", ck, "--split", "test"],  # the dataset from the checkpoint's config
        ["evaluate", "--checkpoint", str(tmp_path / "none.pt")],
    ]
    code = (
        "import sys\n"
        "from spntune.cli import main\n"
        f"codes = [main(argv) for argv in {calls!r}]\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'mlflow', 'segmentation_models_pytorch', 'cv2') if m in sys.modules)\n"
        "print(codes, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == f"{[2] * len(calls)} []", out.stdout + out.stderr
    assert out.stderr.count("spntune: error: ") == len(calls) and "Traceback" not in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "notes.txt"]
