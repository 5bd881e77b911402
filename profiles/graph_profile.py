"""Measure each node of a joint graph: bytes it allocates, FLOPs, time, and flags.

Bytes come from the fake tensors AOTAutograd leaves in ``node.meta["val"]``:
an output whose storage was seen before (a view, or a ``getitem`` of a
multi-output op) allocates nothing new. FLOPs come from
``torch.utils.flop_counter``'s formulas; times from a device profile's roofline,
or, with ``measure_time=True``, from running the nodes on the model's device.
Ops' hidden temporaries are measured by running the nodes when real tensors exist.
A model built on the meta device has none: for a CPU target its temporaries are
measured on synthetic inputs one op at a time; for other targets they count as 0;
``time_source`` says which.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import flop_registry

from .capture import JointGraph, mutated_primals
from .device import DeviceProfile, load_device_profile

__all__ = ["NodeInfo", "GraphProfile", "profile_graph", "module_path"]


@dataclass(frozen=True, kw_only=True)
class NodeInfo:
    """What the profiler knows about one joint-graph node."""

    #: fx node name (stable for the same model and input shapes).
    name: str
    #: Operator, e.g. ``aten.mm.default``; ``placeholder`` for inputs.
    op: str
    #: ``primal`` (parameter, buffer or input), ``tangent``, ``forward``, ``backward`` or ``output``.
    phase: str
    #: Owning module path such as ``transformer.h.3.mlp.c_fc`` ("" at top level).
    module: str
    #: Bytes of new storage the node allocates (0 for views and getitems).
    bytes: int
    #: FLOPs of one execution.
    flops: int
    #: Seconds of one execution (estimated or measured, see ``GraphProfile.time_source``).
    time_s: float
    #: Storage ids (see ``GraphProfile.storage_bytes``) the node's outputs refer to.
    storages: tuple[int, ...] = ()
    #: False for ops whose re-execution would change results (random, in-place, effectful).
    recomputable: bool = True
    #: dtype of the (first) output, "" when none.
    dtype: str = ""
    #: Bytes the op allocates internally and frees before returning (measured).
    temp_bytes: int = 0


@dataclass
class GraphProfile:
    """A joint graph with a ``NodeInfo`` per node."""

    joint: JointGraph
    nodes: dict[str, NodeInfo]
    #: Size in bytes of each storage id.
    storage_bytes: list[int]
    #: Name of the device profile times were estimated for.
    target: str
    #: How ``time_s`` was obtained: ``"roofline:<target>"`` or ``"measured:<device>"``; for a
    #: meta-device model followed by a note on how op temporaries were obtained.
    time_source: str
    #: Storage ids held for the whole step: parameters, buffers and inputs.
    static_storages: frozenset[int] = field(default_factory=frozenset)
    #: The device profile itself (its ``device_type`` decides how a meta-device
    #: model's memory is planned).
    device_profile: DeviceProfile | None = None

    @property
    def gm(self) -> fx.GraphModule:
        return self.joint.gm


def module_path(node: fx.Node) -> str:
    """The owning module's dotted path, from dynamo's ``nn_module_stack`` metadata."""
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _clean_path(path)


def _clean_path(path: str) -> str:
    import re

    # The root model as dynamo reached it: L['self'], or L['args'][0] when forward is
    # wrapped by a decorator taking (*args, **kwargs) (Hugging Face Llama).
    path = re.sub(r"^L(\['[^']+'\]|\[\d+\])+\.?", "", path)
    path = re.sub(r"^L__self___?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    path = re.sub(r"(^|\.)_modules\.", ".", path)
    return path.strip(".")


def _op_name(node: fx.Node) -> str:
    if node.op != "call_function":
        return node.op
    if node.target is operator.getitem:
        return "getitem"
    return str(node.target)


def _is_recomputable(node: fx.Node) -> bool:
    target = node.target
    if node.op != "call_function":
        return True
    if target is operator.getitem:
        return _is_recomputable(node.args[0])
    if not isinstance(target, torch._ops.OpOverload):
        return False  # higher-order ops and Python callables: keep as they ran
    if torch.Tag.nondeterministic_seeded in target.tags:
        return False  # random: a second run draws other numbers
    schema = target._schema
    return not schema.is_mutable


def _flops(node: fx.Node) -> int:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return 0
    formula = flop_registry.get(node.target.overloadpacket)
    if formula is None:
        return 0

    def val(a):
        return a.meta.get("val") if isinstance(a, fx.Node) else a

    args = pytree.tree_map(val, node.args)
    kwargs = pytree.tree_map(val, node.kwargs)
    try:
        return int(formula(*args, **kwargs, out_val=node.meta.get("val")))
    except Exception:  # a formula that cannot handle these arguments counts as 0
        return 0


def _is_batch_norm_training(node: fx.Node) -> bool:
    return node.target is torch.ops.aten._native_batch_norm_legit_functional.default and bool(
        node.args[5] if len(node.args) > 5 else node.kwargs.get("training", False)
    )


def _tensors(val: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(val) if isinstance(t, torch.Tensor)]


def profile_graph(
    joint: JointGraph,
    *,
    target: str | DeviceProfile | None = None,
    measure_time: bool = False,
    measure_temps: bool | None = None,
) -> GraphProfile:
    """Profile every node of ``joint``.

    ``target`` names the device profile for estimated times (default: the device of
    the captured tensors). With ``measure_time=True`` each node is run on the
    captured tensors and timed instead (CUDA events on a GPU).
    """
    gm = joint.gm
    if joint.fake and measure_time:
        raise ValueError(
            "measure_time=True needs real tensors, but this model was built on the meta device; "
            "drop measure_time (times then come from the roofline of target=) or build the model on a real device"
        )
    device = _graph_device(gm)
    profile = load_device_profile(target or _default_target(device))
    storage_ids: dict[Any, int] = {}
    storage_bytes: list[int] = []
    static: set[int] = set()
    infos: dict[str, NodeInfo] = {}
    mutated = mutated_primals(gm, joint.num_fwd_outputs)
    for node in gm.graph.nodes:
        tensors = _tensors(node.meta.get("val"))
        ids, new_bytes = [], 0
        for t in tensors:
            key = StorageWeakRef(t.untyped_storage())
            if key not in storage_ids:
                storage_ids[key] = len(storage_bytes)
                nbytes = t.untyped_storage().nbytes()
                storage_bytes.append(nbytes)
                if node.op == "call_function":
                    new_bytes += nbytes
            ids.append(storage_ids[key])
        if node.op == "placeholder":
            phase = "tangent" if node.name.startswith("tangents") else "primal"
            if phase == "primal":
                static.update(ids)
        elif node.op == "output":
            phase = "output"
        elif node.op == "get_attr":
            phase = "primal"  # a constant the graph module holds
            static.update(ids)
        else:
            phase = "backward" if node.meta.get("partitioner_tag") == "is_backward" else "forward"
        flops = _flops(node)
        moved = new_bytes + sum(
            sum(t.untyped_storage().nbytes() for t in _tensors(a.meta.get("val")))
            for a in node.all_input_nodes
        ) if new_bytes else 0
        dtype = str(tensors[0].dtype).replace("torch.", "") if tensors else ""
        time_s = profile.estimate_time(flops, moved, dtype or "float32") if new_bytes else 0.0
        infos[node.name] = NodeInfo(
            name=node.name,
            op=_op_name(node),
            phase=phase,
            module=module_path(node),
            bytes=new_bytes,
            flops=flops,
            time_s=time_s,
            storages=tuple(ids),
            # A value read from a buffer the step updates in place is not recomputed:
            # backward would see the updated buffer. Training-mode BatchNorm is the
            # exception: its output depends on the batch statistics only.
            recomputable=_is_recomputable(node)
            and (_is_batch_norm_training(node) or not any(a.name in mutated for a in node.all_input_nodes)),
            dtype=dtype,
        )
    for node in gm.graph.nodes:  # a getitem can be recomputed only with its op
        if node.op == "call_function" and node.target is operator.getitem:
            parent = infos.get(node.args[0].name)
            if parent is not None and not parent.recomputable and infos[node.name].recomputable:
                infos[node.name] = _replace(infos[node.name], recomputable=False)
    time_source = f"roofline:{profile.name}"
    if joint.fake:
        # No captured values. For a CPU target the temporaries are measured here on
        # synthetic inputs, one op at a time; for another device they are unknown.
        if measure_temps is None:
            measure_temps = profile.device_type == "cpu"
        if measure_temps:
            from .timing import synthetic_cpu_temps

            for name, temp in synthetic_cpu_temps(joint).items():
                infos[name] = _replace(infos[name], temp_bytes=temp)
        time_source += "; meta-device model captured on fake tensors, op temporaries " + (
            "measured on synthetic CPU inputs" if measure_temps else "not measured (counted as 0)"
        )
    elif measure_temps is None:
        measure_temps = bool(joint.primal_values) and device.type in ("cpu", "cuda")
    if not joint.fake and (measure_time or measure_temps):
        from .timing import run_nodes

        measured = run_nodes(joint, measure_time=measure_time, measure_temps=measure_temps)
        for name, (secs, temp) in measured.items():
            kw = {"temp_bytes": temp} if measure_temps else {}
            if measure_time:
                kw["time_s"] = secs
            infos[name] = _replace(infos[name], **kw)
        if measure_time:
            time_source = f"measured:{device}"
    return GraphProfile(
        joint=joint,
        nodes=infos,
        storage_bytes=storage_bytes,
        target=profile.name,
        time_source=time_source,
        static_storages=frozenset(static),
        device_profile=profile,
    )


def _replace(info: NodeInfo, **kw) -> NodeInfo:
    import dataclasses

    return dataclasses.replace(info, **kw)


def _graph_device(gm: fx.GraphModule) -> torch.device:
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return val.device
    return torch.device("cpu")


def _default_target(device: torch.device) -> str:
    from .device import default_target_for

    return default_target_for(device)
