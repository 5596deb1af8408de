"""ImageFolder datasets for user-supplied paths: ImageNet-1K, ImageNette, Tiny-ImageNet, generic.

Layouts (``layout=``):
  "imagefolder"  root/train/<class>/<image>, root/val/<class>/<image>  (ImageNet-1K, ImageNette)
  "tiny"         Tiny-ImageNet: root/train/<wnid>/images/<image> (a class folder without an
                 images/ subfolder is read directly), and root/val/images/<image> with
                 root/val/val_annotations.txt ("<file>\\t<wnid>\\t..." per line); a val folder
                 already sorted into root/val/<wnid>/ class folders is accepted too.

Every readable image becomes RGB (``to_rgb``): CMYK, palette (with or without
transparency), grey, bilevel and YCbCr through PIL's convert; 16-bit grey keeps its top 8
bits (PIL's convert would clip it to white); alpha (RGBA, LA, PA) is dropped, keeping the
colour under it, as torchvision's loader does. File names are taken as the file system
gives them (non-UTF-8 names pass through as Python's surrogate-escaped str).

Class index = position in the sorted train class folder names; val must have exactly the
same class set (ValueError naming the classes that differ).

Bad input (every message names the path):
  * missing data folder / split folder -> FileNotFoundError; no class folders -> ValueError
  * a class folder without images -> ValueError
  * a corrupt or non-image file (a file whose extension is not an image's, or one PIL cannot
    decode). ``on_corrupt="raise"`` (default): ValueError naming the file -- at construction
    for files found bad there, otherwise when the sample is loaded. ``on_corrupt="skip"``:
    such files are dropped at construction and counted; ``num_skipped`` / ``skipped`` expose
    the count and the paths.
  * a file or a broken/looping link where a class folder belongs: as a corrupt file
    (ValueError naming it, or skipped and counted)
  * an image whose header claims more than PIL.Image.MAX_IMAGE_PIXELS pixels (a
    decompression bomb) or a side under MIN_SIDE pixels: as a corrupt file, refused from
    the header's size before any pixel is decoded (PIL's own bomb warning becomes this
    refusal)
  ``verify`` (default: True for "skip", False for "raise") decodes every image once at
  construction (JPEGs at 1/8 scale via PIL draft, which still reads the whole entropy-coded
  stream and so catches truncation). That costs about a quarter of an epoch of decoding --
  minutes for ImageNet-1K on few cores -- so the default "raise" mode checks only names at
  construction and decodes lazily. Hidden files (".DS_Store", ...) are ignored.
"""
from __future__ import annotations

import io
import os
import struct
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from guard_fast.data.transforms import build_transform

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYOUTS = ("imagefolder", "tiny")
ON_CORRUPT = ("raise", "skip")
# smallest side an image may have: anything smaller is a placeholder or a broken export, and
# a crop of it upsamples one or two pixels to the whole input
MIN_SIDE = 8


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _visible(names) -> list[str]:
    return sorted(n for n in names if not n.startswith("."))


# what a broken, hostile or unreadable file raises while PIL opens or decodes it
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, MemoryError,
                  Image.DecompressionBombError, Image.DecompressionBombWarning)
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit (and 32-bit int) grey


def size_problem(w: int, h: int) -> str | None:
    """None if a w x h image is acceptable, else why not (checked on the header's size,
    before any pixel is decoded)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and w * h > limit:
        return (f"the header claims {w} x {h} = {w * h} pixels, more than PIL.Image."
                f"MAX_IMAGE_PIXELS ({limit}): refused before decoding (a decompression bomb?)")
    if min(w, h) < MIN_SIDE:
        return f"the image is {w} x {h} pixels, smaller than {MIN_SIDE} x {MIN_SIDE}"
    return None


def _open(f) -> Image.Image:
    """Image.open with the header's size checked; PIL's bomb warning becomes a refusal."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = Image.open(f)
    why = size_problem(*im.size)
    if why is not None:
        raise ValueError(why)
    return im


