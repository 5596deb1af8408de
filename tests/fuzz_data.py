"""Long fuzz run of the data loaders (the CI run is tests/test_data_fuzz.py).

    python tests/fuzz_data.py [--cases 2000] [--seed 0] [--timeout 10] [--no-dali]

Each case is one file: a hostile file from tests/_hostile.py, or a random corruption
(_hostile.mutate: truncation, flipped bytes, inserted or deleted runs, patched header
fields) of a valid PNG / JPEG / WebP / BMP / TIFF / CMYK / palette / 16-bit image or of a
CIFAR batch. It goes through the loader's entry points: folder.check_image and
folder.load_rgb (the torch path), dali.read_encoded plus a CPU DALI decode (when DALI is
installed), and cifar._load_batch for the pickles. Each ends as one of:

  loaded    decoded to an RGB image of at least MIN_SIDE pixels a side (or a CIFAR batch
            of the right shape)
  refused   ValueError naming the file (the documented refusal)
  crashed   any other exception (a bug: printed with its file)
  hung      still running after --timeout seconds (a bug)

and the script prints the counts per loader, the slowest case, and exits 1 if any case
crashed or hung. check_image and load_rgb must agree (both accept or both refuse).
"""
from __future__ import annotations

import argparse
import collections
import os
import pickle
import random
import signal
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _hostile as H  # noqa: E402

from guard_fast.data import cifar as gcifar  # noqa: E402
from guard_fast.data import dali as gdali  # noqa: E402
from guard_fast.data.folder import MIN_SIDE, check_image, load_rgb  # noqa: E402


class Hung(Exception):
    pass


def _alarm(signum, frame):
    raise Hung()


def _seeds() -> dict[str, bytes]:
    """Valid files the corruptions start from."""
    y, x = np.mgrid[0:40, 0:48]
    rgb = Image.fromarray(np.stack([x * 5, y * 6, (x + y) * 3], -1).astype(np.uint8))
    out = {"seed.png": H.encode(rgb, "PNG"), "seed.jpg": H.encode(rgb, "JPEG", quality=85),
           "seed_progressive.jpg": H.encode(rgb, "JPEG", progressive=True),
           "seed.webp": H.encode(rgb, "WEBP"), "seed.bmp": H.encode(rgb, "BMP"),
           "seed.tif": H.encode(rgb, "TIFF"), "seed_cmyk.jpg": H.encode(rgb.convert("CMYK"), "JPEG"),
           "seed_palette.png": H.encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
           "seed_grey16.png": H.encode(Image.fromarray((np.asarray(rgb.convert("L")).astype(np.uint16)
                                                        * 257)), "PNG"),
           "seed_rgba.png": H.encode(rgb.convert("RGBA"), "PNG")}
    return out


def _cifar_seed(protocol: int) -> bytes:
    rng = np.random.default_rng(0)
    return pickle.dumps({b"labels": [int(v) for v in rng.integers(0, 10, 8)],
                         b"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8),
                         b"filenames": [b"f%d.png" % i for i in range(8)]}, protocol=protocol)


def _torch_path(path: str) -> str:
    why = check_image(path)
    try:
        im = load_rgb(path)
    except ValueError as e:
        if os.path.basename(path) not in str(e):
            raise AssertionError(f"refusal does not name the file: {e}") from None
        if why is None:
            raise AssertionError(f"check_image accepted what load_rgb refused: {e}") from None
        return "refused"
    if why is not None:
        raise AssertionError(f"load_rgb accepted what check_image refused ({why})")
    if im.mode != "RGB" or min(im.size) < MIN_SIDE:
        raise AssertionError(f"loaded as {im.mode} {im.size}")
    return "loaded"


