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

import dataclasses
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx

from ._torch_private import storage_key
from .allocator import graph_device
from .device import DeviceProfile, default_target_for, load_device_profile
from .joint import JointGraph, mutated_primals
from .nodes import FlopCountError, is_recomputable, module_path, node_flops, op_name, value_tensors
from .timing import run_nodes, synthetic_cpu_temps

__all__ = ["NodeInfo", "GraphProfile", "FlopCountWarning", "profile_graph", "count_flops", "with_temps"]


class FlopCountWarning(UserWarning):
    """A FLOP formula raised on some nodes of a profiled graph: their FLOPs count as 0
    (``GraphProfile.flop_failures`` names each node and the error)."""


@dataclass(frozen=True, kw_only=True, slots=True)
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


@dataclass(frozen=True, kw_only=True, slots=True)
class GraphProfile:
    """A joint graph with a ``NodeInfo`` per node."""

    #: The profiled graph.
    joint: JointGraph
    #: A ``NodeInfo`` per node, by node name.
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
    #: Nodes whose FLOP formula raised (their ``flops`` are 0), with the error, by node name.
    flop_failures: dict[str, str] = field(default_factory=dict)

    @property
    def gm(self) -> fx.GraphModule:
        """The joint graph module (``joint.gm``)."""
        return self.joint.gm


def _is_batch_norm_training(node: fx.Node) -> bool:
    return node.target is torch.ops.aten._native_batch_norm_legit_functional.default and bool(
        node.args[5] if len(node.args) > 5 else node.kwargs.get("training", False)
    )


def count_flops(nodes: Iterable[fx.Node]) -> tuple[dict[str, int], dict[str, str]]:
    """``(flops, failures)`` of fx ``nodes``: FLOPs of one execution per node name,
    and, for each node whose FLOP formula raised (its FLOPs count as 0), the error.
    Warns :class:`FlopCountWarning` once per operator that failed, naming its nodes."""
    flops: dict[str, int] = {}
    failures: dict[str, str] = {}
    by_op: dict[str, list[FlopCountError]] = {}
    for node in nodes:
        try:
            flops[node.name] = node_flops(node)
        except FlopCountError as e:
            flops[node.name] = 0
            failures[node.name] = str(e)
            by_op.setdefault(e.op, []).append(e)
    for op, errors in by_op.items():
        names = ", ".join(repr(e.node) for e in errors[:3]) + (f" and {len(errors) - 3} more" if len(errors) > 3 else "")
        cause = errors[0].__cause__
        warnings.warn(
            f"the FLOP formula of {op} raised on {len(errors)} node(s) ({names}): "
            f"{type(cause).__name__}: {cause}; their FLOPs count as 0 (GraphProfile.flop_failures lists them)",
            FlopCountWarning,
            stacklevel=3,
        )
    return flops, failures


def _phase(node: fx.Node) -> str:
    """``primal`` (parameter, buffer, input or a constant the graph module holds),
    ``tangent``, ``output``, ``forward`` or ``backward``."""
    if node.op == "placeholder":
        return "tangent" if node.name.startswith("tangents") else "primal"
    if node.op == "output":
        return "output"
    if node.op == "get_attr":
        return "primal"
    return "backward" if node.meta.get("partitioner_tag") == "is_backward" else "forward"


def _node_info(node: fx.Node, ids: list[int], new_bytes: int, flops: int, profile: DeviceProfile, mutated: set[str]) -> NodeInfo:
    """The ``NodeInfo`` of ``node``, whose outputs are storages ``ids`` of which
    ``new_bytes`` are new; its time is the roofline estimate of ``profile``."""
    tensors = value_tensors(node)
    moved = new_bytes + sum(
        sum(t.untyped_storage().nbytes() for t in value_tensors(a))
        for a in node.all_input_nodes
    ) if new_bytes else 0
    dtype = str(tensors[0].dtype).replace("torch.", "") if tensors else ""
    return NodeInfo(
        name=node.name,
        op=op_name(node),
        phase=_phase(node),
        module=module_path(node),
        bytes=new_bytes,
        flops=flops,
        time_s=profile.estimate_time(flops, moved, dtype or "float32") if new_bytes else 0.0,
        storages=tuple(ids),
        # A value read from a buffer the step updates in place is not recomputed:
        # backward would see the updated buffer. Training-mode BatchNorm is the
        # exception: its output depends on the batch statistics only.
        recomputable=is_recomputable(node)
        and (_is_batch_norm_training(node) or not any(a.name in mutated for a in node.all_input_nodes)),
        dtype=dtype,
    )


