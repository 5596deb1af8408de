"""The IDX reader and the Fashion-MNIST data set: small IDX files the test writes (plain,
gzipped, truncated, wrong magic), the clear errors, and the real files where installed."""
import gzip
import struct

import numpy as np
import pytest

from guard_fast.data import get_data
from guard_fast.data.idx import FASHION_INSTALL, FashionMNIST, find_fashion_mnist, read_idx, write_idx
from guard_fast.train import main


def _fake_fashion(folder, n_train=30, n_val=20, gz=True):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_val)):
        write_idx(folder / f"{split}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{split}-labels-idx1-ubyte{ext}", (np.arange(n) % 10).astype(np.uint8))
    return folder


@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
def test_idx_round_trip(tmp_path, name):
    for a in (np.arange(24, dtype=np.uint8).reshape(2, 3, 4), np.array([-1, 5], dtype=np.int32),
              np.linspace(0, 1, 6, dtype=np.float32).reshape(3, 2)):
        write_idx(tmp_path / name, a)
        b = read_idx(tmp_path / name)
        assert b.dtype == a.dtype.newbyteorder("=") and np.array_equal(a, b)


def test_idx_bad_files_are_refused_naming_the_file(tmp_path):
    good = np.zeros((3, 4, 4), np.uint8)
    write_idx(tmp_path / "g.idx", good)
    raw = (tmp_path / "g.idx").read_bytes()
    cases = {"trunc.idx": (raw[:-5], "truncated"), "long.idx": (raw + b"xx", "longer than"),
             "magic.idx": (b"\x01\x02" + raw[2:], "not an IDX file"),
             "type.idx": (raw[:2] + b"\x07" + raw[3:], "not an IDX file"),
             "head.idx": (raw[:9], "truncated header"), "empty.idx": (b"", "too short")}
    for name, (data, msg) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=msg) as e:
            read_idx(tmp_path / name)
        assert name in str(e.value)
    (tmp_path / "bad.idx.gz").write_bytes(gzip.compress(raw)[:-8])
    with pytest.raises(ValueError, match="bad.idx.gz"):
        read_idx(tmp_path / "bad.idx.gz")


def test_fashion_mnist_from_written_files(tmp_path):
    root = _fake_fashion(tmp_path / "fm")
    d = get_data("fashion-mnist", root=str(root))
    assert len(d.train) == 30 and len(d.val) == 20 and d.num_classes == 10
    x, y = d.val[3]
    assert x.shape == (3, 32, 32) and y == 3 and 0 <= x.min() and x.max() <= 1
    assert d.class_names[0] == "T-shirt/top" and len(d.mean) == 3
    assert get_data("fashion-mnist", root=str(root), channels=1).val[0][0].shape == (1, 32, 32)
    # a truncated image file: refused with the file named, when the data set is opened
    bad = _fake_fashion(tmp_path / "bad", gz=False)
    f = bad / "t10k-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte: truncated"):
        FashionMNIST(str(bad), "val")
    # labels that do not match the images
    write_idx(bad / "t10k-images-idx3-ubyte", np.zeros((20, 28, 28), np.uint8))
    write_idx(bad / "t10k-labels-idx1-ubyte", np.zeros(19, np.uint8))
    with pytest.raises(ValueError, match="expected 20 labels"):
        FashionMNIST(str(bad), "val")


def test_missing_fashion_files_say_how_to_install(tmp_path, capsys, monkeypatch):
    with pytest.raises(FileNotFoundError, match="--data"):
        find_fashion_mnist(str(tmp_path))
    monkeypatch.setattr("guard_fast.data.idx.FASHION_MNIST_DIRS", (str(tmp_path / "none"),))
    with pytest.raises(FileNotFoundError, match=FASHION_INSTALL):
        find_fashion_mnist(None)
    out = tmp_path / "sq"
    assert main(["squeeze", "--dataset", "fashion-mnist", "--out", str(out), "--no-progress"]) == 2
    assert FASHION_INSTALL in capsys.readouterr().err
    assert not out.exists()


def test_real_fashion_mnist_files():
    """The real 70,000 images from Debian's dataset-fashion-mnist (.ci/run installs it)."""
    try:
        find_fashion_mnist(None)
    except FileNotFoundError:
        pytest.skip(f"Fashion-MNIST is not installed ({FASHION_INSTALL})")
    d = get_data("fashion-mnist")
    assert (len(d.train), len(d.val)) == (60000, 10000)
    assert np.bincount(d.val.targets.numpy()).tolist() == [1000] * 10
    assert np.bincount(d.train.targets.numpy()).tolist() == [6000] * 10
    assert d.mean[0] == pytest.approx(0.286, abs=1e-3) and d.std[0] == pytest.approx(0.353, abs=1e-3)
    x, _ = d.val[0]
    assert x.shape == (3, 32, 32) and float(x.max()) <= 1.0


def test_fashion_mnist_presets_need_no_data_folder():
    """`all --preset fashion-mnist` and every stage's preset of the data set resolve without
    --data (the files are found where Debian installs them), on the digits' sizes."""
    from guard_fast.config import resolve_squeeze, resolve_student
    from guard_fast.config.pipeline import PipelineConfig, resolve_settings
    from guard_fast.config.recover import RECOVER_PRESETS

    p = resolve_settings(PipelineConfig(preset="fashion-mnist"))
    assert p["squeeze"]["data"] == "fashion-mnist" and p["ipc"] == 10
    assert resolve_squeeze({"preset": "fashion-mnist"}).data == "fashion-mnist"
    assert resolve_student({"preset": "fashion-mnist"}).model == resolve_student({}).model
    assert RECOVER_PRESETS["fashion-mnist"] == RECOVER_PRESETS["mnist"]
