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

One thing Inductor does is not modelled: on the CPU it lays convolutions out
channels-last after the graph the planner simulates, so :func:`warn_unmodelled_layouts`
warns when such a step is planned.
"""

from __future__ import annotations

import warnings

from profiles.graph_profile import GraphProfile
from profiles.joint import JointGraph

__all__ = ["EXTERN_OPS", "is_extern", "recompute_costs", "InductorLayoutWarning", "warn_unmodelled_layouts"]


class InductorLayoutWarning(UserWarning):
    """A plan for Inductor on the CPU whose graph has convolutions: Inductor lays them
    out channels-last after the graph the planner simulates, so the measured peak can
    exceed the prediction and the budget."""


def warn_unmodelled_layouts(joint: JointGraph, device_type: str) -> None:
    """:class:`InductorLayoutWarning` when ``joint`` is Inductor's graph, convolves, and
    the step runs on the CPU (``device_type``: the model's device, or for a meta-device
    model its target's)."""
    if joint.executor != "inductor" or device_type != "cpu":
        return
    if any("convolution" in str(n.target) for n in joint.gm.graph.nodes if n.op == "call_function"):
        warnings.warn(
            "planning convolutions for Inductor on the CPU: Inductor lays them out channels-last after the graph "
            "the planner simulates, and a ResNet-18-like net measured up to 17% above its predicted peak, over "
            "the budget (README, Compiling with Inductor). Leave that much headroom in the budget, or plan this "
            "model op by op (executor='eager'), whose peaks are simulated exactly.",
            InductorLayoutWarning,
            stacklevel=3,
        )

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
