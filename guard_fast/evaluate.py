"""Robust evaluation: clean accuracy and accuracy under each attack of a protocol, in one pass
over the data, with the paper's Table 2 layout and an accuracy-vs-eps plot.

    from guard_fast.evaluate import robust_eval, format_table
    res = robust_eval(model, (images, labels), protocol="standard", eps=1/255,
                      mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                      out_dir="runs/eval")
    print(format_table([res]))

Protocols ("paper-code", "standard") are defined in guard_fast.attacks.protocols. Each
batch gets a clean forward, then every attack of the protocol at every eps. Every attack
is seeded with `seed` and reseeds at every call (as torchattacks and fra31 do), so a
batch's result does not depend on the batches before it and reruns are identical.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from guard_fast import convgrad
from guard_fast.attacks.base import Attack, eval_mode, parse_bytes
from guard_fast.attacks.protocols import TABLE_COLUMNS, Protocol, get_protocol

__all__ = ["robust_eval", "format_table", "plot_eps_sweep"]

DataLike = Union[Dataset, DataLoader, Tuple[torch.Tensor, torch.Tensor], List[torch.Tensor]]


# ----------------------------------------------------------------------------- data
def _batches(data: DataLike, batch_size: int, n_examples: Optional[int]
             ) -> Tuple[Iterator[Tuple[torch.Tensor, torch.Tensor]], Optional[int]]:
    """Yield (images, labels) batches, stopping after n_examples; also return the total
    when it is known in advance (for the progress bar)."""
    if isinstance(data, (tuple, list)):
        if len(data) != 2 or not all(isinstance(t, torch.Tensor) for t in data):
            raise TypeError("data as a tuple must be (images, labels) tensors")
        images, labels = data
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"images and labels differ in length: {images.shape[0]} vs "
                             f"{labels.shape[0]}")
        n = images.shape[0] if n_examples is None else min(n_examples, images.shape[0])

        def gen():
            for s in range(0, n, batch_size):
                yield images[s:min(s + batch_size, n)], labels[s:min(s + batch_size, n)]
        return gen(), n
    if isinstance(data, DataLoader):
        loader = data
    elif isinstance(data, Dataset):
        loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    else:
        raise TypeError(f"data must be a Dataset, a DataLoader or (images, labels) tensors, "
                        f"got {type(data).__name__}")
    try:
        total = len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if total is not None and n_examples is not None:
        total = min(total, n_examples)

    def gen():
        seen = 0
        for batch in loader:
            x, y = batch[0], batch[1]
            if not isinstance(y, torch.Tensor):
                y = torch.as_tensor(y)
            if n_examples is not None:
                if seen >= n_examples:
                    return
                x, y = x[:n_examples - seen], y[:n_examples - seen]
            seen += x.shape[0]
            yield x, y
    return gen(), total


# ----------------------------------------------------------------------------- eval
def _pct(correct: int, total: int) -> float:
    return 100.0 * correct / total if total else float("nan")


def robust_eval(model: nn.Module, data: DataLike, protocol: Union[str, Protocol] = "standard",
                attacks: Union[None, Sequence[str], Mapping[str, Any]] = None,
                eps: float = 1 / 255, eps_sweep: Optional[Sequence[float]] = None,
                batch_size: int = 256, n_examples: Optional[int] = None, seed: int = 0,
                out_dir: Optional[str] = None, mean: Optional[Sequence[float]] = None,
                std: Optional[Sequence[float]] = None,
                device: Union[str, torch.device, None] = None, progress: bool = True,
                active_set: bool = True,
                memory_budget: Union[int, str, None] = None) -> Dict[str, Any]:
    """Clean accuracy and accuracy under each attack, in one pass over `data`.

    Args:
        model: the classifier (moved nowhere: it must live on `device`).
        data: a Dataset, a DataLoader, or (images, labels) tensors; images in [0, 1].
        protocol: "standard" or "paper-code" (see guard_fast.attacks.protocols).
        attacks: None (all of the protocol's), a list of the protocol's attack names, or a
            mapping name -> builder `f(model, eps, **common) -> Attack` for custom attacks.
        eps: the main L-inf budget.
        eps_sweep: optional further budgets; accuracy per attack per eps is reported
            (attacks not bounded by eps, CW L2, run once and are reported at every eps).
        batch_size: examples per batch (data given as a Dataset or tensors) and the chunk
            size of every attack.
        n_examples: evaluate the first n examples only.
        seed: seed of every attack (reseeded at every call).
        out_dir: if given, write results.json, table.md and (with eps_sweep)
            eps_sweep.png there, each atomically (temp file + os.replace).
        mean, std: per-channel normalization applied before the model.
        device: where to run (default: the model's device).
        progress: tqdm progress bar.
        active_set: passed to every attack (results do not depend on it).
        memory_budget: bytes an attack's chunk may use ("4GiB", ...): each attack splits a
            batch into the largest chunks that fit (Attack's memory_budget).

    Returns a dict: "clean" {"acc" (%), "correct", "total"}, "attacks" {name: {"acc",
    "correct", "total", "time_s"}} at `eps`, "sweep" [{"eps", "attacks"}] over
    sorted(set([eps] + eps_sweep)), and the settings.
    """
    prot = get_protocol(protocol)
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    batch_size = int(batch_size)
    if n_examples is not None and (int(n_examples) != n_examples or n_examples < 1):
        raise ValueError(f"n_examples must be an integer >= 1, got {n_examples!r}")
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    eps_list = [eps]
    for e in (eps_sweep or ()):
        e = float(e)
        if not math.isfinite(e) or e < 0:
            raise ValueError(f"eps_sweep values must be finite and >= 0, got {e!r}")
        if e not in eps_list:
            eps_list.append(e)
    sweep_eps = sorted(eps_list)

    probe = Attack(model, mean=mean, std=std, device=device)   # normalized clean forward
    dev = probe.device
    for p in model.parameters():
        if p.device != dev:
            raise ValueError(f"the model's parameters are on {p.device} but device={dev}; "
                             f"move the model first")
        break
    common = dict(mean=mean, std=std, device=dev, batch_size=batch_size, seed=seed,
                  active_set=active_set)
    if memory_budget is not None:
        common["memory_budget"] = parse_bytes(memory_budget, "memory_budget")

    # attacks per eps
    if attacks is None or isinstance(attacks, (list, tuple)):
        names = list(prot.attack_names if attacks is None else attacks)
        built = {e: prot.build(model, e, names, **common) for e in sweep_eps}
    elif isinstance(attacks, Mapping):
        names = list(attacks)
        built = {}
        for e in sweep_eps:
            built[e] = {}
            for n, f in attacks.items():
                if isinstance(f, Attack):
                    raise TypeError(f"attacks[{n!r}] must be a builder f(model, eps, **kw), "
                                    f"not an Attack instance (it is rebuilt per eps)")
                built[e][n] = f(model, e, **common)
    else:
        raise TypeError(f"attacks must be None, a list of names or a mapping of builders, "
                        f"got {type(attacks).__name__}")
    if not names:
        raise ValueError("no attacks to run")
    eps_free = {n for n in names if not built[eps][n].eps_bounded}

    counts = {e: {n: 0 for n in names} for e in sweep_eps}
    times = {e: {n: 0.0 for n in names} for e in sweep_eps}
    clean_correct = 0
    total = 0
    batches, n_total = _batches(data, batch_size, n_examples)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_total, desc=f"robust_eval[{prot.name}]", unit="img")

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    need_clean = prot.robust_requires_clean
    for x, y in batches:
        if x.shape[0] == 0:
            continue
        x = x.to(dev)
        y = y.to(dev)
        if not x.is_floating_point():
            raise ValueError(f"images must be floating point in [0, 1], got {x.dtype}")
        x = x.to(probe.dtype)
        with eval_mode(model), torch.no_grad():
            probe._labels_to_check = y.long()
            correct = probe.get_logits(x).argmax(1) == y
        n_clean = int(correct.sum())
        clean_correct += n_clean
        total += x.shape[0]
        if need_clean:       # only clean-correct points can be robust; attack those only
            idx = correct.nonzero().squeeze(1)
            xa, ya = x[idx], y[idx]
        else:
            xa, ya = x, y
        reuse: Dict[str, int] = {}
        for e in sweep_eps:
            for n in names:
                if n in eps_free and n in reuse:
                    counts[e][n] += reuse[n]
                    continue
                if xa.shape[0] == 0:
                    got = 0
                else:
                    atk = built[e][n]
                    sync()
                    t0 = time.perf_counter()
                    adv = atk(xa, ya)
                    with eval_mode(model), torch.no_grad():
                        got = int((probe.get_logits(adv).argmax(1) == ya).sum())
                    sync()
                    times[e][n] += time.perf_counter() - t0
                counts[e][n] += got
                if n in eps_free:
                    reuse[n] = got
        if bar is not None:
            bar.update(x.shape[0])
            bar.set_postfix({"clean": f"{_pct(clean_correct, total):.1f}",
                             **{n: f"{_pct(counts[eps][n], total):.1f}" for n in names}})
    if bar is not None:
        bar.close()
    if total == 0:
        raise ValueError("data yielded no examples")

    def block(e):
        return {n: {"acc": _pct(counts[e][n], total), "correct": counts[e][n], "total": total,
                    "time_s": round(times[e][n], 4)} for n in names}

    result: Dict[str, Any] = {
        "protocol": prot.name,
        "eps": eps,
        "eps_255": eps * 255,
        "n_examples": total,
        "seed": seed,
        "batch_size": batch_size,
        "device": str(dev),
        "robust_definition": ("clean and adversarial both correct" if need_clean else
                              "adversarial input classified correctly (as GUARD's code)"),
        "clean": {"acc": _pct(clean_correct, total), "correct": clean_correct, "total": total},
        "attacks": block(eps),
        "sweep": [{"eps": e, "eps_255": e * 255, "attacks": block(e)} for e in sweep_eps]
        if eps_sweep else [],
        "settings": {n: repr(built[eps][n]) for n in names},
        # which CPU convolution backward kernel each shape used (guard_fast.convgrad): the
        # choice is timed per process, so it is recorded with the numbers
        "conv_backward": {"modes": sorted({getattr(a, "conv_backward", "-")
                                           for b in built.values() for a in b.values()}),
                          "choices": convgrad.choices() if dev.type == "cpu" else {}},
    }
    if out_dir is not None:
        write_outputs(result, out_dir)
    return result


# ----------------------------------------------------------------------------- outputs
def _row_values(row: Mapping[str, Any]) -> Tuple[str, Dict[str, float]]:
    if "attacks" in row and "clean" in row:
        name = row.get("name") or f"{row.get('protocol', '?')} eps={row.get('eps_255', 0):g}/255"
        vals = {"Clean": row["clean"]["acc"]}
        vals.update({k: v["acc"] for k, v in row["attacks"].items()})
        return str(name), vals
    name = str(row.get("name", ""))
    return name, {k: float(v) for k, v in row.items() if k != "name"}


def format_table(rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None
                 ) -> str:
    """Markdown table, one row per evaluation, columns as the paper's Table 2 attack rows:
    Clean, PGD100, Square, AutoAttack, CW, MIM (then any further attacks).

    Each row is a robust_eval result (optionally with a "name") or a flat mapping
    {"name": ..., "Clean": 91.2, "PGD100": 40.1, ...}. Missing values print as "-".
    """
    parsed = [_row_values(r) for r in rows]
    if columns is None:
        columns = ["Clean", *TABLE_COLUMNS]
        for _, vals in parsed:
            columns += [k for k in vals if k not in columns]
    lines = ["| Model | " + " | ".join(columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name, vals in parsed:
        cells = [f"{vals[c]:.2f}" if c in vals and vals[c] == vals[c] else "-" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _atomic_write(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def plot_eps_sweep(result: Mapping[str, Any], path: str) -> None:
    """PNG of accuracy (%) vs eps (in 1/255 units), one line per attack, clean dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    sweep = result["sweep"] or [{"eps": result["eps"], "eps_255": result["eps_255"],
                                 "attacks": result["attacks"]}]
    xs = [s["eps_255"] for s in sweep]
    for name in result["attacks"]:
        ax.plot(xs, [s["attacks"][name]["acc"] for s in sweep], marker="o", label=name)
    ax.axhline(result["clean"]["acc"], color="gray", linestyle="--", label="Clean")
    ax.set_xlabel("eps (x 1/255)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{result['protocol']}, {result['n_examples']} examples")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _atomic_write(path, buf.getvalue())


def write_outputs(result: Mapping[str, Any], out_dir: str) -> Dict[str, str]:
    """results.json, table.md and (with a sweep) eps_sweep.png in out_dir, atomically."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"),
             "table": os.path.join(out_dir, "table.md")}
    _atomic_write(paths["json"], (json.dumps(result, indent=2) + "\n").encode())
    _atomic_write(paths["table"], format_table([result]).encode())
    if result.get("sweep"):
        paths["plot"] = os.path.join(out_dir, "eps_sweep.png")
        plot_eps_sweep(result, paths["plot"])
    return paths