def _node_infos(joint: JointGraph, profile: DeviceProfile, flops: dict[str, int]) -> tuple[dict[str, NodeInfo], list[int], set[int]]:
    """``(infos, storage_bytes, static)``: a ``NodeInfo`` per node; the size of each
    storage, numbered in order of first appearance; the storages of the primals."""
    gm = joint.gm
    mutated = mutated_primals(gm, joint.num_fwd_outputs)
    storage_ids: dict[Any, int] = {}
    storage_bytes: list[int] = []
    static: set[int] = set()
    infos: dict[str, NodeInfo] = {}
    for node in gm.graph.nodes:
        ids, new_bytes = [], 0
        tensors = value_tensors(node)
        # a stitched graph names its storages itself (profiles.region_stitch)
        for t, key in zip(tensors, node.meta.get("storage_keys") or [storage_key(t) for t in tensors]):
            if key not in storage_ids:
                storage_ids[key] = len(storage_bytes)
                nbytes = t.untyped_storage().nbytes()
                storage_bytes.append(nbytes)
                if node.op == "call_function":
                    new_bytes += nbytes
            ids.append(storage_ids[key])
        infos[node.name] = info = _node_info(node, ids, new_bytes, flops[node.name], profile, mutated)
        if info.phase == "primal":
            static.update(ids)
    for node in gm.graph.nodes:  # a getitem can be recomputed only with its op
        if node.op == "call_function" and node.target is operator.getitem:
            parent = infos.get(node.args[0].name)
            if parent is not None and not parent.recomputable and infos[node.name].recomputable:
                infos[node.name] = dataclasses.replace(infos[node.name], recomputable=False)
    return infos, storage_bytes, static


def _add_fake_temps(joint: JointGraph, infos: dict[str, NodeInfo], profile: DeviceProfile, measure_temps: bool | None) -> str:
    """For a joint graph captured on fake tensors (no values): for a CPU target
    (or ``measure_temps=True``) measure op temporaries on synthetic CPU inputs, one
    op at a time, into ``infos``; returns the note for ``time_source``."""
    if measure_temps is None:
        measure_temps = profile.device_type == "cpu"
    if measure_temps:
        for name, temp in synthetic_cpu_temps(joint).items():
            infos[name] = dataclasses.replace(infos[name], temp_bytes=temp)
    return "; meta-device model captured on fake tensors, op temporaries " + (
        "measured on synthetic CPU inputs" if measure_temps else "not measured (counted as 0)"
    )


def _add_measured(joint: JointGraph, infos: dict[str, NodeInfo], device: torch.device, *, measure_time: bool, measure_temps: bool | None) -> None:
    """Run the nodes on the captured tensors and put the measured times (with
    ``measure_time``) and op temporaries (with ``measure_temps``; by default when
    there are captured tensors on a CPU or CUDA device) into ``infos``."""
    if measure_temps is None:
        measure_temps = bool(joint.primal_values) and device.type in ("cpu", "cuda")
    if not (measure_time or measure_temps):
        return
    measured = run_nodes(joint, measure_time=measure_time, measure_temps=measure_temps)
    for name, (secs, temp) in measured.items():
        kw: dict[str, Any] = {"temp_bytes": temp} if measure_temps else {}
        if measure_time:
            kw["time_s"] = secs
        infos[name] = dataclasses.replace(infos[name], **kw)


def with_temps(gp: GraphProfile, temps: dict[str, int]) -> GraphProfile:
    """``gp`` with the temporary bytes of the nodes ``temps`` names (``{name: bytes}``) replaced."""
    nodes = {name: dataclasses.replace(ni, temp_bytes=temps[name]) if name in temps else ni
             for name, ni in gp.nodes.items()}
    return dataclasses.replace(gp, nodes=nodes)


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
    captured tensors and timed instead (CUDA events on a GPU). ``measure_temps``
    decides whether op temporaries are measured (default: when tensors can be run).
    A FLOP formula that raises is reported with a :class:`FlopCountWarning`.
    """
    if joint.fake and measure_time:
        raise ValueError(
            "measure_time=True needs real tensors, but this model was built on the meta device; "
            "drop measure_time (times then come from the roofline of target=) or build the model on a real device"
        )
    device = graph_device(joint.gm)
    profile = load_device_profile(target or default_target_for(device))
    flops, flop_failures = count_flops(joint.gm.graph.nodes)
    infos, storage_bytes, static = _node_infos(joint, profile, flops)
    time_source = f"roofline:{profile.name}"
    if joint.fake:
        time_source += _add_fake_temps(joint, infos, profile, measure_temps)
    else:
        _add_measured(joint, infos, device, measure_time=measure_time, measure_temps=measure_temps)
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
        flop_failures=flop_failures,
    )
