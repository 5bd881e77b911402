"""Device bytes of an optimizer step (``opt.step()`` then ``opt.zero_grad()``), from the parameters alone.

A pure function of the parameters (shapes, dtypes, devices, ``requires_grad``; meta
tensors do) and an :class:`OptimizerSpec`. It replays, allocation by allocation, what
torch 2.13's ``torch.optim`` implementations allocate on the parameters' device:

- **state** (resident from the first step on): Adam/AdamW two moments per trainable
  parameter (three with ``amsgrad``) plus a one-element ``step`` counter, which is on
  the device only for ``fused`` (elsewhere torch keeps it on the CPU); SGD one
  momentum buffer per parameter when ``momentum != 0``.
- **for-loop** (``foreach=False``): each parameter's temporaries in turn. Adam/AdamW:
  ``denom = (exp_avg_sq.sqrt() / bc).add_(eps)`` holds two parameter-sized tensors,
  while the previous parameter's ``denom`` is still bound; a gradient copy when
  ``maximize`` or L2 ``weight_decay`` (Adam). SGD: gradient copies for ``maximize``,
  ``weight_decay`` and ``nesterov``.
- **foreach** (``foreach=True``; torch's default when every parameter is on
  ``cuda``/``xpu``/``mtia``): one tensor list per (device, dtype) group at a time.
  Adam/AdamW: ``exp_avg_sq_sqrt`` is the size of the whole group, and the previous
  group's is still bound while it is made (torch orders the groups by a hash: with
  more than two groups per parameter group the worst order is taken, an upper
  bound).
- **fused**: no temporaries; SGD allocates its momentum buffers before the kernel.
- ``zero_grad()`` allocates nothing (``set_to_none=True`` frees the gradients).

The first step's peak includes the state it allocates. On the CPU, scalar
arithmetic on the ``step`` counters allocates 12 bytes at a time
(:data:`CPU_SCALAR_BYTES`). ``capturable=True`` and ``differentiable=True`` are not
modelled. ``tests/test_optimizer_memory.py`` compares every case with
``profiles.measure_peak``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch

__all__ = [
    "OptimizerSpec",
    "OptimizerMemory",
    "optimizer_memory",
    "default_implementation",
    "OPTIMIZER_NAMES",
    "IMPLEMENTATIONS",
    "FOREACH_DEVICES",
    "CPU_SCALAR_BYTES",
]

OPTIMIZER_NAMES = ("adamw", "adam", "sgd")
IMPLEMENTATIONS = ("default", "for-loop", "foreach", "fused")
#: Device types on which torch 2.13 picks the foreach implementation by default
#: (``torch.utils._foreach_utils._get_foreach_kernels_supported_devices``, less the
#: private-use backend); elsewhere, the CPU included, the for-loop one.
FOREACH_DEVICES = ("cuda", "xpu", "mtia")
#: Bytes the CPU allocator sees at once for the scalar arithmetic on ``step`` counters
#: (an 8-byte wrapped number and a 4-byte cast), absent on other devices.
CPU_SCALAR_BYTES = 12
_DEFAULT_WEIGHT_DECAY = {"adamw": 1e-2, "adam": 0.0, "sgd": 0.0}


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimizerSpec:
    """Which ``torch.optim`` optimizer, configured how (torch's defaults where left out)."""

    #: ``"adamw"``, ``"adam"`` or ``"sgd"``.
    name: str
    #: ``"default"`` (what torch picks on the parameters' device), ``"for-loop"``
    #: (``foreach=False``), ``"foreach"`` or ``"fused"``.
    implementation: str = "default"
    #: None: torch's default for ``name`` (AdamW 1e-2, decoupled; Adam and SGD 0).
    weight_decay: float | None = None
    #: Adam/AdamW: keep the maximum of the second moment (one more state tensor).
    amsgrad: bool = False
    #: Ascend instead of descend (a negated gradient copy outside fused).
    maximize: bool = False
    #: SGD's momentum (0: no buffers).
    momentum: float = 0.0
    #: SGD's Nesterov momentum.
    nesterov: bool = False

    def __post_init__(self):
        if self.name not in OPTIMIZER_NAMES:
            raise ValueError(f"unknown optimizer {self.name!r}: choose one of {', '.join(OPTIMIZER_NAMES)}")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"unknown implementation {self.implementation!r} for {self.name}: choose one of {', '.join(IMPLEMENTATIONS)}"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimizerMemory:
    """Bytes on the parameters' device that the optimizer holds and allocates."""

    #: Implementation the numbers are for (``"default"`` resolved on the parameters' device).
    implementation: str
    #: State resident from the end of the first step on.
    state_bytes: int
    #: Peak above what was live before the first ``step()`` (its state included).
    first_step_peak_bytes: int
    #: Peak above what was live before a later ``step()`` (state already resident).
    step_peak_bytes: int


def default_implementation(device_type: str) -> str:
    """What torch 2.13 runs when neither ``foreach`` nor ``fused`` is given."""
    return "foreach" if device_type in FOREACH_DEVICES else "for-loop"


class _Ledger:
    """Running live bytes and their peak; ``scalar`` is what one CPU scalar operation
    adds for an instant (:data:`CPU_SCALAR_BYTES`, or 0 on other devices)."""

    def __init__(self, granularity: int, scalar: int):
        self.granularity = granularity
        self.scalar = scalar
        self.live = 0
        self.peak = 0

    def rounded(self, nbytes: int) -> int:
        """Bytes the allocator takes for a tensor of ``nbytes``."""
        g = self.granularity
        return (nbytes + g - 1) // g * g if g > 1 else nbytes

    def alloc(self, nbytes: int) -> int:
        """Allocate ``nbytes`` already rounded (a list of tensors: the sum of their
        :meth:`rounded` sizes); returns them."""
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        return nbytes

    def free(self, nbytes: int) -> None:
        self.live -= nbytes

    def blip(self) -> None:
        """An in-place operation with a scalar operand: the wrapped number lives for an instant."""
        self.peak = max(self.peak, self.live + self.scalar)

    def alloc_with_scalar(self, nbytes: int) -> int:
        """An operation with a scalar operand that returns a new tensor: the wrapped
        number is live while the result is allocated."""
        self.live += self.scalar
        allocated = self.alloc(nbytes)
        self.live -= self.scalar
        return allocated


def _nbytes(p: torch.Tensor, led: "_Ledger") -> int:
    return led.rounded(p.numel() * p.element_size())


def _groups(params: Any) -> list[tuple[list[torch.Tensor], dict]]:
    """``params`` as ``(trainable tensors, group options)`` per parameter group."""
    items = [params] if isinstance(params, torch.Tensor) else list(params)
    if items and all(isinstance(g, dict) for g in items):
        groups = [([g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"]), g) for g in items]
    else:
        groups = [(items, {})]
    for tensors, _ in groups:
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"parameters must be tensors (or dicts with 'params'), not {type(t).__name__}")
    return [([t for t in tensors if t.requires_grad], options) for tensors, options in groups]


def _rebind(led: _Ledger, old: int, new: int) -> int:
    """``x = <new value>``: the new value exists before the old one is freed."""
    led.free(old)
    return new


def _adam_loop(ps: list, spec: OptimizerSpec, l2: bool, led: _Ledger) -> None:
    """``_single_tensor_adam``: per parameter, in order."""
    grad = denom = 0  # bytes of the copies bound to ``grad`` and ``denom``
    for p in ps:
        n = _nbytes(p, led)
        grad = _rebind(led, grad, led.alloc(n) if spec.maximize else 0)  # grads[i] or -grads[i]
        if l2:
            grad = _rebind(led, grad, led.alloc(n))  # grad.add(param, alpha=wd)
        led.blip()  # step_t += 1, lerp_, mul_(beta2): scalar operands
        sqrt = led.alloc(n)
        div = led.alloc_with_scalar(n)  # sqrt / bias_correction2_sqrt
        led.free(sqrt)
        denom = _rebind(led, denom, div)
    led.free(grad)
    led.free(denom)


def _by_dtype(ps: list, led: _Ledger) -> list[int]:
    """Bytes per (device, dtype) group, smallest first. torch orders the groups by a
    hash; smallest first is the worst order for both implementations: the two
    largest groups are adjacent (Adam holds two groups' temporaries at once) and the
    largest comes last (SGD's first step has made every other group's buffers)."""
    sums: dict = {}
    for p in ps:
        key = (p.device, p.dtype)
        sums[key] = sums.get(key, 0) + _nbytes(p, led)
    return sorted(sums.values())


def _adam_foreach(ps: list, spec: OptimizerSpec, l2: bool, led: _Ledger) -> None:
    """``_multi_tensor_adam``: per (device, dtype) group."""
    prev = 0  # the previous group's exp_avg_sq_sqrt, bound until the next is made
    for size in _by_dtype(ps, led):
        copy = led.alloc(size) if spec.maximize or l2 else 0  # negated / decayed gradients
        led.blip()  # _foreach_mul_(exp_avg_sqs, beta2)
        led.free(copy)  # del device_grads
        prev = _rebind(led, prev, led.alloc(size))  # _foreach_sqrt
        led.blip()  # _foreach_div_ by the bias corrections
    led.free(prev)


def _sgd_loop(ps: list, spec: OptimizerSpec, wd: float, first: bool, led: _Ledger) -> int:
    """``_single_tensor_sgd``; returns the momentum buffers made on the first step."""
    state = grad = 0
    for p in ps:
        n = _nbytes(p, led)
        grad = _rebind(led, grad, led.alloc(n) if spec.maximize else 0)
        if wd != 0:
            grad = _rebind(led, grad, led.alloc(n))  # grad.add(param, alpha=wd)
        if spec.momentum != 0:
            if first:
                state += led.alloc(n)  # buf = grad.detach().clone()
            else:
                led.blip()  # buf.mul_(momentum)
            grad = _rebind(led, grad, led.alloc(n) if spec.nesterov else 0)  # grad.add(buf) or buf
    led.free(grad)
    return state


def _sgd_foreach(ps: list, spec: OptimizerSpec, wd: float, first: bool, led: _Ledger) -> int:
    """``_multi_tensor_sgd``; returns the momentum buffers made on the first step."""
    state = 0
    for size in _by_dtype(ps, led):
        copy = led.alloc(size) if spec.maximize or wd != 0 else 0  # _foreach_neg / _foreach_add
        if spec.momentum != 0:
            if first:
                state += led.alloc(size)  # buffers cloned from the gradients
            else:
                led.blip()  # _foreach_mul_(bufs, momentum)
            if not spec.nesterov:
                copy = _rebind(led, copy, 0)  # device_grads = bufs
        led.free(copy)  # rebound at the next group
    return state


def _state_bytes(ps: list, spec: OptimizerSpec, impl: str, cpu: bool, led: _Ledger) -> int:
    """Allocate Adam's state (all of it before any update), or fused SGD's buffers."""
    total = 0
    for p in ps:
        n = _nbytes(p, led)
        if spec.name in ("adam", "adamw"):
            for _ in range(3 if spec.amsgrad else 2):
                total += led.alloc(n)
            if impl == "fused":
                total += led.alloc(led.rounded(4))  # a float32 step counter on the device
            elif cpu:
                total += led.alloc(torch.empty((), dtype=torch.get_default_dtype()).element_size())  # on the CPU
        elif impl == "fused" and spec.momentum != 0:
            total += led.alloc(n)  # torch.empty_like(grad)
    return total


def _one_step(groups, spec: OptimizerSpec, impl: str, first: bool, cpu: bool, granularity: int) -> tuple[int, int]:
    """State allocated and peak of one ``step()``."""
    led = _Ledger(granularity, CPU_SCALAR_BYTES if cpu else 0)
    state = 0
    for ps, options in groups:
        wd = options.get("weight_decay", spec.weight_decay)
        wd = _DEFAULT_WEIGHT_DECAY[spec.name] if wd is None else wd
        if first and (spec.name != "sgd" or impl == "fused"):
            state += _state_bytes(ps, spec, impl, cpu, led)
        if impl == "fused":
            if spec.name != "sgd" and ps:
                led.blip()  # _foreach_add_(state_steps, 1)
        elif spec.name == "sgd":
            sgd = _sgd_loop if impl == "for-loop" else _sgd_foreach
            state += sgd(ps, spec, wd, first, led)
        else:
            adam = _adam_loop if impl == "for-loop" else _adam_foreach
            adam(ps, spec, spec.name == "adam" and wd != 0, led)
    return state, led.peak


def optimizer_memory(
    params: Iterable[Any], spec: OptimizerSpec, *, device_type: str | None = None, granularity: int = 1
) -> OptimizerMemory:
    """State and step peaks of ``spec`` over ``params`` (tensors, or parameter-group
    dicts as ``torch.optim`` takes them, whose ``"weight_decay"`` overrides the spec's).

    ``device_type``: the device the step runs on (default: the parameters'; meta
    tensors need it given). ``granularity``: allocations are rounded up to it (512
    for the CUDA caching allocator). Every trainable parameter is assumed to have a
    gradient, as after a backward through all of them.
    """
    groups = _groups(params)
    devices = {p.device.type for ps, _ in groups for p in ps}
    if device_type is None:
        if "meta" in devices or len(devices) > 1:
            raise ValueError(
                f"parameters on {sorted(devices)}: pass device_type= (the device the optimizer step runs on)"
            )
        device_type = devices.pop() if devices else "cpu"
    impl = default_implementation(device_type) if spec.implementation == "default" else spec.implementation
    if spec.name == "sgd" and spec.nesterov and spec.momentum == 0:
        raise ValueError("SGD with nesterov=True needs momentum > 0 (torch refuses it)")
    cpu = device_type == "cpu"
    state, first_peak = _one_step(groups, spec, impl, True, cpu, granularity)
    _, later_peak = _one_step(groups, spec, impl, False, cpu, granularity)
    return OptimizerMemory(
        implementation=impl, state_bytes=state, first_step_peak_bytes=first_peak, step_peak_bytes=later_peak
    )
