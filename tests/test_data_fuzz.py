"""Hostile and broken inputs to the data loaders (ImageFolder on the torch path, DALI on the
CPU, CIFAR pickles). The policy (guard_fast/data/folder.py's docstring): every readable
image is converted to RGB as documented; every other file is refused with a ValueError
naming it (on_corrupt="raise"), or skipped and counted with its name (on_corrupt="skip");
a decompression bomb is refused from its header, before any pixel is decoded. Nothing
ends in another exception or hangs. The long run of the same checks over thousands of
random corruptions is tests/fuzz_data.py."""
import os
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import _hostile as H
from guard_fast.data import CIFAR, ImageFolderDataset
from guard_fast.data import dali as gdali
from guard_fast.data.folder import MIN_SIDE, check_image, load_rgb, to_rgb

needs_dali = pytest.mark.skipif(not gdali.dali_available(), reason="NVIDIA DALI is not installed")


def _root(tmp_path, files: dict[str, bytes], good_per_class: int = 2, side: int = 16):
    """root/{train,val}/{a,b}/ with good side x side images, and `files` added to train/a."""
    good = H.encode(Image.new("RGB", (side, side), (10, 200, 30)), "PNG")
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = tmp_path / split / c
            d.mkdir(parents=True, exist_ok=True)
            for k in range(good_per_class):
                (d / f"good{k}.png").write_bytes(good)
    for name, data in files.items():
        (tmp_path / "train" / "a" / name).write_bytes(data)
    return str(tmp_path)


def test_every_mode_converts_as_documented(tmp_path):
    conv = H.convertible_images()
    root = _root(tmp_path, {n: d for n, (d, _) in conv.items()}, side=24)
    ds = ImageFolderDataset(root, "train", "small", 24, native_size=24, train=False, verify=True)
    assert ds.num_skipped == 0
    for (path, _), i in zip(ds.samples, range(len(ds))):
        name = os.path.basename(path)
        x, _ = ds[i]
        assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 1
        if name not in conv:
            continue
        src = conv[name][1]
        if src.mode.startswith("I"):  # 16-bit grey: the top 8 bits, not PIL's clip to 255
            want = (np.asarray(src).astype(np.int64) >> 8).astype(np.uint8)
            got = np.asarray(load_rgb(path))
            assert (got == want[..., None]).all(), name
            assert np.asarray(src.convert("RGB")).mean() > got.mean() + 50  # PIL's clip: white
        else:
            assert np.array_equal(np.asarray(load_rgb(path)), np.asarray(src.convert("RGB"))), name
    assert to_rgb(Image.new("RGBA", (9, 9), (1, 2, 3, 0))).getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize("name", sorted(H.bad_files()))
def test_bad_file_is_refused_or_skipped_naming_it(tmp_path, name, monkeypatch):
    data, why = H.bad_files()[name]
    root = _root(tmp_path, {name: data})
    if "claims" in why:  # a bomb: refused from the header, never decoded
        real_load = ImageFile.ImageFile.load

        def no_decode(self):
            assert self.size[0] * self.size[1] < 10**6, f"{name}: pixels decoded"
            return real_load(self)
        monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    lazy = ImageFolderDataset(root, "train", "small", 16, native_size=16)
    i = [os.path.basename(p) for p, _ in lazy.samples].index(name)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")) as ei:
        lazy[i]
    if "claims" in why:
        assert "MAX_IMAGE_PIXELS" in str(ei.value) or "decompression bomb" in str(ei.value)
    if name.startswith("one_"):
        assert f"smaller than {MIN_SIDE} x {MIN_SIDE}" in str(ei.value)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        ImageFolderDataset(root, "train", "small", 16, verify=True)
    skip = ImageFolderDataset(root, "train", "small", 16, native_size=16, on_corrupt="skip")
    assert [os.path.basename(p) for p, _ in skip.skipped] == [name] and len(skip) == 4
    assert check_image(os.path.join(root, "train", "a", name)) is not None


def test_names_links_and_stray_entries(tmp_path):
    png = H.encode(Image.new("RGB", (12, 12), (5, 6, 7)), "PNG")
    long_name = "x" * 251 + ".png"  # 255 bytes: the longest name ext4 allows
    root = _root(tmp_path, {long_name: png}, side=12)
    a = os.fsencode(os.path.join(root, "train", "a"))
    with open(a + b"/\xff\xfe-not-utf8.png", "wb") as f:  # a name that is not UTF-8
        f.write(png)
    os.symlink("loop2.png", os.path.join(root, "train", "a", "loop1.png"))
    os.symlink("loop1.png", os.path.join(root, "train", "a", "loop2.png"))
    (tmp_path / "train" / "c_is_a_file").write_bytes(png)        # a class "folder" that is a file
    os.symlink("self_loop", os.path.join(root, "train", "self_loop"))  # a folder link to itself
    with pytest.raises(ValueError, match="c_is_a_file"):
        ImageFolderDataset(root, "train", "small", 12)
    ds = ImageFolderDataset(root, "train", "small", 12, native_size=12, on_corrupt="skip")
    skipped = sorted(os.path.basename(p) for p, _ in ds.skipped)
    assert skipped == ["c_is_a_file", "loop1.png", "loop2.png", "self_loop"]
    assert ds.classes == ["a", "b"]
    names = [os.path.basename(p) for p, _ in ds.samples]
    assert long_name in names and os.fsdecode(b"\xff\xfe-not-utf8.png") in names
    for i in range(len(ds)):
        assert ds[i][0].shape == (3, 12, 12)


