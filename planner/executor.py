"""What recomputing a forward value costs on the executor that runs the plan.

Op by op (``"eager"``) every recomputed op is one kernel: its roofline time from
the device profile (FLOPs or bytes moved, whichever takes longer, plus a launch).

Under Inductor (``"inductor"``) pointwise ops, reductions, views and copies are
generated inside fused kernels. A recomputed chain of them is emitted in the
kernel that consumes it, which reads the chain's inputs instead of the saved
value: it adds its arithmetic (FLOPs at the peak rate) but no memory traffic of
its own and no launch. Matmuls, convolutions and attention, which Inductor hands
to library kernels, and custom ops (called as they are) keep their roofline time.
So under Inductor the solvers recompute pointwise work and keep matmul outputs.

What Inductor's memory does beyond the simulation, for convolutions on the CPU,
is :mod:`planner.inductor_layout`'s.
"""

from __future__ import annotations

from profiles.graph_profile import GraphProfile

__all__ = ["EXTERN_OPS", "is_extern", "recompute_costs"]

#: aten ops (by overload packet name) Inductor runs as library kernels, not fused:
#: their recomputation costs their roofline time under Inductor too.
EXTERN_OPS = frozenset({
    "mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_int_mm", "_scaled_mm",
    "convolution", "_convolution", "convolution_backward", "cudnn_convolution", "mkldnn_convolution",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable", "_flash_attention_forward", "_efficient_attention_forward",
    "sort", "topk", "_embedding_bag",
})


def is_extern(op: str) -> bool:
    """Whether operator ``op`` (as ``NodeInfo.op`` names it, e.g. ``aten.mm.default``)
    runs as its own kernel under Inductor: a library aten op, or any op outside
    the ``aten`` and ``prims`` namespaces (custom ops)."""
    parts = op.split(".")
    if len(parts) < 2:
        return False  # getitem, placeholders: nothing runs
    namespace, packet = parts[0], parts[1]
    if namespace not in ("aten", "prims"):
        return True
    return packet in EXTERN_OPS


def recompute_costs(gp: GraphProfile) -> dict[str, float]:
    """Seconds to recompute each forward node once, on ``gp.joint.executor``."""
    forward = {name: info for name, info in gp.nodes.items() if info.phase == "forward"}
    if gp.joint.executor != "inductor" or gp.device_profile is None:
        return {name: info.time_s for name, info in forward.items()}
    device = gp.device_profile
    costs = {}
    for name, info in forward.items():
        if is_extern(info.op) or info.time_s == 0.0:
            costs[name] = info.time_s
        else:
            costs[name] = info.flops / device.flops_per_s(info.dtype or "float32")
    return costs
