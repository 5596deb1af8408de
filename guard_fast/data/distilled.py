"""The distilled set on disk, shared by recover (SRe2L/CDA) and DC.

A distilled-set folder holds
  images.pt          {"images": float32 (N, C, H, W) in [0, 1], "labels": int64 (N,),
                      "ipc_ids": int64 (N,), "meta": dict}: the exact final pixels
  images/<class>/ipc_<k>.png   the same images as lossless 8-bit PNGs (an ImageFolder that
                      any SRe2L-style trainer reads), one file per ipc id
  grid.png           the distilled set as one picture (the paper's Figure 1): one column per
                      class, one row per ipc id (at most 10 rows and 20 columns)

All files are written atomically; images.pt is written last, so its presence marks a
complete set.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch

from guard_fast.runtime import atomic_torch_save, atomic_write_bytes, load_checkpoint

__all__ = ["save_distilled", "load_distilled", "write_grid", "to_png_bytes", "safe_class_dir"]


def safe_class_dir(name: str, index: int) -> str:
    """A folder name for a class: its name when that is a safe path part, else its index.
    The index prefix keeps ImageFolder's sorted order equal to the label order."""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("._") or "class"
    return f"{index:04d}_{clean}"


def to_png_bytes(img: torch.Tensor) -> bytes:
    """(C, H, W) float in [0, 1] -> PNG bytes (8-bit, round to nearest, lossless encoding)."""
    import io

    from PIL import Image

    if img.dim() != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"expected a (1 or 3, H, W) image, got shape {tuple(img.shape)}")
    u8 = (img.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    arr = u8[0].numpy() if u8.shape[0] == 1 else u8.permute(1, 2, 0).contiguous().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_grid(path: str | Path, images: torch.Tensor, labels: torch.Tensor,
               ipc_ids: torch.Tensor, max_rows: int = 10, max_cols: int = 20,
               pad: int = 2) -> None:
    """One column per class (first max_cols classes), one row per ipc id (first max_rows)."""
    classes = sorted(set(labels.tolist()))[:max_cols]
    rows = sorted(set(ipc_ids.tolist()))[:max_rows]
    c, h, w = images.shape[1:]
    grid = torch.ones(c, len(rows) * (h + pad) + pad, len(classes) * (w + pad) + pad)
    col_of = {k: i for i, k in enumerate(classes)}
    row_of = {k: i for i, k in enumerate(rows)}
    for img, y, r in zip(images, labels.tolist(), ipc_ids.tolist()):
        if y in col_of and r in row_of:
            top = pad + row_of[r] * (h + pad)
            left = pad + col_of[y] * (w + pad)
            grid[:, top:top + h, left:left + w] = img.detach().float().clamp(0, 1).cpu()
    atomic_write_bytes(path, to_png_bytes(grid))


def save_distilled(out: str | Path, images: torch.Tensor, labels: torch.Tensor,
                   ipc_ids: torch.Tensor, class_names: Sequence[str] | None = None,
                   meta: dict | None = None, write_pngs: bool = True) -> Path:
    """Write a distilled set (see the module docstring); returns the folder."""
    out = Path(out)
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    n = images.shape[0]
    if labels.shape != (n,) or ipc_ids.shape != (n,):
        raise ValueError(f"labels {tuple(labels.shape)} and ipc_ids {tuple(ipc_ids.shape)} must "
                         f"both be ({n},)")
    images = images.detach().float().clamp(0, 1).cpu().contiguous()
    labels = labels.detach().long().cpu()
    ipc_ids = ipc_ids.detach().long().cpu()
    nc = int(labels.max()) + 1 if n else 0
    names = list(class_names) if class_names else [str(i) for i in range(nc)]
    if write_pngs:
        for img, y, r in zip(images, labels.tolist(), ipc_ids.tolist()):
            d = out / "images" / safe_class_dir(names[y] if y < len(names) else str(y), y)
            atomic_write_bytes(d / f"ipc_{r:04d}.png", to_png_bytes(img))
        write_grid(out / "grid.png", images, labels, ipc_ids)
    atomic_torch_save(out / "images.pt", {"images": images, "labels": labels, "ipc_ids": ipc_ids,
                                          "meta": dict(meta or {}, class_names=names)})
    return out


def load_distilled(path: str | Path) -> dict:
    """Read images.pt from a distilled-set folder (or the file itself), checking its entries."""
    path = Path(path)
    f = path / "images.pt" if path.is_dir() else path
    if not f.is_file():
        raise FileNotFoundError(f"{path} holds no distilled set (no images.pt): run the recover "
                                "(or dc) stage first")
    d = load_checkpoint(f)
    for k in ("images", "labels", "ipc_ids", "meta"):
        if k not in d:
            raise ValueError(f"{f} is not a distilled set: entry {k!r} is missing")
    return d
