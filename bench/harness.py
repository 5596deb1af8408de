"""Shared bench harness: warm-up, median with p20/p80, peak memory, and result rows.

Rows are appended (one JSON object per line) to bench/results/<area>.jsonl with the device
name, torch/triton versions, the git commit and the date, so a figure can always be traced
to the run and the machine that produced it.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: str | torch.device = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def _commit() -> str:
    """The code's commit: BENCH_COMMIT if set (a copy whose .git lags the working tree, as
    on a lent GPU machine, is told the commit by whoever sends it), else git's HEAD, with
    "+dirty" for uncommitted changes to tracked files."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=Path(__file__).parent,
                               timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def time_fn(fn: Callable[[], object], warmup: int = 2, reps: int = 5,
            device: str | torch.device = "cpu") -> dict:
    """Median / p20 / p80 wall time of fn() in ms, after `warmup` calls, and peak memory.

    Peak memory: on CUDA, torch's max_memory_allocated over the timed calls minus what was
    allocated before them; on CPU, the growth of the process's peak RSS over its RSS before
    the first call (meaningful when each variant runs in a fresh process, as the benches do).
    """
    device = torch.device(device)
    rss0 = _rss_mb()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
    q = torch.tensor(times, dtype=torch.float64)
    return {"median_ms": float(q.median()), "p20_ms": float(q.quantile(0.2)),
            "p80_ms": float(q.quantile(0.8)), "reps": reps, "warmup": warmup,
            "peak_mem_mb": round(float(peak), 1)}


def time_interleaved(fns: dict[str, Callable[[], object]], warmup: int = 1, reps: int = 5,
                     device: str | torch.device = "cpu",
                     reference: str | None = None) -> dict[str, dict]:
    """Wall times of several variants measured side by side: after `warmup` calls of each,
    `reps` rounds that call every variant once, in an order rotated each round, so that a
    slow spell of a shared machine falls on all of them. Per variant: median / p20 / p80 ms,
    and with `reference`, ratio_vs_ref = the median over rounds of this variant's time over
    the reference's in the same round (p20 / p80 too): the figure to quote on a noisy VM."""
    device = torch.device(device)
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    _sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            _sync(device)
            times[n].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for n in names:
        q = torch.tensor(times[n], dtype=torch.float64)
        row = {"median_ms": float(q.median()), "p20_ms": float(q.quantile(0.2)),
               "p80_ms": float(q.quantile(0.8)), "reps": reps, "warmup": warmup}
        if reference is not None:
            ratio = q / torch.tensor(times[reference], dtype=torch.float64)
            row.update(ratio_vs_ref=float(ratio.median()), ratio_p20=float(ratio.quantile(0.2)),
                       ratio_p80=float(ratio.quantile(0.8)))
        out[n] = row
    return out


def cuda_peak_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak CUDA memory of one call of fn beyond what was allocated before it (MiB)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)


class _LiveTensorBytes:
    """Counts the bytes of tensor storages created while active and not yet freed.

    A TorchDispatchMode sees every ATen op (backward ones too: on CPU the autograd engine
    runs them on the calling thread); each new output storage is counted until a weakref
    finalizer reports it freed (storage Python objects live as long as their C++ storage).
    Exact and deterministic, unlike RSS; tensors that existed before (parameters, inputs)
    are not counted, temporaries inside a custom op's kernel are not seen.
    """

    def __init__(self):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self
        self.live = self.peak = 0
        self._seen: set[int] = set()

        def freed(key: int, n: int) -> None:
            tracker.live -= n
            tracker._seen.discard(key)

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and not t.is_meta:
                        st = t.untyped_storage()
                        key = st.data_ptr()
                        if key and key not in tracker._seen:
                            tracker._seen.add(key)
                            tracker.live += st.nbytes()
                            tracker.peak = max(tracker.peak, tracker.live)
                            weakref.finalize(st, freed, key, st.nbytes())
                return out

        self.mode = Mode()


def peak_tensor_mb(fn: Callable[[], object]) -> float:
    """Peak of live tensor memory (MiB) allocated by one call of fn (see _LiveTensorBytes)."""
    import gc

    t = _LiveTensorBytes()
    with t.mode:
        out = fn()
    del out
    gc.collect()
    return t.peak / 2**20


def env_row(device: str | torch.device = "cpu") -> dict:
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = None
    return {"device": device_name(device), "torch": torch.__version__, "triton": tv,
            "commit": _commit(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "threads": torch.get_num_threads()}


def append_result(area: str, row: dict, results_dir: str | Path | None = None,
                  device: str | torch.device | None = None) -> dict:
    """Add the environment to `row` and append it to <results_dir>/<area>.jsonl."""
    out = Path(results_dir) if results_dir else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    full = {**env_row(device or row.get("device_type", "cpu")), **row}
    with open(out / f"{area}.jsonl", "a") as f:
        f.write(json.dumps(full) + "\n")
    return full


def table(rows: list[dict], cols: list[str]) -> str:
    """A small fixed-width text table for the terminal."""
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)))
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)
