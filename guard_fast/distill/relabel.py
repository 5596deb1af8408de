"""Relabel: FKD-style soft labels for a distilled set (SRe2L's third stage).

The views, the folder format and the readers are guard_fast.data.softlabels'; this module
runs the teacher on every view and writes the folder.

Multi-process: under torchrun (env RANK/WORLD_SIZE) epoch e is made by rank e % world_size
(no communication but barriers; the files equal a single process's). Command line:
``python -m guard_fast.train relabel`` (its options are RelabelConfig's fields; unset ones
take the student preset of the distilled set's data set, guard_fast.config.resolve_relabel).
"""
from __future__ import annotations

import time
from typing import Any

import torch

from guard_fast.config.relabel import DTYPES, check_relabel
from guard_fast.data.softlabels import (FORMAT, ViewSpec, dtype_name, epoch_file,
                                        fingerprint_model, fingerprint_tensor, int_dtype,
                                        make_views, num_classes_of, resolve_distilled,
                                        resolve_teacher, storage_summary, teacher_logits)
from guard_fast.runtime import (RunFolder, all_gather_object, atomic_torch_save,
                                atomic_write_json, check_finite_tensor, check_finite_weights,
                                distributed, resolve_device)

__all__ = ["relabel"]

_DTYPES = {name: getattr(torch, name) for name in DTYPES}


def relabel(teacher, distilled, out_dir, epochs: int, batch_size: int, seed: int = 0,
            top_k: int | None = None, dtype: torch.dtype | str = torch.float16,
            device: str | torch.device = "auto", *, out_size: int | None = None,
            min_scale: float = 0.08, max_scale: float = 1.0, mix: str = "cutmix",
            cutmix_alpha: float = 1.0, mixup_alpha: float = 0.8,
            teacher_arch: dict | None = None, teacher_chunk: int | None = None,
            progress: bool = False) -> dict:
    """Run the teacher (eval mode) on every view of ``epochs`` epochs and store them.

    teacher: path to a teacher.pt (squeeze) or a module taking [0, 1] pixels.
    distilled: a distilled-set folder / images.pt, or its dict (images, labels, ...).
    top_k: store only the k largest logits per view (None: all). dtype: of the stored logits
    (float16 as in the public --use-fp16; bfloat16 or float32 also accepted).
    out_size: the input side (default: the distilled images' height). teacher_chunk: run
    the teacher on at most this many views at a time (memory; default the whole batch).
    The settings are checked against RelabelConfig's declarations before any work is done.

    Returns (and writes to summary.json) the storage per epoch in bytes and what was done.
    """
    t_start = time.perf_counter()
    dname = dtype_name(dtype)
    check_relabel(out=str(out_dir), epochs=epochs, batch_size=batch_size, seed=seed, top_k=top_k,
                  dtype=dname, out_size=out_size, min_scale=min_scale, max_scale=max_scale,
                  mix=mix, cutmix_alpha=cutmix_alpha, mixup_alpha=mixup_alpha,
                  teacher_chunk=teacher_chunk, progress=progress)
    if epochs is None or batch_size is None:
        raise ValueError("relabel needs epochs and batch_size (guard_fast.config.resolve_relabel "
                         "takes them from the student preset)")
    with distributed(resolve_device(device)) as d:  # torchrun: epoch e is made on rank e % world
        model, arch, tpath = resolve_teacher(teacher, teacher_arch)
        ds, dpath = resolve_distilled(distilled)
        images, labels = ds["images"].float(), ds["labels"].long()
        # NaN views or a NaN teacher would be stored as NaN soft labels, found only by student
        check_finite_tensor("relabel", "images", images, f"the distilled set {dpath or ''}")
        check_finite_weights("relabel", model, f"the teacher {tpath or ''}")
        N, C, H, W = images.shape
        spec = ViewSpec(n=N, src_h=H, src_w=W, out_size=int(out_size or H),
                        batch_size=batch_size, seed=seed, min_scale=min_scale,
                        max_scale=max_scale, mix=mix, cutmix_alpha=cutmix_alpha,
                        mixup_alpha=mixup_alpha)
        was_training = model.training
        model = model.to(d.device).eval()  # BatchNorm running statistics, as the public eval()
        try:
            folder, K, k_eff = _run_folder(model, arch, tpath, images, labels, dpath, spec,
                                           out_dir, epochs, top_k, dname, d)
            written, skipped = _store_epochs(model, images, spec, folder, epochs, K, k_eff,
                                             _DTYPES[dname], teacher_chunk, progress, d)
            summary = storage_summary(folder.out)
            summary.update(epochs_written=written, epochs_skipped=skipped,
                           seconds=time.perf_counter() - t_start)
            if d.is_main:
                atomic_write_json(folder.path("summary.json"), summary)
                folder.complete(epochs_stored=summary["epochs_stored"])
            return summary
        finally:
            model.train(was_training)