@pytest.mark.parametrize("seed", range(3))
def test_cifar_corrupted_batches_are_refused_naming_the_file(tmp_path, seed):
    rng = np.random.default_rng(seed)
    good = {b"labels": [int(v) for v in rng.integers(0, 10, 6)],
            b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8)}
    blob = pickle.dumps(good, protocol=2)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / f).write_bytes(blob)
    r = random.Random(seed)
    outcomes = {"loaded": 0, "refused": 0}
    for k in range(25):
        bad = b"" if k == 0 else H.mutate(blob, r)
        (folder / "data_batch_2").write_bytes(bad)
        try:
            ds = CIFAR(str(tmp_path), "cifar10", "train")
            assert len(ds) == len(ds.targets) and ds.images.shape[1:] == (3, 32, 32)
            outcomes["loaded"] += 1
        except ValueError as e:
            assert "data_batch_2" in str(e), e
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0


def test_cifar_wrong_contents_are_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    ok = pickle.dumps({b"labels": [1, 2], b"data": np.zeros((2, 3072), np.uint8)})
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / f).write_bytes(ok)
    for bad, needle in [({b"labels": [1], b"data": [["x"] * 3072]}, "data_batch_1"),
                        ({b"labels": [10 ** 30], b"data": np.zeros((1, 3072), np.uint8)}, "data_batch_1"),
                        ({b"labels": [1], b"data": np.zeros((1, 3071), np.uint8)}, "3072"),
                        ({b"labels": [99], b"data": np.zeros((1, 3072), np.uint8)}, "outside"),
                        ([1, 2, 3], "lacks keys"),
                        ({b"labels": "ab", b"data": {}}, "data_batch_1")]:
        (folder / "data_batch_1").write_bytes(pickle.dumps(bad))
        with pytest.raises(ValueError, match=needle):
            CIFAR(str(tmp_path), "cifar10", "train")


@needs_dali
def test_dali_cpu_converts_and_refuses_like_the_torch_path(tmp_path):
    conv = {n: d for n, (d, _) in H.convertible_images().items() if not n.endswith(".tif")}
    root = _root(tmp_path / "ok", conv)
    ds = ImageFolderDataset(root, "train", "imagenet", 16)
    batches = list(gdali.DALILoader(ds, 8, shuffle=False, device="cpu"))
    assert sum(len(y) for _, y in batches) == len(ds)
    assert all(x.shape[1:] == (3, 16, 16) and 0 <= x.min() <= x.max() <= 1 for x, _ in batches)
    bad = H.bad_files()
    for name in ("bomb_10k.jpg", "truncated.jpg", "empty.png", "one_pixel.png"):
        root = _root(tmp_path / name, {name: bad[name][0]})
        ds = ImageFolderDataset(root, "train", "imagenet", 16)
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            list(gdali.DALILoader(ds, 8, shuffle=False, device="cpu"))
        skip = ImageFolderDataset(root, "train", "imagenet", 16, on_corrupt="skip")
        assert skip.num_skipped == 1
        assert sum(len(y) for _, y in gdali.DALILoader(skip, 8, device="cpu")) == 4


def test_on_corrupt_flag_reaches_squeeze_and_evaluate(tmp_path, capsys):
    """--on-corrupt on the command line: raise (default) stops naming the file before any
    training; skip trains on the rest, prints the count and name, and lists every skipped file
    in the run folder; evaluate takes the same flag."""
    import json

    from guard_fast.data.synthetic import write_synthetic_imagefolder
    from guard_fast.train import main

    root = tmp_path / "data"
    write_synthetic_imagefolder(str(root), 2, 4, 16, fmt="PNG")
    cls = sorted(os.listdir(root / "train"))[0]
    (root / "train" / cls / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    sq = ["squeeze", "--dataset", "imagefolder", "--data", str(root), "--image-size", "16",
          "--regularizer", "none", "--model", "convnet", "--model-options", '{"width": 4}',
          "--epochs", "1", "--batch-size", "4", "--no-progress"]
    assert main([*sq, "--out", str(tmp_path / "raise")]) == 2
    assert "corrupt or non-image file" in capsys.readouterr().err
    assert not (tmp_path / "raise" / "teacher.pt").exists()
    assert main([*sq, "--on-corrupt", "skip", "--out", str(tmp_path / "skip")]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 undecodable files (1 train, 0 val)" in out and "broken.png" in out
    listed = json.loads((tmp_path / "skip" / "skipped_files.json").read_text())
    assert listed["count"] == 1 and listed["files"][0]["path"].endswith("broken.png")
    assert listed["files"][0]["split"] == "train"
    assert json.loads((tmp_path / "skip" / "config.json").read_text())["on_corrupt"] == "skip"
    (root / "val" / cls / "broken.png").write_bytes(b"")  # zero bytes in the validation split
    ev = ["evaluate", "--model", str(tmp_path / "skip" / "teacher.pt"), "--data", str(root),
          "--attacks", "MIM", "--n-examples", "9"]
    assert main([*ev, "--out", str(tmp_path / "ev_raise")]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert main([*ev, "--on-corrupt", "skip", "--out", str(tmp_path / "ev_skip")]) == 0
    assert "skipped 1 undecodable files (0 train, 1 val)" in capsys.readouterr().out
