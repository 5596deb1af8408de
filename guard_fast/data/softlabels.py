"""Soft labels on replayable views: the format of a relabel folder, shared by the relabel
stage (which writes it) and the student (which replays it, or draws the same views online
with the teacher run live).

The student of SRe2L never sees a hard label: every image it trains on is a random view of a
distilled image (RandomResizedCrop, horizontal flip, then CutMix across the batch) and its
target is the teacher's logits on exactly that view. The public code (SRe2L
relabel/generate_soft_label.py + utils_fkd.py) draws the views inside DataLoader workers,
stores the crop coordinates, flip flags, CutMix parameters and the teacher's fp16 logits per
batch, and replays them by editing PyTorch's DataLoader fetcher. Here the views are a pure
function of (seed, epoch), drawn up front with a private generator, so nothing in PyTorch is
patched and the same views can be rebuilt on the fly (online mode) or replayed from disk.

Views of epoch e (``make_views``), all from ``numpy.random.PCG64(SeedSequence([seed, e, tag]))``:
  order   int32 (N,)    the epoch's image order; batch b is positions [b*B, min((b+1)*B, N))
                        (the last batch may be smaller, as with the public code's loader)
  boxes   int16 (N, 4)  RandomResizedCrop box (i, j, h, w) in source pixels, for position p.
                        torchvision's distribution: up to 10 tries of area fraction
                        U(min_scale, max_scale) and log aspect ratio U(log 3/4, log 4/3),
                        w = round(sqrt(area * r)), h = round(sqrt(area / r)), the first try
                        that fits wins, i ~ U{0..H-h}, j ~ U{0..W-w}; else torchvision's
                        central fallback crop. (Same distribution, our own random stream.)
  flips   bool  (N,)    horizontal flip (p = 0.5), applied after the resize
  lam     float32 (nb,) per batch: Beta(alpha, alpha) (cutmix alpha 1.0, mixup alpha 0.8)
  bbox    int16 (nb, 4) per batch, CutMix only: (r1, c1, r2, c2) -- the public rand_bbox on the
                        output batch: cut side int(S * sqrt(1 - lam)) per axis, a uniform
                        centre, clipped; rows r1:r2 and columns c1:c2 are replaced
  partner int16 (N,)    per batch, the batch-local permutation whose images are pasted in
One lam, one box and one permutation per batch, as in the public CutMix (and Mixup).

The student's input for a position (``EpochViews.inputs``): crop the box, resize it to
out_size x out_size with bilinear interpolation (align_corners=False, antialias=True: the
tensor default of torchvision's resized_crop), flip, then CutMix within the batch (copy the
partner's unmixed pixels inside bbox) or Mixup (lam * x + (1 - lam) * x[partner]). Mixing in
[0, 1] pixels equals the public code's mixing of normalized tensors (a copy, or an affine
combination, commutes with per-channel normalization). Inputs are bit-exact between stored
and replayed runs on the same device type (CPU and CUDA interpolation may differ in the last
bit; the stored targets are then still exactly the stored ones).

Relabel folder (``relabel(..., out_dir)``):
  config.json          the run's settings, teacher and distilled-set fingerprints (written first)
  epoch_XXXX.pt        one per epoch (atomic, so an existing file is complete): the views above
                       and the teacher's logits in position order, fp16 (N, K) by default, or
                       top-k values (N, k) + int16/int32 indices
  summary.json         storage per epoch, rewritten at the end of each call
  run.json             {"status": "running" | "complete", "stage": "relabel"} (the run folder's)
An existing folder holding a different run (any setting other than ``epochs`` differs, named
by its dotted path, e.g. ``views.seed``) is an error and nothing is written; the same run
resumes, skipping complete epoch files (guard_fast.runtime.RunFolder, resume="auto").

Top-k targets are rebuilt as dense logits with -inf outside the top k: softmax(z / T) then
puts zero mass there, i.e. the target is the teacher's distribution at temperature T
restricted to its top k classes and renormalized -- a proper distribution at every T, and
the KL term of a zero-probability class is 0 (no NaN: torch's kl_div uses xlogy).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from guard_fast.config.relabel import DTYPES, check_relabel
from guard_fast.config.student import MIXES
from guard_fast.data.transforms import rrc_fallback
from guard_fast.runtime import load_checkpoint, load_classifier

__all__ = ["FORMAT", "MIXES", "ViewSpec", "EpochViews", "make_views", "dense_from_topk",
           "SoftLabelStore", "OnlineSoftLabels", "storage_summary", "store_config",
           "resolve_distilled", "resolve_teacher", "teacher_logits", "num_classes_of",
           "epoch_file", "dtype_name", "int_dtype", "fingerprint_tensor", "fingerprint_model"]

FORMAT = "guard_fast.relabel/1"
_TAG = 0x52454C42  # "RELB": separates this stream from any other use of (seed, epoch)
_DTYPES = {name: getattr(torch, name) for name in DTYPES}


@dataclass(frozen=True)
class ViewSpec:
    """Everything the views of an epoch depend on (besides the epoch)."""

    n: int                      # number of distilled images
    src_h: int                  # their height and width (pixels)
    src_w: int
    out_size: int               # side of the student's (square) input
    batch_size: int             # global batch: views are drawn and mixed per batch
    seed: int = 0
    min_scale: float = 0.08     # RandomResizedCrop scale (SRe2L: --min-scale-crops 0.08)
    max_scale: float = 1.0
    mix: str = "cutmix"         # cutmix | mixup | none
    cutmix_alpha: float = 1.0   # public code's --cutmix default
    mixup_alpha: float = 0.8    # public code's --mixup default

    def __post_init__(self):
        if self.n < 1:
            raise ValueError("the distilled set is empty")
        # the relabel stage's declarations of these settings (guard_fast.config.relabel)
        check_relabel(out_size=self.out_size, batch_size=self.batch_size, seed=self.seed,
                      min_scale=self.min_scale, max_scale=self.max_scale, mix=self.mix,
                      cutmix_alpha=self.cutmix_alpha, mixup_alpha=self.mixup_alpha)

    @property
    def num_batches(self) -> int:
        return -(-self.n // self.batch_size)

    def to_dict(self) -> dict:
        return asdict(self)


def int_dtype(max_value: int) -> torch.dtype:
    return torch.int16 if max_value < 2**15 else torch.int32


def _rrc_boxes(rng: np.random.Generator, n: int, H: int, W: int, scale, ratio=(3 / 4, 4 / 3),
               tries: int = 10) -> np.ndarray:
    """torchvision RandomResizedCrop.get_params, vectorized over n images: (n, 4) i, j, h, w."""
    area = float(H * W)
    s = rng.uniform(scale[0], scale[1], size=(n, tries))
    r = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(n, tries)))
    w = np.rint(np.sqrt(area * s * r))  # rint: round half to even, like Python's round
    h = np.rint(np.sqrt(area * s / r))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = ok.argmax(1)
    rows = np.arange(n)
    hh, ww = h[rows, first].astype(np.int64), w[rows, first].astype(np.int64)
    ui, uj = rng.random(n), rng.random(n)
    i = np.floor(ui * (H - hh + 1)).astype(np.int64)
    j = np.floor(uj * (W - ww + 1)).astype(np.int64)
    miss = ~ok.any(1)
    if miss.any():  # torchvision's fallback: the central crop at the nearest allowed ratio
        i[miss], j[miss], hh[miss], ww[miss] = rrc_fallback(H, W, ratio)
    return np.stack([i, j, hh, ww], 1)


def _cut_box(rng: np.random.Generator, S_r: int, S_c: int, lam: float) -> list[int]:
    """The public rand_bbox on an (S_r, S_c) output: cut sides int(S * sqrt(1 - lam)), a
    uniform centre (randint over each side), each edge clipped to the image."""
    cut = math.sqrt(1.0 - lam)
    cr, cc = int(S_r * cut), int(S_c * cut)
    cx, cy = int(rng.integers(S_r)), int(rng.integers(S_c))
    return [min(max(cx - cr // 2, 0), S_r), min(max(cy - cc // 2, 0), S_c),
            min(max(cx + cr // 2, 0), S_r), min(max(cy + cc // 2, 0), S_c)]


@dataclass
class EpochViews:
    """The views of one epoch (see the module docstring) and how to turn them into inputs."""

    order: Tensor
    boxes: Tensor
    flips: Tensor
    lam: Tensor | None
    bbox: Tensor | None
    partner: Tensor | None
    batch_size: int
    out_size: int
    mix: str

    @property
    def n(self) -> int:
        return int(self.order.numel())

    @property
    def num_batches(self) -> int:
        return -(-self.n // self.batch_size)

    def span(self, b: int) -> tuple[int, int]:
        if not 0 <= b < self.num_batches:
            raise IndexError(f"batch {b} out of range (this epoch has {self.num_batches})")
        return b * self.batch_size, min((b + 1) * self.batch_size, self.n)

    def to_dict(self) -> dict:
        d = {"order": self.order, "boxes": self.boxes, "flips": self.flips,
             "batch_size": self.batch_size, "out_size": self.out_size, "mix": self.mix}
        for k in ("lam", "bbox", "partner"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EpochViews":
        return cls(d["order"], d["boxes"], d["flips"], d.get("lam"), d.get("bbox"),
                   d.get("partner"), int(d["batch_size"]), int(d["out_size"]), d["mix"])

    def inputs(self, images: Tensor, b: int, rows: Tensor | None = None,
               device: torch.device | str | None = None) -> Tensor:
        """The student's (and teacher's) input for batch b: (len(rows), C, S, S) float in [0, 1].

        images: the distilled set (N, C, H, W), on any device. rows: batch-local positions
        to build (default all; DDP ranks build their share). Only the images that the rows
        and their mixing partners need are cropped, so a rank's share is bit-identical to the
        same rows of the full batch."""
        s, e = self.span(b)
        device = torch.device(device) if device is not None else images.device
        rows = torch.arange(e - s) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        mixing = self.mix != "none"
        partner = self.partner[s:e].long() if mixing else None
        need = torch.unique(torch.cat([rows, partner[rows]])) if mixing else rows
        where = torch.full((e - s,), -1, dtype=torch.long)
        where[need] = torch.arange(len(need))
        src_idx = self.order[s:e].long()[need]
        src = images[src_idx].to(device, non_blocking=True)
        boxes = self.boxes[s:e][need].tolist()
        flips = self.flips[s:e][need].tolist()
        S = self.out_size
        views = []
        for k, (i, j, h, w) in enumerate(boxes):
            v = F.interpolate(src[k:k + 1, :, i:i + h, j:j + w].float(), size=(S, S),
                              mode="bilinear", align_corners=False, antialias=True)
            views.append(v.flip(-1) if flips[k] else v)
        x = torch.cat(views)
        out = x[where[rows]]
        if self.mix == "cutmix":
            r1, c1, r2, c2 = self.bbox[b].tolist()
            out[:, :, r1:r2, c1:c2] = x[where[partner[rows]], :, r1:r2, c1:c2]
        elif self.mix == "mixup":
            lam = float(self.lam[b])
            out = lam * out + (1.0 - lam) * x[where[partner[rows]]]
        return out


def make_views(spec: ViewSpec, epoch: int) -> EpochViews:
    """The views of ``epoch``: a function of (spec, epoch) only (see the module docstring)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [int(spec.seed) & (2**63 - 1), int(epoch), _TAG])))
    n, B = spec.n, spec.batch_size
    order = rng.permutation(n)
    boxes = _rrc_boxes(rng, n, spec.src_h, spec.src_w, (spec.min_scale, spec.max_scale))
    flips = rng.random(n) < 0.5
    lam = bbox = partner = None
    if spec.mix != "none":
        nb = spec.num_batches
        alpha = spec.cutmix_alpha if spec.mix == "cutmix" else spec.mixup_alpha
        lam = np.zeros(nb, dtype=np.float32)
        bbox = np.zeros((nb, 4), dtype=np.int64) if spec.mix == "cutmix" else None
        partner = np.zeros(n, dtype=np.int64)
        for b in range(nb):
            s, e = b * B, min((b + 1) * B, n)
            partner[s:e] = rng.permutation(e - s)
            # float32 first: the stored value is the one every later use sees
            lam[b] = np.float32(rng.beta(alpha, alpha))
            if spec.mix == "cutmix":
                bbox[b] = _cut_box(rng, spec.out_size, spec.out_size, float(lam[b]))
    cdt = int_dtype(max(spec.src_h, spec.src_w))
    return EpochViews(
        order=torch.from_numpy(order).to(torch.int32),
        boxes=torch.from_numpy(boxes).to(cdt),
        flips=torch.from_numpy(flips),
        lam=None if lam is None else torch.from_numpy(lam),
        bbox=None if bbox is None else torch.from_numpy(bbox).to(int_dtype(spec.out_size)),
        partner=None if partner is None else torch.from_numpy(partner).to(int_dtype(B)),
        batch_size=B, out_size=spec.out_size, mix=spec.mix)