def _run_folder(model, arch, tpath, images, labels, dpath, spec, out_dir, epochs, top_k, dname,
                d) -> tuple[RunFolder, int, int | None]:
    """The relabel folder, checked (before anything is written) and started.

    Its config holds every setting the stored files depend on, with fingerprints of the
    teacher's weights and of the distilled images and labels, so a rerun on another teacher
    or set is refused (naming e.g. ``teacher.fingerprint``) while the same run continues:
    only ``epochs`` (the config keeps the largest number asked for) and the two paths (the
    fingerprints identify what they name: a moved folder resumes) may differ.
    Returns the folder, the teacher's class count K and the effective top k (None: all)."""
    N, C, H, W = images.shape
    K = num_classes_of(model, spec, images, d.device)
    if int(labels.max()) >= K:
        raise ValueError(f"class count mismatch: the distilled labels go up to {int(labels.max())} "
                         f"but the teacher has {K} classes")
    k_eff = None if top_k is None or top_k >= K else int(top_k)
    config = {
        "format": FORMAT, "views": spec.to_dict(), "epochs": int(epochs),
        "num_classes": K, "in_channels": C, "top_k": k_eff, "dtype": dname,
        "interpolation": "bilinear, align_corners=False, antialias=True",
        "teacher": {"arch": arch, "path": tpath, "fingerprint": fingerprint_model(model)},
        "distilled": {"path": dpath, "n_images": N, "image_shape": [C, H, W],
                      "fingerprint": fingerprint_tensor(images),
                      "labels_fingerprint": fingerprint_tensor(labels)},
        "relabel_device_type": d.device.type,
    }
    # the fingerprints identify teacher and images: their paths may change (a moved folder)
    folder = RunFolder(out_dir, "relabel", config, resume="auto",
                       resumable={"epochs", "teacher.path", "distilled.path"})
    old = folder.check()
    if old is not None:
        folder.config["epochs"] = max(int(old.get("epochs", 0)), int(epochs))
    d.barrier()  # every rank has checked the folder before rank 0 writes to it
    if d.is_main:
        folder.start()
    return folder, K, k_eff


def _store_epochs(model, images, spec, folder, epochs, K, k_eff, dtype, chunk, progress,
                  d) -> tuple[list[int], list[int]]:
    """This rank's epochs (rank, rank + world, ...), one atomic file each; a file that exists
    is complete and skipped. Returns the epochs written and skipped by all ranks."""
    from tqdm.auto import tqdm

    written, skipped = [], []
    for e in tqdm(range(d.rank, epochs, d.world), desc="relabel",
                  disable=not progress or not d.is_main, leave=False):
        f = epoch_file(folder.out, e)
        if f.exists():  # written atomically: present means complete
            skipped.append(e)
            continue
        atomic_torch_save(f, _epoch_payload(model, images, spec, e, K, k_eff, dtype, chunk,
                                            d.device))
        written.append(e)
    d.barrier()
    got = all_gather_object((written, skipped))
    return sorted(e for w, _ in got for e in w), sorted(e for _, sk in got for e in sk)


def _epoch_payload(model, images, spec, epoch, K, k_eff, dtype, chunk, device) -> dict:
    """One epoch file: its views and the teacher's logits on them in position order (all K,
    or the top k values and their class indices), in the stored dtype."""
    views = make_views(spec, epoch)
    logits = torch.cat([teacher_logits(model, views.inputs(images, b, device=device), chunk).cpu()
                        for b in range(views.num_batches)])
    payload: dict[str, Any] = {"format": FORMAT, "epoch": epoch, "views": views.to_dict(),
                               "num_classes": K}
    if k_eff is None:
        payload["logits"] = logits.to(dtype)
    else:
        v, i = logits.topk(k_eff, dim=1)
        payload["topk_values"] = v.to(dtype)
        payload["topk_indices"] = i.to(int_dtype(K))
    return payload
