"""Robust evaluation: clean accuracy and accuracy under each attack of a protocol, in one pass
over the data (tables and plots of the results: guard_fast.evaluate.report).

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

import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from guard_fast import convgrad
from guard_fast.attacks.base import Attack, eval_mode, parse_bytes
from guard_fast.attacks.protocols import Protocol, get_protocol
from guard_fast.evaluate.report import write_outputs

__all__ = ["robust_eval"]

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


def _check_budgets(batch_size, n_examples, eps, eps_sweep) -> Tuple[int, float, List[float]]:
    """(batch_size, eps, every eps in ascending order), each checked; names a bad value."""
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
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
    return int(batch_size), eps, sorted(eps_list)


def _build_attacks(prot: Protocol, attacks, model: nn.Module, sweep_eps: Sequence[float],
                   common: Mapping[str, Any]) -> Tuple[List[str], Dict[float, Dict[str, Attack]]]:
    """(attack names, {eps: {name: Attack}}): the protocol's attacks (all, or those named)
    or the given builders, built once per eps."""
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
    return names, built


@dataclass
class _Tally:
    """Correct counts and attack seconds per eps per attack, and the clean counts."""

    names: List[str]
    sweep_eps: List[float]
    counts: Dict[float, Dict[str, int]] = field(init=False)
    times: Dict[float, Dict[str, float]] = field(init=False)
    clean_correct: int = 0
    total: int = 0

    def __post_init__(self):
        self.counts = {e: {n: 0 for n in self.names} for e in self.sweep_eps}
        self.times = {e: {n: 0.0 for n in self.names} for e in self.sweep_eps}

    def block(self, e: float) -> Dict[str, Dict[str, Any]]:
        return {n: {"acc": _pct(self.counts[e][n], self.total), "correct": self.counts[e][n],
                    "total": self.total, "time_s": round(self.times[e][n], 4)}
                for n in self.names}


def _clean_batch(model: nn.Module, probe: Attack, x: torch.Tensor, y: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y) on the evaluation device and dtype, and the mask of clean-correct points."""
    dev = probe.device
    x = x.to(dev)
    y = y.to(dev)
    if not x.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got {x.dtype}")
    x = x.to(probe.dtype)
    with eval_mode(model), torch.no_grad():
        probe._labels_to_check = y.long()
        correct = probe.get_logits(x).argmax(1) == y
    return x, y, correct


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _attack_batch(model: nn.Module, probe: Attack, xa: torch.Tensor, ya: torch.Tensor,
                  built: Mapping[float, Mapping[str, Attack]], eps_free: set,
                  tally: _Tally) -> None:
    """Every attack at every eps on one batch (xa, ya), counted into tally. An attack not
    bounded by eps runs once per batch and its count stands at every eps."""
    reuse: Dict[str, int] = {}
    for e in tally.sweep_eps:
        for n in tally.names:
            if n in eps_free and n in reuse:
                tally.counts[e][n] += reuse[n]
                continue
            if xa.shape[0] == 0:
                got = 0
            else:
                _sync(probe.device)
                t0 = time.perf_counter()
                adv = built[e][n](xa, ya)
                with eval_mode(model), torch.no_grad():
                    got = int((probe.get_logits(adv).argmax(1) == ya).sum())
                _sync(probe.device)
                tally.times[e][n] += time.perf_counter() - t0
            tally.counts[e][n] += got
            if n in eps_free:
                reuse[n] = got


def _evaluate_batches(model: nn.Module, probe: Attack, prot: Protocol, data: DataLike,
                      built: Mapping[float, Mapping[str, Attack]], tally: _Tally, eps: float,
                      batch_size: int, n_examples: Optional[int], progress: bool) -> None:
    """The one pass over data: a clean forward per batch, then every attack on the points
    the protocol attacks (with robust_requires_clean, the clean-correct ones only)."""
    eps_free = {n for n in tally.names if not built[eps][n].eps_bounded}
    batches, n_total = _batches(data, batch_size, n_examples)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_total, desc=f"robust_eval[{prot.name}]", unit="img")
    for x, y in batches:
        if x.shape[0] == 0:
            continue
        x, y, correct = _clean_batch(model, probe, x, y)
        tally.clean_correct += int(correct.sum())
        tally.total += x.shape[0]
        if prot.robust_requires_clean:   # only clean-correct points can be robust
            idx = correct.nonzero().squeeze(1)
            xa, ya = x[idx], y[idx]
        else:
            xa, ya = x, y
        _attack_batch(model, probe, xa, ya, built, eps_free, tally)
        if bar is not None:
            bar.update(x.shape[0])
            bar.set_postfix({"clean": f"{_pct(tally.clean_correct, tally.total):.1f}",
                             **{n: f"{_pct(tally.counts[eps][n], tally.total):.1f}"
                                for n in tally.names}})
    if bar is not None:
        bar.close()
    if tally.total == 0:
        raise ValueError("data yielded no examples")


def _result(prot: Protocol, eps: float, with_sweep: bool, tally: _Tally,
            built: Mapping[float, Mapping[str, Attack]], seed: int, batch_size: int,
            dev: torch.device) -> Dict[str, Any]:
    """The result dict robust_eval returns (and writes)."""
    total = tally.total
    return {
        "protocol": prot.name,
        "eps": eps,
        "eps_255": eps * 255,
        "n_examples": total,
        "seed": seed,
        "batch_size": batch_size,
        "device": str(dev),
        "robust_definition": ("clean and adversarial both correct" if prot.robust_requires_clean
                              else "adversarial input classified correctly (as GUARD's code)"),
        "clean": {"acc": _pct(tally.clean_correct, total), "correct": tally.clean_correct,
                  "total": total},
        "attacks": tally.block(eps),
        "sweep": [{"eps": e, "eps_255": e * 255, "attacks": tally.block(e)}
                  for e in tally.sweep_eps] if with_sweep else [],
        "settings": {n: repr(built[eps][n]) for n in tally.names},
        # which CPU convolution backward kernel each shape used (guard_fast.convgrad): the
        # choice is timed per process, so it is recorded with the numbers
        "conv_backward": {"modes": sorted({getattr(a, "conv_backward", "-")
                                           for b in built.values() for a in b.values()}),
                          "choices": convgrad.choices() if dev.type == "cpu" else {}},
    }


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
        protocol: "standard" or "paper-code", or a Protocol (see guard_fast.attacks.protocols;
            Protocol.with_settings changes an attack's budget).
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
    batch_size, eps, sweep_eps = _check_budgets(batch_size, n_examples, eps, eps_sweep)
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
    names, built = _build_attacks(prot, attacks, model, sweep_eps, common)
    tally = _Tally(names, sweep_eps)
    _evaluate_batches(model, probe, prot, data, built, tally, eps, batch_size, n_examples,
                      progress)
    result = _result(prot, eps, bool(eps_sweep), tally, built, seed, batch_size, dev)
    if out_dir is not None:
        write_outputs(result, out_dir)
    return result
