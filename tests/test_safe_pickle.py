"""No code runs from data: CIFAR batches go through a restricted unpickler."""
import os
import pickle

import numpy as np
import pytest

from guard_fast.data import CIFAR
from guard_fast.data.safe_pickle import load_data_pickle


class _Payload:
    """Unpickling this calls os.mkdir(marker): what a crafted batch would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _real_batch(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"training batch 1 of 5",
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)]}


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_real_format_batches_load(tmp_path, protocol):
    d = _real_batch()
    (tmp_path / "b").write_bytes(pickle.dumps(d, protocol=protocol))
    back = load_data_pickle(str(tmp_path / "b"))
    assert back[b"labels"] == d[b"labels"] and back[b"filenames"] == d[b"filenames"]
    np.testing.assert_array_equal(back[b"data"], d[b"data"])


def test_crafted_batch_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    good = pickle.dumps(_real_batch())
    for f in [f"data_batch_{i}" for i in range(2, 6)] + ["test_batch"]:
        (root / f).write_bytes(good)
    evil = dict(_real_batch(), extra=_Payload(str(marker)))
    (root / "data_batch_1").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(ValueError) as ei:
        CIFAR(str(tmp_path), "cifar10", split="train")
    msg = str(ei.value)
    assert "data_batch_1" in msg and ("posix.mkdir" in msg or "os.mkdir" in msg), msg
    assert not marker.exists()
    # the same file through plain pickle would have run the payload: the test is real
    pickle.loads((root / "data_batch_1").read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("glob", ["builtins eval", "subprocess Popen", "numpy load"])
def test_any_other_global_is_refused(tmp_path, glob):
    mod, name = glob.split()
    # a protocol-0 pickle that names the global and calls it with one string argument
    raw = f"c{mod}\n{name}\n(S'x'\ntR.".encode()
    (tmp_path / "p").write_bytes(raw)
    with pytest.raises(pickle.UnpicklingError, match=f"refused to load the global {mod}.{name}"):
        load_data_pickle(str(tmp_path / "p"))
