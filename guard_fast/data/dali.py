"""NVIDIA DALI loading of ImageFolder JPEGs (optional: pip install nvidia-dali-cuda130).

The pipeline mirrors ``transforms.build_transform`` for the ImageFolder kinds:
  "imagenet" train: decode with a random crop of area (0.08, 1) and aspect (3/4, 4/3)
             (fn.decoders.image_random_crop: only the crop is decoded), resize to (s, s),
             flip with p = 0.5;  val: resize shorter side to int(s / 0.875), centre crop s,
             with torchvision's rounding (matches torchvision to 1/255 per pixel: same
             libjpeg-turbo decode on CPU, both antialiased bilinear resamplers).
  "small"    [resize to (s, s) if native != s]; train: zero-pad 4, random s-crop at one of
             the 9x9 integer offsets, flip with p = 0.5; val: nothing more.
Output: float32 (B, 3, s, s) in [0, 1] (crop_mirror_normalize with mean 0, std 255), as torch.

Sample order and the rank split come from ``loader.EpochBatchSampler`` (the same order as
the torch loader); file bytes are read in Python and fed through fn.external_source, so
labels never pass through DALI. DALI's own random ops are seeded by mix(seed, epoch, rank):
deterministic per (seed, epoch, rank), but not bitwise equal to the torch path (different
JPEG decoder and resampler), only equal in distribution.

Devices: device="cuda" decodes with device="mixed" (nvJPEG) on the current CUDA device and
returns CUDA tensors; device="cpu" builds the pipeline with device_id=None, which runs on a
CPU-only machine (types.CPU_ONLY_DEVICE_ID does not work there) and returns CPU tensors.
"""
from __future__ import annotations

import numpy as np
import torch

from guard_fast.data.folder import check_image, header_problem
from guard_fast.data.loader import EpochBatchSampler, EpochSampled, mix_seed
from guard_fast.data.transforms import IMAGENET_CROP_PCT, IMAGENET_RATIO, IMAGENET_SCALE, SMALL_PADDING

try:
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, pipeline_def, types
    _IMPORT_ERROR: Exception | None = None
except Exception as e:  # ImportError, or a broken install raising at import
    fn = pipeline_def = types = dmath = None
    _IMPORT_ERROR = e


def dali_available() -> bool:
    """True when nvidia.dali imports."""
    return _IMPORT_ERROR is None


def build_pipeline(kind: str, image_size: int, train: bool, batch_size: int, num_threads: int = 2,
                   device_id: int | None = None, seed: int = 0, native_size: int | None = None):
    """A built DALI pipeline whose external_source "encoded" takes a list of JPEG byte arrays.

    device_id None: all on CPU; an int: mixed (GPU) decoding and GPU ops on that device.
    Batches may be smaller than batch_size (the maximum).
    """
    if not dali_available():
        raise ImportError(f"NVIDIA DALI is not importable ({_IMPORT_ERROR}); pip install nvidia-dali-cuda130")
    if kind not in ("imagenet", "small"):
        raise ValueError(f"DALI pipelines exist for ImageFolder kinds 'imagenet' and 'small', not {kind!r}")
    s = image_size
    dec = "cpu" if device_id is None else "mixed"

    @pipeline_def(batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id,
                  seed=seed % (1 << 31), prefetch_queue_depth=1, exec_dynamic=True)
    def pipe():
        enc = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        mirror = fn.random.coin_flip(probability=0.5) if train else 0
        if kind == "imagenet":
            if train:
                img = fn.decoders.image_random_crop(enc, device=dec, output_type=types.RGB,
                                                    random_area=list(IMAGENET_SCALE),
                                                    random_aspect_ratio=list(IMAGENET_RATIO), num_attempts=10)
                img = fn.resize(img, resize_x=s, resize_y=s, antialias=True)
                return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW",
                                                mean=[0.0], std=[255.0], mirror=mirror)
            # torchvision's geometry, to the pixel: Resize(S) makes the short side S and the long
            # side int(S * long / short); CenterCrop's offset is round((H' - s) / 2) with Python's
            # round-half-to-even (DALI's resize_shorter / crop round these differently, which
            # shifts the crop by a pixel). Shapes come from the JPEG header, on the CPU.
            size = int(s / IMAGENET_CROP_PCT)
            shape = fn.peek_image_shape(enc, dtype=types.INT32)
            h, w = shape[0], shape[1]
            new_long = (size * dmath.max(h, w)) // dmath.min(h, w)
            portrait = fn.cast(w <= h, dtype=types.INT32)
            new_w = portrait * size + (1 - portrait) * new_long
            new_h = portrait * new_long + (1 - portrait) * size
            img = fn.decoders.image(enc, device=dec, output_type=types.RGB)
            img = fn.resize(img, resize_x=fn.cast(new_w, dtype=types.FLOAT),
                            resize_y=fn.cast(new_h, dtype=types.FLOAT), antialias=True)
            dy, dx = new_h - s, new_w - s
            top = dy // 2 + (dy & 1) * ((dy // 2) & 1)  # round-half-even of dy / 2
            left = dx // 2 + (dx & 1) * ((dx // 2) & 1)
            img = fn.slice(img, start=fn.cast(fn.stack(top, left), dtype=types.INT32), shape=[s, s],
                           axis_names="HW")
            return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW",
                                            mean=[0.0], std=[255.0])
        img = fn.decoders.image(enc, device=dec, output_type=types.RGB)
        if native_size != s:
            img = fn.resize(img, resize_x=s, resize_y=s, antialias=True)
        if not train:
            return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW",
                                            mean=[0.0], std=[255.0])
        p = SMALL_PADDING
        # a centred (s + 2p) window over an s image = zero padding of p on every side
        img = fn.crop(img, crop=(s + 2 * p, s + 2 * p), out_of_bounds_policy="pad", fill_values=0)
        # crop_pos in [0, 1] maps to an offset pos * 2p; these values give the 2p + 1 integer ones
        offsets = [k / (2 * p) for k in range(2 * p + 1)]
        return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW", crop=(s, s),
                                        crop_pos_x=fn.random.uniform(values=offsets),
                                        crop_pos_y=fn.random.uniform(values=offsets),
                                        mean=[0.0], std=[255.0], mirror=mirror)

    p = pipe()
    p.build()
    return p


