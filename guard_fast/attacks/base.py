"""The base class every attack in guard_fast.attacks derives from, and the attack registry.

`Attack` owns what torchattacks' base class owns, plus the checks it leaves out:

* model mode: the model runs in eval mode during the attack (BatchNorm uses its running
  statistics, Dropout is off); every module's previous `training` flag is put back
  afterwards, also when the attack raises. Parameters are frozen (requires_grad=False)
  for the duration, so autograd keeps no activations that only weight gradients need;
  their flags are restored too.
* input normalization: attacks work on pixels in [0, 1]; an optional per-channel
  mean/std is applied just before the model (what torchattacks' `set_normalization_used`
  and GUARD's NormalizeByChannelMeanStd do).
* device and dtype: inputs are moved to the attack's device (default: the model's) and
  cast to its dtype (default: the model's floating dtype); the adversarial images come
  back on the caller's device and dtype.
* the torchattacks call: ``adv = atk(images, labels)``, images (N, ...) in [0, 1], labels
  (N,) integer class indices.
* chunking: `batch_size` splits a large call into independent chunks, each run exactly
  as a separate call would run (attacks that reseed per call, as torchattacks' and
  fra31's do, reseed per chunk).
* validation with errors that name the offending value: eps < 0, steps < 1, images
  outside [0, 1] (ValueError), non-integer or out-of-range labels, a model whose output
  is not (N, n_classes).

Subclasses implement `_attack(x, y) -> x_adv` on a validated chunk that already lives on
the attack's device and dtype, with the model in eval mode.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Dict, Iterable, Optional, Sequence, Type, Union

import torch
from torch import nn

from .. import convgrad
from .graphs import CudaGraphMode, check_cuda_graph

__all__ = ["Attack", "register_attack", "get_attack", "list_attacks", "attack_registry",
           "check_eps", "check_steps", "check_positive", "parse_bytes"]


# ----------------------------------------------------------------------------- checks
def check_eps(eps, name: str = "eps") -> float:
    if eps is None:
        raise ValueError(f"{name} must be given (got None)")
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {eps!r}")
    return eps


def check_steps(steps, name: str = "steps") -> int:
    if isinstance(steps, bool) or int(steps) != steps:
        raise ValueError(f"{name} must be an integer >= 1, got {steps!r}")
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {steps!r}")
    return steps


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value, name: str = "memory_budget") -> int:
    """An integer number of bytes, or a string with a unit ("512MiB", "2 GB", "1e9")."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number of bytes or a string like '2GiB', got {value!r}")
    if isinstance(value, (int, float)):
        num, unit = float(value), ""
    elif isinstance(value, str):
        import re
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{name} must be a number of bytes or a string like '512MiB' or "
                             f"'2GB', got {value!r}")
        num, unit = float(m.group(1)), m.group(2).lower()
    else:
        raise ValueError(f"{name} must be a number of bytes or a string like '2GiB', got "
                         f"{type(value).__name__}")
    out = int(num * _UNITS[unit])
    if not math.isfinite(num) or out < 1:
        raise ValueError(f"{name} must be at least 1 byte, got {value!r}")
    return out


def check_positive(value, name: str, allow_zero: bool = False) -> float:
    value = float(value)
    bad = (value < 0) if allow_zero else (value <= 0)
    if not math.isfinite(value) or bad:
        rel = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {rel}, got {value!r}")
    return value


