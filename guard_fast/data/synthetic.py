"""Write small, learnable synthetic ImageFolder datasets of real image files (tests, benches).

Class c gets its own base colour (hue evenly spaced) and stripe orientation/frequency, plus
per-image noise and a random shift of the pattern, so a small CNN separates the classes
quickly while images within a class still differ.
"""
from __future__ import annotations

import colorsys
import os

import numpy as np
from PIL import Image


def synthetic_image(label: int, num_classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) uint8 image of class ``label``."""
    r, g, b = colorsys.hsv_to_rgb(label / max(1, num_classes), 0.8, 0.9)
    base = np.array([r, g, b], dtype=np.float32) * 255.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = np.pi * (label % 4) / 4.0
    freq = 2.0 + (label // 4) % 4
    phase = rng.uniform(0, 2 * np.pi)
    stripes = np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
    img = base[None, None, :] * (0.65 + 0.35 * stripes[..., None])
    img += rng.normal(0.0, 12.0, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def write_synthetic_imagefolder(root: str, num_classes: int, per_class: int, size: int,
                                splits: tuple[str, ...] = ("train", "val"), seed: int = 0,
                                fmt: str = "JPEG", tiny_val_layout: bool = False,
                                class_prefix: str = "n") -> list[str]:
    """Write root/<split>/<class>/<class>_<i>.<ext> for each split; return the class names.

    root: output folder (created). num_classes, per_class: images per class and split.
    size: image side in pixels. splits: split folder names. seed: numpy seed (private
    Generator; the global RNG is untouched). fmt: a PIL format ("JPEG", "PNG", ...).
    tiny_val_layout: write the Tiny-ImageNet layout instead: train/<wnid>/images/<files>
    (+ <wnid>_boxes.txt as in the real set) and val/images/val_<k>.<ext> with
    val/val_annotations.txt ("<file>\\t<wnid>\\t0\\t0\\t<size>\\t<size>" per line).
    Class names are WordNet-like ids "<class_prefix>%08d", sorted in label order.
    """
    if num_classes < 1 or per_class < 1 or size < 1:
        raise ValueError("num_classes, per_class and size must be positive")
    ext = {"JPEG": "JPEG", "PNG": "png"}.get(fmt.upper(), fmt.lower())
    classes = [f"{class_prefix}{i:08d}" for i in range(num_classes)]
    rng = np.random.default_rng(seed)
    save_kw = {"quality": 95} if fmt.upper() == "JPEG" else {}
    for split in splits:
        tiny_val = tiny_val_layout and split == "val"
        if tiny_val:
            img_dir = os.path.join(root, split, "images")
            os.makedirs(img_dir, exist_ok=True)
            lines = []
        k = 0
        for c, name in enumerate(classes):
            if not tiny_val:
                d = os.path.join(root, split, name, "images") if tiny_val_layout else os.path.join(root, split, name)
                os.makedirs(d, exist_ok=True)
                if tiny_val_layout:
                    open(os.path.join(root, split, name, f"{name}_boxes.txt"), "w").close()
            for i in range(per_class):
                im = Image.fromarray(synthetic_image(c, num_classes, size, rng))
                if tiny_val:
                    fname = f"val_{k}.{ext}"
                    im.save(os.path.join(img_dir, fname), format=fmt, **save_kw)
                    lines.append(f"{fname}\t{name}\t0\t0\t{size}\t{size}\n")
                    k += 1
                else:
                    im.save(os.path.join(d, f"{name}_{i}.{ext}"), format=fmt, **save_kw)
        if tiny_val:
            with open(os.path.join(root, split, "val_annotations.txt"), "w") as f:
                f.writelines(lines)
    return classes
