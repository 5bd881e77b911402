"""Run a joint graph's nodes to measure each node's time (on the captured tensors)
and its hidden temporaries (bytes an op allocates internally and frees before
returning, e.g. a dtype-promotion copy inside ``mul``), on the model's device. On
CPU, temporaries are measured once per distinct op and argument layout, on
synthetic inputs.

Time: ``time.perf_counter`` around each node on CPU, CUDA events on a GPU (median
of ``repeats`` runs). Temporaries: on CPU the profiler's allocator events while the
node runs, on a GPU ``torch.cuda.max_memory_allocated``; in both cases the peak
above what was live before, minus the node's own new outputs.
"""

from __future__ import annotations

import operator
import statistics
import time
import warnings
from typing import Any

import torch
import torch.fx as fx
from torch.profiler import ProfilerActivity, profile

from . import rng_ops  # noqa: F401  (the planner_rng ops)
from ._torch_private import profiler_active, profiler_cpu_memory_events, real_tensors, record_function_ranges, tree_map
from .allocator import graph_device
from .joint import JointGraph
from .profiler_notices import quiet_profiler_notices

__all__ = ["run_nodes", "synthetic_cpu_temps", "channels_last_conv_temps"]


def _materialize(val: Any, device: torch.device) -> Any:
    if isinstance(val, torch.Tensor):
        if val.dtype.is_floating_point or val.dtype.is_complex:
            return torch.ones(val.shape, dtype=val.dtype, device=device)
        return torch.zeros(val.shape, dtype=val.dtype, device=device)
    return val


def _execute(joint: JointGraph, device: torch.device, per_node) -> None:
    """Run the joint graph node by node, freeing values after their last use;
    ``per_node(node, call)`` runs ``call()`` and returns its output."""
    gm = joint.gm
    nodes = list(gm.graph.nodes)
    last_use: dict[fx.Node, int] = {}
    for i, n in enumerate(nodes):
        for a in n.all_input_nodes:
            last_use[a] = i
    env: dict[fx.Node, Any] = {}
    primals = iter(joint.primal_values)
    for i, n in enumerate(nodes):
        if n.op == "placeholder":
            env[n] = _materialize(n.meta.get("val"), device) if n.name.startswith("tangents") else next(primals)
            continue
        if n.op == "get_attr":
            env[n] = getattr(gm, n.target)
            continue
        if n.op == "output":
            break
        args = tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, n.args)
        kwargs = tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, n.kwargs)
        env[n] = per_node(n, lambda: n.target(*args, **kwargs))
        for a in n.all_input_nodes:
            if last_use.get(a) == i and a.op != "placeholder":
                env.pop(a, None)
        if n not in last_use:
            env.pop(n, None)


def run_nodes(joint: JointGraph, *, measure_time: bool = True, measure_temps: bool = True, repeats: int = 3) -> dict[str, tuple[float, int]]:
    """``{node name: (seconds, temporary bytes)}`` for every call_function node."""
    if not joint.primal_values:
        raise ValueError("the joint graph holds no real tensors (planned on the meta device?); use estimated times")
    device = graph_device(joint.gm)
    cuda = device.type == "cuda"
    times: dict[str, float] = {}
    temps: dict[str, int] = {}
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if cuda else None

    def timed(n, call):
        samples, out = [], None
        for _ in range(repeats):
            out = None
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = call()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                out = call()
                samples.append(time.perf_counter() - t0)
        times[n.name] = statistics.median(samples)
        return out

    def gpu_temp(n, call):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = call()
        torch.cuda.synchronize(device)
        temps[n.name] = max(0, torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device))
        return out

    try:
        with torch.no_grad():
            if measure_time:
                _execute(joint, device, timed)
            if measure_temps and cuda:
                _execute(joint, device, gpu_temp)
            elif measure_temps:
                temps.update(_cpu_temps(joint, device))  # synthetic inputs: rng restored below
    finally:
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    names = [n.name for n in joint.gm.graph.nodes if n.op == "call_function"]
    return {name: (times.get(name, 0.0), temps.get(name, 0)) for name in names}


def synthetic_cpu_temps(joint: JointGraph) -> dict[str, int]:
    """``{node name: temporary bytes}`` measured on the CPU on synthetic inputs only,
    one op at a time (no captured values needed: used for meta-device models)."""
    return _synthetic_temps(joint)


def _synthetic_temps(joint: JointGraph, **kw) -> dict[str, int]:
    """:func:`_cpu_temps` on the CPU without gradients, the RNG state restored after."""
    rng = torch.get_rng_state()
    try:
        with torch.no_grad():
            return _cpu_temps(joint, torch.device("cpu"), **kw)
    finally:
        torch.set_rng_state(rng)