def read_encoded(path: str) -> np.ndarray:
    """The bytes of an image file for DALI, after the header checks of the torch path
    (folder.size_problem): DALI's decoders would allocate whatever a header claims, so a
    decompression bomb, a tiny image or a file PIL cannot identify is refused here, naming
    the file, before DALI sees it. Reading the header costs one PIL open of the bytes
    already in memory (no pixel is decoded)."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise ValueError(f"cannot read image file {path!r}: {e}") from None
    why = header_problem(data)
    if why is not None:
        raise ValueError(f"corrupt or non-image file {path!r}: {why}")
    return data


def _decode_failure(paths: list[str], e: Exception) -> str:
    """The message for a batch DALI failed to decode: the files PIL cannot decode either
    (full decode), else all of the batch's."""
    bad = [(p, why) for p in paths if (why := check_image(p)) is not None]
    if bad:
        return "; ".join(f"corrupt or non-image file {p!r}: {why}" for p, why in bad)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"DALI could not decode a batch of {len(paths)} files ({first}): {paths}"


def _to_torch(out, device: torch.device) -> torch.Tensor:
    t = out.as_tensor()
    if device.type == "cpu":
        return torch.from_numpy(np.array(t))
    from nvidia.dali.plugin.pytorch import feed_ndarray
    dst = torch.empty(t.shape(), dtype=torch.float32, device=device)
    feed_ndarray(t, dst, cuda_stream=torch.cuda.current_stream(device))
    return dst


class DALILoader(EpochSampled):
    """Iterable of (images (B, 3, s, s) float32 in [0, 1], labels (B,) int64) for one epoch.

    dataset: an ``ImageFolderDataset`` (its samples, kind, image_size and train flag are
    used; its torchvision transform is not). Same order / rank split / drop_last rules as
    ``loader.EpochLoader``; ``set_epoch`` works the same. workers: DALI CPU threads (>= 1).
    device: "cuda" | "cpu" | None (cuda when available). Images are on that device; labels
    are on the same device. pin_memory: pin CPU outputs (needs CUDA; ignored for "cuda").
    """

    backend = "dali"

    def __init__(self, dataset, batch_size: int, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                 workers: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1,
                 device: str | None = None, pin_memory: bool = False):
        if not dali_available():
            raise ImportError(f"NVIDIA DALI is not importable ({_IMPORT_ERROR}); pip install nvidia-dali-cuda130")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dataset, self.batch_size, self.seed, self.rank = dataset, batch_size, seed, rank
        self.num_threads = max(1, workers)
        self.pin_memory = pin_memory and self.device.type == "cpu"
        self.sampler = EpochBatchSampler(len(dataset), batch_size, shuffle, seed, epoch, drop_last, rank, world_size)
        self._pipe, self._pipe_epoch = None, None

    def _pipeline(self):
        ds = self.dataset
        device_id = self.device.index if self.device.type == "cuda" else None
        return build_pipeline(ds.kind, ds.image_size, ds.is_train, self.batch_size, self.num_threads,
                              device_id, mix_seed(self.seed, self.sampler.epoch, self.rank), ds.native_size)

    def __iter__(self):
        # a fresh pipeline per pass: its random stream then depends on (seed, epoch, rank) only
        pipe = self._pipeline()
        samples = self.dataset.samples
        for idx in self.sampler:
            paths = [samples[i][0] for i in idx]
            enc = [read_encoded(p) for p in paths]
            pipe.feed_input("encoded", enc)
            try:
                (out,) = pipe.run()
            except RuntimeError as e:  # DALI names neither the file nor the reason
                raise ValueError(_decode_failure(paths, e)) from None
            labels = torch.tensor([samples[i][1] for i in idx], dtype=torch.int64)
            images, labels = _to_torch(out, self.device), labels.to(self.device)
            if self.pin_memory:
                images, labels = images.pin_memory(), labels.pin_memory()
            yield images, labels