def _dali_path(path: str, pipe) -> str:
    try:
        enc = gdali.read_encoded(path)
    except ValueError as e:
        if os.path.basename(path) not in str(e):
            raise AssertionError(f"refusal does not name the file: {e}") from None
        return "refused"
    pipe.feed_input("encoded", [enc])
    try:
        (out,) = pipe.run()
    except RuntimeError as e:
        msg = gdali._decode_failure([path], e)  # what DALILoader raises, as a ValueError
        if os.path.basename(path) not in msg:
            raise AssertionError(f"refusal does not name the file: {msg}") from None
        return "refused:rebuild"
    a = np.array(out.as_tensor())
    if a.shape[1] != 3 or not (0 <= a.min() <= a.max() <= 1):
        raise AssertionError(f"DALI output {a.shape} in [{a.min()}, {a.max()}]")
    return "loaded"


def _cifar_path(folder: str, name: str) -> str:
    try:
        x, y = gcifar._load_batch(os.path.join(folder, name), b"labels")
    except ValueError as e:
        if name not in str(e):
            raise AssertionError(f"refusal does not name the file: {e}") from None
        return "refused"
    if x.shape[1:] != (3, 32, 32) or len(x) != len(y):
        raise AssertionError(f"batch of shape {x.shape} with {len(y)} labels")
    return "loaded"


def _case(kind: str, fn, counts, slow, label: str, timeout: float, *args) -> str:
    t = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        out = fn(*args)
    except Hung:
        out = "hung"
        print(f"HUNG {kind} {label}", flush=True)
    except Exception as e:  # noqa: BLE001 - a crash is what this run counts
        out = "crashed"
        print(f"CRASHED {kind} {label}: {type(e).__name__}: {e}", flush=True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    dt = time.perf_counter() - t
    counts[kind][out.split(":")[0]] += 1
    if dt > slow[kind][0]:
        slow[kind] = (dt, label)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=2000, help="random corruptions per loader")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds before a case is hung")
    ap.add_argument("--no-dali", action="store_true", help="skip the DALI CPU decode")
    a = ap.parse_args(argv)
    signal.signal(signal.SIGALRM, _alarm)
    rng = random.Random(a.seed)
    counts = collections.defaultdict(collections.Counter)
    slow = collections.defaultdict(lambda: (0.0, ""))
    use_dali = gdali.dali_available() and not a.no_dali
    pipe = gdali.build_pipeline("imagenet", 32, False, 1, 1, None, 0) if use_dali else None
    seeds = _seeds()
    fixed = {n: d for n, (d, _) in H.convertible_images().items()}
    fixed.update({n: d for n, (d, _) in H.bad_files().items()})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cases = list(fixed.items())
        for k in range(a.cases):
            name = rng.choice(sorted(seeds))
            cases.append((f"m{k:05d}_{name}", H.mutate(seeds[name], rng)))
        for label, data in cases:
            path = os.path.join(tmp, label)
            with open(path, "wb") as f:
                f.write(data)
            _case("torch", _torch_path, counts, slow, label, a.timeout, path)
            if use_dali:
                out = _case("dali", _dali_path, counts, slow, label, a.timeout, path, pipe)
                if out in ("refused:rebuild", "crashed", "hung"):
                    pipe = gdali.build_pipeline("imagenet", 32, False, 1, 1, None, 0)
            os.remove(path)
        # protocol 2 (how the CIFAR files are written: bytes as latin-1 text) and 5 (raw)
        blobs = [_cifar_seed(2), _cifar_seed(pickle.HIGHEST_PROTOCOL)]
        for k in range(a.cases):
            data = b"" if k == 0 else H.mutate(blobs[k % 2], rng)
            with open(os.path.join(tmp, "data_batch_1"), "wb") as f:
                f.write(data)
            _case("cifar", _cifar_path, counts, slow, f"cifar mutation {k}", a.timeout, tmp,
                  "data_batch_1")
    bad = 0
    for kind, c in counts.items():
        total = sum(c.values())
        bad += c["crashed"] + c["hung"]
        print(f"{kind:6s} cases {total:6d}: loaded {c['loaded']}, refused {c['refused']}, "
              f"crashed {c['crashed']}, hung {c['hung']}; slowest {slow[kind][0]:.2f} s "
              f"({slow[kind][1]})")
    print(f"total {sum(sum(c.values()) for c in counts.values())} cases in "
          f"{time.perf_counter() - t0:.0f} s, crashed or hung: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