# ----------------------------------------------------------------------------- model mode
@contextlib.contextmanager
def eval_mode(model: nn.Module, freeze_params: bool = True):
    """Run `model` in eval mode (and with frozen parameters); restore every module's
    previous training flag and every parameter's requires_grad afterwards, even on error."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()] if freeze_params else []
    try:
        model.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        yield model
    finally:
        for m, flag in modes:
            m.training = flag
        for p, flag in grads:
            p.requires_grad_(flag)


def _canonical_device(device) -> torch.device:
    """torch.device with the index filled in ("cuda" -> "cuda:<current>"), so that it
    compares equal to the device of tensors that live there."""
    d = torch.device(device)
    if d.index is None and d.type == "cuda" and torch.cuda.is_available():
        d = torch.device("cuda", torch.cuda.current_device())
    return d


def _model_device_dtype(model: nn.Module):
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device, torch.get_default_dtype()
    return torch.device("cpu"), torch.get_default_dtype()


# ----------------------------------------------------------------------------- base class
class Attack:
    """Base class: model mode, normalization, device/dtype, validation and the call.

    Args:
        model: a classifier mapping (N, C, H, W) inputs to (N, n_classes) logits.
        eps: the perturbation budget of eps-bounded attacks, in [0, 1] pixel units.
        mean, std: optional per-channel normalization applied before the model
            (the attack itself works on [0, 1] pixels).
        device: where the attack runs (default: the model's device).
        dtype: the floating dtype of the attack's arithmetic (default: the model's).
        batch_size: chunk size for large calls (None: one chunk).
        seed: seed of the attack's own random generator (stochastic attacks reseed it at
            every chunk, as torchattacks and fra31's code do at every call).
        active_set: let points that are already misclassified stop costing forward and
            backward passes, where the attack's semantics allow it (the result does not
            depend on this flag; see each attack's docstring).
        memory_budget: bytes one chunk may use (an int, or a string such as "512MiB",
            "2GB"): the chunk size becomes the largest that fits, from a probe of the
            activations autograd saves per sample plus the attack's own per-sample state
            (see `per_sample_bytes`); with `batch_size` too, the smaller of the two wins.
        cuda_graph: capture the step loop (PGD, MIM, APGD's and FAB's
            iterations, Square's queries) in a CUDA graph and replay it: "auto" (default)
            on CUDA for loops of >= 8 steps unless memory_budget is set (a graph keeps its
            own memory pool, which the budget does not cover), True (an error off CUDA),
            False. Same points either way (attacks/graphs.py).
        conv_backward: which kernel computes convolution backwards on the CPU
            (guard_fast.convgrad): "auto" (per convolution shape, the faster of PyTorch's
            oneDNN kernel and ATen's im2col kernel; 2x on the first layers of small CNNs),
            "pytorch" (PyTorch's own choice: bit-identical to torchattacks and fra31's
            code), "im2col"; None (default): $GUARD_FAST_CONV_BACKWARD, else "auto". The
            kernels round differently (gradients agree to ~1e-5 relative). No effect on CUDA.
    """

    #: registry name of the attack
    name: str = "Attack"
    #: the threat model's norm ("Linf", "L2")
    norm: str = "Linf"
    #: False for attacks whose perturbation is not bounded by eps (CW L2)
    eps_bounded: bool = True

    def __init__(self, model: nn.Module, eps: Optional[float] = None, *,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None,
                 batch_size: Optional[int] = None, seed: Optional[int] = 0,
                 active_set: bool = True, cuda_graph: CudaGraphMode = "auto",
                 memory_budget: Union[int, str, None] = None,
                 conv_backward: Optional[str] = None):
        if not isinstance(model, nn.Module) and not callable(model):
            raise TypeError(f"model must be a torch.nn.Module or callable, got {type(model).__name__}")
        self.model = model
        self.eps = None if eps is None else check_eps(eps)
        m_dev, m_dtype = _model_device_dtype(model) if isinstance(model, nn.Module) else (
            torch.device("cpu"), torch.get_default_dtype())
        self.device = _canonical_device(device) if device is not None else m_dev
        self.dtype = dtype if dtype is not None else m_dtype
        if not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {self.dtype}")
        if batch_size is not None:
            batch_size = check_steps(batch_size, "batch_size")
        self.batch_size = batch_size
        if seed is not None and (isinstance(seed, bool) or int(seed) != seed):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        self.seed = None if seed is None else int(seed)
        self.active_set = bool(active_set)
        self.cuda_graph = check_cuda_graph(cuda_graph)
        self.memory_budget = None if memory_budget is None else parse_bytes(memory_budget,
                                                                              "memory_budget")
        if self.memory_budget is not None and self.cuda_graph == "auto":
            # a captured graph keeps its own memory pool next to the eager warm-up's, which
            # the budget's estimate does not cover (H200, PGD-20 in chunks of 376: 798 MiB
            # peak with the graph, 27 MiB without, for a 16 MiB budget)
            self.cuda_graph = False
        self.conv_backward = (convgrad.default_mode() if conv_backward is None
                              else convgrad.check_mode(conv_backward))
        #: per input shape, whether input gradients run under the conv_backward mode
        #: ("mode") or plain autograd ("plain"); see input_grad
        self.conv_plan: dict = {}
        self.set_normalization(mean, std)
        self._labels_to_check: Optional[torch.Tensor] = None
        self.n_classes: Optional[int] = None

    # ------------------------------------------------------------------ normalization
    def set_normalization(self, mean, std) -> None:
        """Per-channel (x - mean) / std applied before the model; None disables it."""
        if (mean is None) != (std is None):
            raise ValueError(f"mean and std must be given together (got mean={mean!r}, std={std!r})")
        if mean is None:
            self._mean = self._std = None
            return
        mean_t = torch.as_tensor(mean, dtype=torch.float64).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float64).flatten()
        if mean_t.numel() != std_t.numel():
            raise ValueError(f"mean and std must have the same length, got {mean_t.numel()} and "
                             f"{std_t.numel()}")
        if not bool((std_t > 0).all()):
            raise ValueError(f"std must be > 0 everywhere, got {std_t.tolist()}")
        shape = (1, -1, 1, 1)
        self._mean = mean_t.view(shape).to(self.device, self.dtype)
        self._std = std_t.view(shape).to(self.device, self.dtype)

    # ------------------------------------------------------------------ model access
    def get_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the model on [0, 1] inputs `x` (normalization applied here)."""
        if self._mean is not None:
            if x.dim() != 4 or x.shape[1] != self._mean.shape[1]:
                raise ValueError(f"normalization has {self._mean.shape[1]} channels but the "
                                 f"images have shape {tuple(x.shape)}")
            x = (x - self._mean) / self._std
        out = self.model(x)
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0] \
                or out.shape[1] < 2:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the model must return logits of shape (N, n_classes) with "
                             f"N={x.shape[0]} and n_classes >= 2; it returned {shape}")
        if self._labels_to_check is not None:
            self._check_label_range(self._labels_to_check, out.shape[1])
            self._labels_to_check = None
        self.n_classes = out.shape[1]
        return out

    def conv_backward_block(self, device=None):
        """A block in which CPU convolution backwards use this attack's `conv_backward`
        choice (guard_fast.convgrad). Only backward passes run in it: the dispatch mode
        that makes the choice costs a few microseconds per op it sees."""
        return convgrad.conv_backward(self.conv_backward, self.device if device is None
                                      else device)

    def input_grad(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """d output / d x (output a scalar), computed under `conv_backward_block`.

        With "auto", the block's dispatch mode costs ~15-25 us per op of the backward it
        sees (30+ ops for APGD's DLR loss), which can outweigh the faster convolution kernel
        on small batches. So, per input shape (batch bucketed to a power of two, as the
        kernel choice is), the first backwards decide whether to use it at all: the first
        runs under the mode (and makes the kernel choices); if it ran no im2col kernel, the
        mode is dropped for that shape; else one backward with and one without the mode
        are timed, and the faster way is kept (`conv_plan` lists the decisions).
        "im2col" always uses the mode."""
        if self.conv_backward == "pytorch" or x.device.type != "cpu":
            grad, = torch.autograd.grad(output, x)
            return grad
        if self.conv_backward == "im2col" or convgrad.block_active():
            with convgrad.conv_backward(self.conv_backward, x.device):
                grad, = torch.autograd.grad(output, x)
            return grad
        key = ((convgrad.batch_bucket(x.shape[0]),) + tuple(x.shape[1:]), x.dtype,
               torch.get_num_threads())
        plans = self.conv_plan
        plan = plans.get(key)
        if plan == "plain" or (isinstance(plan, tuple) and plan[0] == "timed"):
            t0 = time.perf_counter()
            grad, = torch.autograd.grad(output, x)
            if plan != "plain":   # mode vs plain: keep the mode only when clearly faster
                t_plain = time.perf_counter() - t0
                plans[key] = "mode" if plan[1] * 1.05 < t_plain else "plain"
            return grad
        before = convgrad.im2col_calls()
        t0 = time.perf_counter()
        with convgrad.conv_backward(self.conv_backward, x.device):
            grad, = torch.autograd.grad(output, x)
        if plan is None:
            plans[key] = "plain" if convgrad.im2col_calls() == before else "probe"
        elif plan == "probe":
            plans[key] = ("timed", time.perf_counter() - t0)
        return grad

    @staticmethod
    def _check_label_range(labels: torch.Tensor, n_classes: int) -> None:
        if labels.numel() == 0:
            return
        lo, hi = torch.aminmax(labels)
        lo, hi = int(lo), int(hi)  # one host sync per call, outside any step loop
        if lo < 0 or hi >= n_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"labels must lie in [0, {n_classes - 1}] for a model with "
                             f"{n_classes} classes; got label {bad}")

    def cpu_generator(self) -> torch.Generator:
        """A CPU generator seeded with `seed`. Random starts are drawn on the CPU and moved
        to the device, exactly as torchattacks and fra31's code draw them after
        torch.manual_seed(seed), so the same seed gives the same draws."""
        g = torch.Generator(device="cpu")
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g

    # ------------------------------------------------------------------ the call
    def _validate(self, images, labels):
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point pixels in [0, 1], got dtype "
                             f"{images.dtype}")
        if images.dim() < 2:
            raise ValueError(f"images must have shape (N, ...), got {tuple(images.shape)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integer class indices (torch.long), got dtype "
                             f"{labels.dtype}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must have shape ({images.shape[0]},) to match images "
                             f"{tuple(images.shape)}, got {tuple(labels.shape)}")
        if images.numel():
            lo, hi = torch.aminmax(images.detach())
            lo, hi = float(lo), float(hi)
            if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
                raise ValueError(f"images must lie in [0, 1] (attacks work on pixels; pass "
                                 f"mean/std for normalized models); got min {lo:.6g}, max {hi:.6g}")

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._validate(images, labels)
        out_device, out_dtype = images.device, images.dtype
        x_all = images.detach().to(self.device, self.dtype)
        y_all = labels.detach().to(self.device, torch.long)
        n = x_all.shape[0]
        if n == 0:
            return images.detach().clone()
        bs = self.batch_size or n
        chunks = []
        model = self.model if isinstance(self.model, nn.Module) else None
        ctx = eval_mode(model) if model is not None else contextlib.nullcontext()
        with ctx, torch.enable_grad():
            if self.memory_budget is not None:
                bs = min(bs, self.chunk_for_budget(x_all, y_all))
            for start in range(0, n, bs):
                x, y = x_all[start:start + bs], y_all[start:start + bs]
                self._labels_to_check = y
                try:
                    adv = self._attack(x, y)
                finally:
                    self._labels_to_check = None
                chunks.append(adv.detach())
        adv = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        return adv.to(out_device, out_dtype)

    forward = __call__  # torchattacks spells the call `forward` too

    #: per-sample copies of the image the attack keeps besides the network's activations
    #: (x, x_adv, gradient, momentum or best point, bounds, candidate): an upper bound
    #: for every attack here
    state_copies: int = 6

    def per_sample_bytes(self, x: torch.Tensor, y: torch.Tensor) -> int:
        """Bytes one more sample costs a chunk: the activations autograd saves for one
        forward + loss + input-gradient pass (measured on probes of 1 and 3 samples, so the
        parameters and other fixed tensors cancel out) plus `state_copies` images. An
        estimate: allocator rounding and workspaces come on top, so leave headroom."""
        def saved_bytes(k: int) -> int:
            seen, total = set(), [0]

            def pack(t):
                st = t.untyped_storage()
                key = (st.data_ptr(), st.nbytes())
                if key not in seen:
                    seen.add(key)
                    total[0] += st.nbytes()
                return t

            xa = x[:k].detach().clone().requires_grad_(True)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = torch.nn.functional.cross_entropy(self.get_logits(xa), y[:k],
                                                         reduction="sum")
            torch.autograd.grad(loss, xa)
            return total[0]

        k = min(3, x.shape[0])
        act = saved_bytes(1) if k < 2 else max(saved_bytes(k) - saved_bytes(1), 0) // (k - 1)
        return int(act + self.state_copies * x[0].numel() * x.element_size())

    def chunk_for_budget(self, x: torch.Tensor, y: torch.Tensor) -> int:
        """The largest chunk whose estimated memory (per_sample_bytes) fits memory_budget."""
        per = self.per_sample_bytes(x, y)
        chunk = self.memory_budget // max(per, 1)
        if chunk < 1:
            raise ValueError(f"memory_budget={self.memory_budget} bytes is less than one sample "
                             f"needs (about {per} bytes for images of shape "
                             f"{tuple(x.shape[1:])}); raise it or leave it unset")
        return int(chunk)

    def _attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """Each attack's own computation on one chunk; the base class has none."""
        raise TypeError(f"{type(self).__name__} does not define _attack: subclasses of Attack "
                        "implement the attack itself")

    # ------------------------------------------------------------------ helpers
    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.get_logits(x).argmax(1)

    def __repr__(self) -> str:
        keys = [k for k in self.__dict__ if not k.startswith("_") and k not in ("model",)]
        body = ", ".join(f"{k}={getattr(self, k)!r}" for k in keys)
        return f"{type(self).__name__}({body})"