def header_problem(data) -> str | None:
    """None if the encoded image ``data`` (bytes-like) has a header PIL identifies and an
    acceptable size (``size_problem``), else why not; no pixel is decoded."""
    try:
        _open(io.BytesIO(data)).close()
        return None
    except _DECODE_ERRORS as e:
        return _reason(e)


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB by the documented rules: 16-bit grey keeps its top 8 bits (PIL's own convert
    would clip every value above 255 to white); alpha is dropped; CMYK, palette, grey and
    bilevel go through PIL's convert."""
    if im.mode in _WIDE_MODES:
        a = np.asarray(im).astype(np.int64).clip(0, 65535) >> 8
        return Image.fromarray(a.astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Decode ``path`` to an RGB PIL image; ValueError naming the file when it cannot."""
    try:
        with open(path, "rb") as f:
            im = to_rgb(_open(f))  # the conversion forces the full decode while f is open
            im.load()
        return im
    except _DECODE_ERRORS as e:
        raise ValueError(f"corrupt or non-image file {path!r}: {_reason(e)}") from e


def _reason(e: BaseException) -> str:
    return str(e) or type(e).__name__


def check_image(path: str) -> str | None:
    """None if ``path`` decodes, else the reason. JPEGs decode at 1/8 scale (fast, full stream)."""
    try:
        with open(path, "rb") as f:
            im = _open(f)
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
            im.load()
        return None
    except _DECODE_ERRORS as e:
        return _reason(e)


def list_classes(split_dir: str) -> list[str]:
    """Sorted visible sub-folder names of ``split_dir`` (the classes)."""
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"data folder {split_dir!r} does not exist")
    classes = [n for n in _visible(os.listdir(split_dir)) if os.path.isdir(os.path.join(split_dir, n))]
    if not classes:
        raise ValueError(f"data folder {split_dir!r} is empty: expected one sub-folder per class")
    return classes


def _check_same_classes(train: list[str], val: list[str], val_where: str) -> None:
    if set(train) != set(val):
        only_train = sorted(set(train) - set(val))
        only_val = sorted(set(val) - set(train))
        raise ValueError(f"val classes in {val_where!r} differ from train: only in train {only_train[:20]}"
                         f"{' ...' if len(only_train) > 20 else ''}, only in val {only_val[:20]}"
                         f"{' ...' if len(only_val) > 20 else ''}")


class ImageFolderDataset(Dataset):
    """An ImageFolder split: (image float (3, s, s) in [0, 1], int label).

    root: the dataset root (holding train/ and val/). split: "train" | "val".
    kind: transform kind ("imagenet" for ImageNet-like, "small" for Tiny-ImageNet).
    image_size: output side. layout: "imagefolder" | "tiny". train: augment (default:
    split == "train"). on_corrupt: "raise" | "skip". verify: decode every file at
    construction (default: on_corrupt == "skip"). native_size: stored side for "small"
    kinds (64 for Tiny-ImageNet), so a resize is added only when it differs.

    Attributes: samples [(path, label)], targets, classes, class_to_idx, num_classes,
    num_skipped, skipped [(path, reason)], mean, std, image_size, channels (3).
    """

    def __init__(self, root: str, split: str = "train", kind: str = "imagenet", image_size: int = 224,
                 layout: str = "imagefolder", train: bool | None = None, on_corrupt: str = "raise",
                 verify: bool | None = None, native_size: int | None = None,
                 mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data folder {root!r} does not exist")
        self.root, self.split, self.layout, self.kind = root, split, layout, kind
        self.on_corrupt = on_corrupt
        self.classes = list_classes(os.path.join(root, "train"))
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.num_classes = len(self.classes)
        self.skipped: list[tuple[str, str]] = []
        candidates = self._scan(split)
        if verify if verify is not None else on_corrupt == "skip":
            good = []
            for path, label in candidates:
                why = check_image(path)
                if why is None:
                    good.append((path, label))
                else:
                    self._bad(path, why)
            candidates = good
        self.samples = candidates
        if not self.samples:
            raise ValueError(f"{os.path.join(root, split)!r} has no readable images")
        self.targets = [label for _, label in self.samples]
        self.mean, self.std = tuple(mean), tuple(std)
        self.image_size, self.channels, self.native_size = image_size, 3, native_size
        self.is_train = split == "train" if train is None else train
        self.transform = build_transform(kind, image_size, self.is_train, native_size=native_size)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    @property
    def class_names(self) -> list[str]:
        return self.classes

    def _bad(self, path: str, why: str, what: str = "corrupt or non-image file") -> None:
        if self.on_corrupt == "raise":
            raise ValueError(f"{what} {path!r}: {why} "
                             f"(pass on_corrupt='skip' to skip and count such files)")
        self.skipped.append((path, why))

    def _stray_files(self, split_dir: str) -> None:
        """A visible entry of the split folder that is not a folder (a file, a broken or
        looping symlink) where only class folders belong: refused or skipped and counted."""
        for n in _visible(os.listdir(split_dir)):
            p = os.path.join(split_dir, n)
            if not os.path.isdir(p):
                self._bad(p, "a file where a class folder is expected (not a folder, or a "
                          "broken or looping link)", what="stray entry")

    def _files(self, folder: str, label: int) -> list[tuple[str, int]]:
        out = []
        for n in _visible(os.listdir(folder)):
            p = os.path.join(folder, n)
            if os.path.isdir(p):
                continue
            if _is_image_name(n):
                out.append((p, label))
            else:
                self._bad(p, "not an image file extension")
        if not out:
            raise ValueError(f"class folder {folder!r} has no images")
        return out

    def _scan(self, split: str) -> list[tuple[str, int]]:
        split_dir = os.path.join(self.root, split)
        if not os.path.isdir(split_dir):
            raise FileNotFoundError(f"data folder {split_dir!r} does not exist")
        ann = os.path.join(split_dir, "val_annotations.txt")
        if self.layout == "tiny" and split == "val" and os.path.isfile(ann):
            return self._scan_tiny_val(split_dir, ann)
        classes = list_classes(split_dir)
        self._stray_files(split_dir)
        if split != "train":
            _check_same_classes(self.classes, classes, split_dir)
        samples = []
        for c in self.classes:
            folder = os.path.join(split_dir, c)
            if self.layout == "tiny" and os.path.isdir(os.path.join(folder, "images")):
                folder = os.path.join(folder, "images")
            samples += self._files(folder, self.class_to_idx[c])
        return samples

    def _scan_tiny_val(self, split_dir: str, ann: str) -> list[tuple[str, int]]:
        img_dir = os.path.join(split_dir, "images")
        if not os.path.isdir(img_dir):
            raise FileNotFoundError(f"Tiny-ImageNet val folder {img_dir!r} does not exist")
        mapping: dict[str, str] = {}
        with open(ann) as f:
            for k, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.split("\t") if "\t" in line else line.split()
                if len(parts) < 2:
                    raise ValueError(f"{ann!r} line {k}: expected '<file>\\t<wnid>...', got {line.strip()!r}")
                mapping[parts[0].strip()] = parts[1].strip()
        if not mapping:
            raise ValueError(f"{ann!r} is empty")
        _check_same_classes(self.classes, sorted(set(mapping.values())), ann)
        samples = []
        present = set(_visible(os.listdir(img_dir)))
        for n in sorted(present):
            p = os.path.join(img_dir, n)
            if not _is_image_name(n):
                self._bad(p, "not an image file extension")
            elif n not in mapping:
                raise ValueError(f"{p!r} is not listed in {ann!r}")
            else:
                samples.append((p, self.class_to_idx[mapping[n]]))
        missing = sorted(set(mapping) - present)
        if missing:
            raise FileNotFoundError(f"{ann!r} lists {len(missing)} files absent from {img_dir!r}, "
                                    f"e.g. {missing[:5]}")
        if not samples:
            raise ValueError(f"Tiny-ImageNet val folder {img_dir!r} has no images")
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return self.transform(load_rgb(path)), label