def dense_from_topk(values: Tensor, indices: Tensor, num_classes: int) -> Tensor:
    """(n, k) top-k logits -> (n, num_classes) float32 logits, -inf outside the top k."""
    out = torch.full((values.shape[0], num_classes), float("-inf"), dtype=torch.float32,
                     device=values.device)
    return out.scatter_(1, indices.long(), values.float())


# --------------------------------------------------------------------------- inputs

def fingerprint_tensor(t: Tensor) -> str:
    """A cheap identity for a large tensor: shape, dtype, float64 sum and a strided sample."""
    t = t.detach().cpu().contiguous()
    flat = t.reshape(-1)
    step = max(1, flat.numel() // 1_000_000)
    h = hashlib.sha256()
    h.update(repr((tuple(t.shape), str(t.dtype))).encode())
    h.update(flat[::step].numpy().tobytes())
    h.update(repr(float(flat.double().sum())).encode())
    return h.hexdigest()[:16]


def fingerprint_model(m: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(m.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def resolve_distilled(distilled) -> tuple[dict, str | None]:
    from guard_fast.data.distilled import load_distilled

    if isinstance(distilled, dict):
        d, path = distilled, None
    else:
        d, path = load_distilled(distilled), str(Path(distilled).resolve())
    for k in ("images", "labels"):
        if k not in d:
            raise ValueError(f"the distilled set has no {k!r} entry")
    x, y = d["images"], d["labels"]
    if x.dim() != 4:
        raise ValueError(f"distilled images must be (N, C, H, W), got {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"image/label count mismatch: {x.shape[0]} images but labels of shape "
                         f"{tuple(y.shape)}")
    return d, path


def _arch_of(model: nn.Module) -> dict:
    """What the student needs to know about a teacher passed as a module (mean/std from the
    Normalized wrapper, when there is one)."""
    from guard_fast.models import Normalized

    if isinstance(model, Normalized):
        return {"model": type(model.model).__name__,
                "mean": [float(v) for v in model.mean.reshape(-1)],
                "std": [float(v) for v in model.std.reshape(-1)]}
    return {"model": type(model).__name__}


def resolve_teacher(teacher, arch: dict | None = None) -> tuple[nn.Module, dict, str | None]:
    if isinstance(teacher, (str, Path)):
        from guard_fast.runtime import teacher_path

        path = teacher_path(teacher)   # teacher.pt, or the squeeze folder holding it
        model, a = load_classifier(path)
        return model, dict(a), str(path.resolve())
    if isinstance(teacher, nn.Module):
        return teacher, dict(arch or _arch_of(teacher)), None
    raise TypeError(f"teacher must be a path to teacher.pt or an nn.Module, got {type(teacher)}")


@torch.no_grad()
def num_classes_of(model: nn.Module, spec: ViewSpec, images: Tensor, device) -> int:
    """The teacher's output width, from one view of the input size it will see."""
    x = make_views(spec, 0).inputs(images, 0, torch.tensor([0]), device)
    return int(model(x).shape[1])


@torch.no_grad()
def teacher_logits(teacher: nn.Module, x: Tensor, chunk: int | None) -> Tensor:
    if not chunk or chunk >= len(x):
        return teacher(x).float()
    return torch.cat([teacher(x[i:i + chunk]).float() for i in range(0, len(x), chunk)])


# --------------------------------------------------------------------------- relabel

def epoch_file(out: Path, epoch: int) -> Path:
    return Path(out) / f"epoch_{epoch:04d}.pt"


def dtype_name(dtype: torch.dtype | str) -> str:
    """The name (a DTYPES entry, when known) of a stored-logits dtype given either way."""
    if isinstance(dtype, torch.dtype):
        return {v: k for k, v in _DTYPES.items()}.get(dtype, str(dtype))
    return dtype


def storage_summary(out_dir) -> dict:
    """Bytes on disk per stored epoch (and in total) of a relabel folder, and the tensor
    payload of one epoch split into soft labels and views (the file adds torch.save's zip
    headers and 64-byte alignment, a few kB per file)."""
    out = Path(out_dir)
    sizes = {}
    e = 0
    while epoch_file(out, e).exists():
        sizes[e] = epoch_file(out, e).stat().st_size
        e += 1
    tot = sum(sizes.values())
    res = {"out": str(out), "epochs_stored": len(sizes), "bytes_per_epoch": sizes,
           "mean_bytes_per_epoch": tot / max(1, len(sizes)), "total_bytes": tot}
    f = out / "config.json"
    if f.exists():
        cfg = json.loads(f.read_text())
        v = make_views(ViewSpec(**cfg["views"]), 0).to_dict()
        n, K, k = cfg["views"]["n"], cfg["num_classes"], cfg["top_k"]
        dsize = _DTYPES[cfg["dtype"]].itemsize
        res["label_bytes_per_epoch"] = (n * K * dsize if k is None else
                                        n * k * (dsize + int_dtype(K).itemsize))
        res["view_bytes_per_epoch"] = sum(t.nbytes for t in v.values()
                                          if isinstance(t, torch.Tensor))
    return res


# --------------------------------------------------------------------------- readers

def store_config(path) -> dict:
    """The config.json of a relabel folder (its views, teacher and distilled set); a folder
    without one, or of another format, raises naming the problem."""
    f = Path(path) / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{Path(path)} holds no soft labels (no config.json): run the "
                                "relabel stage first")
    config = json.loads(f.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{f} is not a relabel folder of format {FORMAT}")
    return config


class SoftLabelStore:
    """Replays a relabel folder: ``batch(epoch, b)`` -> (inputs, target logits).

    images: the distilled images (N, C, H, W); default: loaded from the folder recorded in
    config.json. They must be the set that was relabelled (count and fingerprint checked).
    Targets are float32: an exact upcast of the stored fp16 logits; top-k stores give -inf
    outside the top k (see the module docstring). Inputs are built on ``device``."""

    def __init__(self, path, images: Tensor | None = None, device: str | torch.device = "cpu"):
        self.path = Path(path)
        self.config = store_config(self.path)
        self.spec = ViewSpec(**self.config["views"])
        self.num_classes = int(self.config["num_classes"])
        self.device = torch.device(device)
        n = 0
        while epoch_file(self.path, n).exists():
            n += 1
        self.epochs_available = n
        if images is None:
            dpath = self.config["distilled"].get("path")
            if not dpath:
                raise ValueError(f"{self.path} was relabelled from an in-memory set: pass its "
                                 "images")
            from guard_fast.data.distilled import load_distilled

            images = load_distilled(dpath)["images"]
        dd = self.config["distilled"]
        if images.shape[0] != dd["n_images"] or list(images.shape[1:]) != dd["image_shape"]:
            raise ValueError(f"image count mismatch: {self.path} was relabelled from "
                             f"{dd['n_images']} images of shape {dd['image_shape']}, got "
                             f"{images.shape[0]} of shape {list(images.shape[1:])}")
        if fingerprint_tensor(images.float()) != dd["fingerprint"]:
            raise ValueError(f"these images are not the distilled set {self.path} was "
                             "relabelled from (fingerprint differs): relabel them first")
        # kept in host memory (an ImageNet-scale set need not fit the GPU); each batch's
        # source images are gathered and copied to the device when its views are built
        self.images = images.float().cpu()
        self._cache: tuple[int, dict] | None = None

    @property
    def num_batches(self) -> int:
        return self.spec.num_batches

    def _load(self, epoch: int) -> dict:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        if not 0 <= epoch < self.epochs_available:
            raise ValueError(f"{self.path} stores {self.epochs_available} epochs; epoch {epoch} "
                             "is not there (relabel more epochs)")
        d = load_checkpoint(epoch_file(self.path, epoch))
        if d.get("format") != FORMAT or int(d.get("epoch", -1)) != epoch:
            raise ValueError(f"{epoch_file(self.path, epoch)} is not epoch {epoch} of this store")
        self._cache = (epoch, d)
        return d

    def views(self, epoch: int) -> EpochViews:
        return EpochViews.from_dict(self._load(epoch)["views"])

    def targets(self, epoch: int, b: int, rows: Tensor | None = None) -> Tensor:
        d = self._load(epoch)
        v = EpochViews.from_dict(d["views"])
        s, e = v.span(b)
        sel = slice(s, e) if rows is None else torch.as_tensor(rows, dtype=torch.long) + s
        if "logits" in d:
            t = d["logits"][sel].float()
        else:
            t = dense_from_topk(d["topk_values"][sel], d["topk_indices"][sel], self.num_classes)
        return t.to(self.device)

    def batch(self, epoch: int, b: int, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = self.views(epoch).inputs(self.images, b, rows, self.device)
        return x, self.targets(epoch, b, rows)


class OnlineSoftLabels:
    """The same views made on the fly, the teacher run on them each step; nothing stored.
    Targets are the teacher's float32 logits (the stored mode keeps them in fp16).

    teacher: a module taking [0, 1] pixels, or a teacher.pt path (loaded with
    guard_fast.runtime.load_classifier); ``arch`` is then its arch entry (for a module: what
    teacher_arch says, else its normalization). num_classes: default the teacher's output
    width on one view."""

    def __init__(self, teacher: nn.Module | str | Path, images: Tensor, spec: ViewSpec,
                 device: str | torch.device = "cpu", num_classes: int | None = None,
                 teacher_arch: dict | None = None):
        if images.shape[0] != spec.n:
            raise ValueError(f"image count mismatch: spec has {spec.n}, got {images.shape[0]}")
        self.device = torch.device(device)
        teacher, self.arch, _ = resolve_teacher(teacher, teacher_arch)
        self.teacher = teacher.to(self.device).eval()  # runs under no_grad
        # kept in host memory (an ImageNet-scale set need not fit the GPU); each batch's
        # source images are gathered and copied to the device when its views are built
        self.images = images.float().cpu()
        self.spec = spec
        self.num_classes = (num_classes if num_classes is not None else
                            num_classes_of(self.teacher, spec, self.images, self.device))
        self._cache: tuple[int, EpochViews] | None = None

    @property
    def num_batches(self) -> int:
        return self.spec.num_batches

    def views(self, epoch: int) -> EpochViews:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, make_views(self.spec, epoch))
        return self._cache[1]

    def batch(self, epoch: int, b: int, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = self.views(epoch).inputs(self.images, b, rows, self.device)
        return x, teacher_logits(self.teacher, x, None)