# ----------------------------------------------------------------------------- registry
attack_registry: Dict[str, Type[Attack]] = {}
_ALIASES: Dict[str, str] = {}


def _key(name: str) -> str:
    return name.lower().replace("_", "-").replace(" ", "")


def register_attack(name: str, *aliases: str) -> Callable[[Type[Attack]], Type[Attack]]:
    """Class decorator: make an Attack subclass available to `get_attack(name, ...)`."""
    def deco(cls):
        key = _key(name)
        attack_registry[key] = cls
        for a in (name,) + aliases:
            _ALIASES[_key(a)] = key
        return cls
    return deco


def list_attacks() -> Iterable[str]:
    return sorted(attack_registry)


def get_attack(name: str, model: nn.Module, **kwargs) -> Attack:
    """Build a registered attack by name (case-insensitive; e.g. "pgd", "mim", "cw",
    "cwlinf", "square", "apgd-ce", "apgd-t", "fab-t", "autoattack")."""
    if not isinstance(name, str):
        raise TypeError(f"attack name must be a string, got {type(name).__name__}")
    key = _ALIASES.get(_key(name))
    if key is None:
        known = ", ".join(sorted(_ALIASES))
        raise ValueError(f"unknown attack {name!r}; known names: {known}")
    return attack_registry[key](model, **kwargs)
