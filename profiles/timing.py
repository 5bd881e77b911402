"""Run a joint graph's nodes on real tensors to measure each node's time and its
hidden temporaries (bytes an op allocates internally and frees before returning,
e.g. a dtype-promotion copy inside ``mul``), on the device the model lives on.

Time: ``time.perf_counter`` around each node on CPU, CUDA events on a GPU (median
of ``repeats`` runs). Temporaries: on CPU the profiler's allocator events while the
node runs, on a GPU ``torch.cuda.max_memory_allocated``; in both cases the peak
above what was live before, minus the node's own new outputs.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .capture import JointGraph
from .memory import measure_peak

__all__ = ["run_nodes"]


def _materialize(val: Any, device: torch.device) -> Any:
    if isinstance(val, torch.Tensor):
        if val.dtype.is_floating_point or val.dtype.is_complex:
            return torch.ones(val.shape, dtype=val.dtype, device=device)
        return torch.zeros(val.shape, dtype=val.dtype, device=device)
    return val


def _new_bytes(out: Any, before: set) -> int:
    total, seen = 0, set()
    for t in pytree.tree_leaves(out):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            key = st.data_ptr()
            if key not in before and key not in seen:
                seen.add(key)
                total += st.nbytes()
    return total


def run_nodes(joint: JointGraph, *, measure_time: bool = True, measure_temps: bool = True, repeats: int = 3) -> dict[str, tuple[float, int]]:
    """``{node name: (seconds, temporary bytes)}`` for every call_function node."""
    if not joint.primal_values:
        raise ValueError("the joint graph holds no real tensors (planned on the meta device?); use estimated times")
    gm = joint.gm
    nodes = list(gm.graph.nodes)
    device = next((v.device for v in joint.primal_values if isinstance(v, torch.Tensor)), torch.device("cpu"))
    last_use: dict[fx.Node, int] = {}
    for i, n in enumerate(nodes):
        for a in n.all_input_nodes:
            last_use[a] = i
    env: dict[fx.Node, Any] = {}
    primals = iter(joint.primal_values)
    results: dict[str, tuple[float, int]] = {}
    rng = torch.get_rng_state()
    cuda = device.type == "cuda"
    try:
        with torch.no_grad():
            for i, n in enumerate(nodes):
                if n.op == "placeholder":
                    if n.name.startswith("tangents"):
                        env[n] = _materialize(n.meta.get("val"), device)
                    else:
                        env[n] = next(primals)
                    continue
                if n.op == "get_attr":
                    env[n] = getattr(gm, n.target)
                    continue
                if n.op == "output":
                    break
                args = pytree.tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, n.args)
                kwargs = pytree.tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, n.kwargs)
                times = []
                out = None
                for _ in range(repeats if measure_time else 1):
                    if cuda:
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record()
                        out = n.target(*args, **kwargs)
                        end.record()
                        end.synchronize()
                        times.append(start.elapsed_time(end) / 1e3)
                    else:
                        t0 = time.perf_counter()
                        out = n.target(*args, **kwargs)
                        times.append(time.perf_counter() - t0)
                    if measure_time:
                        del out
                        out = None
                temp = 0
                if measure_temps:
                    live = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves(list(env.values())) if isinstance(t, torch.Tensor)}
                    peak, out = measure_peak(lambda: n.target(*args, **kwargs), device=device)
                    temp = max(0, peak - _new_bytes(out, live))
                elif out is None:
                    out = n.target(*args, **kwargs)
                env[n] = out
                results[n.name] = (statistics.median(times), temp)
                for a in n.all_input_nodes:
                    if last_use.get(a) == i and a.op != "placeholder":
                        env.pop(a, None)
    finally:
        torch.set_rng_state(rng)
    return results