def channels_last_conv_temps(joint: JointGraph) -> dict[str, int]:
    """``{node name: temporary bytes}`` of the graph's convolutions and their backward,
    measured on the CPU on synthetic inputs whose 4-d tensors are channels-last: as
    Inductor calls them on the CPU, where it lays convolutions out that way (a
    library convolution takes other temporaries on contiguous inputs). Real tensors
    even inside a fake-tensor trace; ``{}`` while a profiler runs (a nested session
    would end the caller's)."""
    if profiler_active():
        return {}
    with real_tensors():
        return _synthetic_temps(joint, only=lambda n: "convolution" in str(n.target), channels_last=True)


_RANGE_PREFIX = "planner_node::"


def _marked(n: fx.Node, call):
    with torch.profiler.record_function(_RANGE_PREFIX + n.name):
        return call()


def _signature(n: fx.Node):
    def sig(a):
        if isinstance(a, fx.Node):
            v = a.meta.get("val")
            if isinstance(v, torch.Tensor):
                return ("T", tuple(v.shape), tuple(v.stride()), str(v.dtype))
            return ("N", repr(v))
        return ("C", repr(a))

    return (str(n.target), tuple(tree_map(sig, list(n.args))), tuple(sorted((k, repr(tree_map(sig, v))) for k, v in n.kwargs.items())))


def _synthetic(val: Any, device: torch.device, channels_last: bool = False) -> Any:
    """A tensor with ``val``'s layout (channels-last for a 4-d tensor when
    ``channels_last``): ones for floating point, zeros otherwise (valid indices,
    false masks). Temporaries depend on layouts, not values."""
    if isinstance(val, torch.Tensor):
        if channels_last and val.dim() == 4:
            t = torch.empty(tuple(val.shape), dtype=val.dtype, device=device, memory_format=torch.channels_last)
        else:
            t = torch.empty_strided(tuple(val.shape), tuple(val.stride()), dtype=val.dtype, device=device)
        return t.fill_(1) if (val.dtype.is_floating_point or val.dtype.is_complex) else t.zero_()
    return val


def _cpu_temps(joint: JointGraph, device: torch.device, only=None, channels_last: bool = False) -> dict[str, int]:
    """Each distinct (op, argument layouts) runs once on synthetic inputs, inside
    one profiler session with a ``record_function`` range per run. Its temporaries:
    the peak of allocator events within the range above the start, less what is
    still allocated at its end (the outputs, freed after the range). ``only``: the
    nodes to measure (default: all); ``channels_last``: 4-d inputs channels-last."""
    gm = joint.gm
    by_sig: dict[Any, list[str]] = {}
    first: dict[Any, fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is operator.getitem or (only is not None and not only(n)):
            continue
        key = _signature(n)
        by_sig.setdefault(key, []).append(n.name)
        first.setdefault(key, n)
    with quiet_profiler_notices(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for key, n in first.items():
            make = lambda a: _synthetic(a.meta.get("val"), device, channels_last) if isinstance(a, fx.Node) else a  # noqa: E731
            args, kwargs = tree_map(make, n.args), tree_map(make, n.kwargs)
            if n.target is torch.ops.planner_rng.replay_dropout_mask.default:
                args = (torch.ops.planner_rng.state(torch.empty(0, device=device)), *args[1:])  # a valid state
            try:
                out = _marked(n, lambda: n.target(*args, **kwargs))
            except Exception as e:  # noqa: BLE001  any op error: that op's temporaries stay unknown
                warnings.warn(
                    f"could not measure the temporaries of {n.name} ({n.target}) on synthetic inputs "
                    f"({type(e).__name__}: {e}); counting none for it",
                    stacklevel=2,
                )
                out = None
            del out, args, kwargs
    ranges = record_function_ranges(prof, _RANGE_PREFIX)
    memory = profiler_cpu_memory_events(prof)
    measured: dict[str, int] = {}
    i = 0
    running = 0
    for start, end, name in ranges:
        while i < len(memory) and memory[i][0] < start:
            running += memory[i][1]
            i += 1
        peak = running
        while i < len(memory) and memory[i][0] <= end:
            running += memory[i][1]
            peak = max(peak, running)
            i += 1
        measured[name] = max(0, peak - running)
    temps: dict[str, int] = {}
    for key, names in by_sig.items():
        value = measured.get(first[key].name, 0)
        for name in names:
            temps[name] = value
    return temps
