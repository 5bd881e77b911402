"""Capture a model's training step (forward and backward) as one torch.fx joint graph.

The capture runs the model once through ``torch.compile`` with an AOTAutograd
backend whose partition hook records the joint graph. Model state is left as it
was: buffers (BatchNorm statistics) and the RNG state are restored afterwards.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ._torch_private import aot_autograd, allow_recompiles, copy_graph_module
from .dropout_pass import rewrite_dropout
from .signature import check_input_devices, node_digests, structure_fingerprint
from .meta import capture_meta, uses_meta

__all__ = ["JointGraph", "capture", "normalize_inputs", "graph_fingerprint", "prepare_joint", "mutated_primals", "CaptureError", "with_dropout"]


class CaptureError(RuntimeError):
    """The model could not be captured as one forward+backward graph."""


@dataclass
class JointGraph:
    """A captured training step.

    ``gm`` is the joint graph: placeholders ``primals_*`` (parameters, buffers and
    inputs, in the order the compiled forward receives them) and ``tangents_*``
    (gradients of the forward outputs); outputs are the forward outputs followed
    by the gradients of the primals.
    """

    gm: fx.GraphModule
    num_fwd_outputs: int
    #: One entry per ``primals_*`` placeholder: "param", "buffer" or "input".
    primal_roles: list[str]
    #: Fully qualified parameter/buffer name per primal ("" for inputs).
    primal_names: list[str]
    #: The real tensors the forward was called with (cleared by ``drop_tensors``).
    primal_values: list[Any] = field(default_factory=list, repr=False)
    fingerprint: str = ""
    #: The fingerprint without shapes, and a digest per node (``profiles.signature``).
    structure: str = ""
    node_digests: list[str] = field(default_factory=list, repr=False)
    #: How dropout was rewritten ("mask" or "replay"), and how many ops.
    dropout: str = "mask"
    num_dropouts: int = 0
    #: The joint graph as captured, before ``prepare_joint`` (for ``with_dropout``).
    raw_gm: fx.GraphModule | None = field(default=None, repr=False)
    #: True when captured from a meta-device model on fake tensors (:mod:`profiles.meta`):
    #: shapes and dtypes only, no values to run.
    fake: bool = False

    def drop_tensors(self) -> None:
        """Forget the real tensors so the graph no longer keeps them alive."""
        self.primal_values = []


def normalize_inputs(model: torch.nn.Module, example_inputs: Any) -> tuple[tuple, dict]:
    """Turn ``example_inputs`` into ``(args, kwargs)``.

    A tuple or list is positional, a dict (or Mapping) is keyword; a single tensor
    is one positional argument; ``None`` uses ``model.example_input_array``.
    """
    if example_inputs is None:
        example_inputs = getattr(model, "example_input_array", None)
        if example_inputs is None:
            raise ValueError(
                "no example inputs: pass example_inputs=(tensor, ...) or {name: tensor}, "
                "or set model.example_input_array (the PyTorch Lightning convention)"
            )
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict) or hasattr(example_inputs, "keys"):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(
        f"example_inputs must be a tuple of positional arguments, a dict of keyword "
        f"arguments or a tensor, not {type(example_inputs).__name__}"
    )


def graph_fingerprint(gm: fx.GraphModule, num_fwd_outputs: int) -> str:
    """A hash of the joint graph's structure: node names, ops, shapes and dtypes."""
    h = hashlib.sha256(f"fwd_outputs={num_fwd_outputs}".encode())
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        shapes = []
        for t in pytree.tree_leaves(val):
            if isinstance(t, torch.Tensor):
                shapes.append(f"{tuple(t.shape)}:{t.dtype}")
        args = ",".join(a.name for a in node.all_input_nodes)
        h.update(f"{node.name}|{node.op}|{node.target}|{args}|{';'.join(shapes)}\n".encode())
    return h.hexdigest()[:16]


def mutated_primals(gm: fx.GraphModule, num_fwd_outputs: int) -> set[str]:
    """Names of the primal placeholders the step mutates (AOTAutograd returns their
    new values as extra forward outputs, described as ``InputMutationAOTOutput``)."""
    primals = [n for n in gm.graph.find_nodes(op="placeholder") if not n.name.startswith("tangents")]
    out = gm.graph.find_nodes(op="output")[0]
    names = set()
    for desc in (out.meta.get("desc") or [])[:num_fwd_outputs]:
        idx = getattr(getattr(desc, "mutated_input", None), "idx", None)
        if idx is not None and idx < len(primals):
            names.add(primals[idx].name)
    return names


def prepare_joint(gm: fx.GraphModule, *, dropout: str = "mask", num_fwd_outputs: int | None = None) -> int:
    """Rewrites applied to every joint graph, at planning and at run time alike
    (after the fingerprint is taken, so it describes the model as captured).
    Returns the number of dropout ops rewritten.

    Buffers the step updates in place (BatchNorm statistics) are marked so that,
    when a recomputed BatchNorm needs them in backward, AOTAutograd hands them over
    without autograd's version check (training-mode BatchNorm does not read them)."""
    if num_fwd_outputs is not None:
        for node in gm.graph.find_nodes(op="placeholder"):
            if node.name in mutated_primals(gm, num_fwd_outputs):
                node.meta["saved_tensor_with_no_vc_check"] = True
    return rewrite_dropout(gm, dropout)


def _rng_state():
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def capture(model: torch.nn.Module, example_inputs: Any = None, *, dropout: str = "mask") -> JointGraph:
    """Capture one training step of ``model`` on ``example_inputs`` as a joint graph.

    ``dropout`` picks how dropout outputs are made recomputable (see
    :mod:`profiles.dropout_pass`). A model or inputs on the meta device are captured
    on fake tensors, allocating nothing (see :mod:`profiles.meta`)."""
    args, kwargs = normalize_inputs(model, example_inputs)
    if uses_meta(model, args, kwargs):
        return capture_meta(model, args, kwargs, capture, dropout=dropout)
    check_input_devices(model, args, kwargs, allow_meta=True)
    allow_recompiles()
    recorded: dict[str, Any] = {}

    def partition(joint, joint_inputs, *, num_fwd_outputs, **kw):
        from torch._functorch.partitioners import default_partition

        recorded["joint"] = joint
        recorded["num_fwd_outputs"] = num_fwd_outputs
        return default_partition(joint, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kw)

    def fw_compiler(gm, example):
        def run(*fw_args):
            recorded.setdefault("primals", list(fw_args))
            return gm(*fw_args)

        return run

    backend = aot_autograd(
        fw_compiler=fw_compiler, bw_compiler=lambda gm, ex: gm, partition_fn=partition
    )
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
    rng = _rng_state()
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad():
            compiled(*args, **kwargs)
    except Exception as e:  # torch.compile wraps every failure; say which step failed and why
        from .capture_errors import explain_capture_failure

        err = explain_capture_failure(model, args, kwargs, e)
        raise err from (getattr(err, "error", None) or e)
    finally:
        model.train(was_training)
        _set_rng_state(rng)
        with torch.no_grad():
            for k, b in model.named_buffers():
                if k in buffers:
                    b.copy_(buffers[k])
    if "joint" not in recorded:
        raise CaptureError(
            f"{type(model).__name__} produced no backward graph: no output requires grad. "
            "Make sure some parameters have requires_grad=True and the outputs depend on them."
        )
    gm = recorded["joint"]
    primals = recorded.get("primals", [])
    names_by_id: dict[int, tuple[str, str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_by_id.setdefault(id(p), ("param", name))
    for name, b in model.named_buffers(remove_duplicate=False):
        names_by_id.setdefault(id(b), ("buffer", name))
    roles, names = [], []
    for v in primals:
        role, name = names_by_id.get(id(v), ("input", ""))
        roles.append(role)
        names.append(name)
    jg = JointGraph(
        gm=gm,
        num_fwd_outputs=recorded["num_fwd_outputs"],
        primal_roles=roles,
        primal_names=names,
        primal_values=primals,
    )
    jg.fingerprint = graph_fingerprint(gm, jg.num_fwd_outputs)
    jg.structure = structure_fingerprint(gm, jg.num_fwd_outputs)
    jg.node_digests = node_digests(gm)
    jg.raw_gm = copy_graph_module(gm)
    jg.dropout = dropout
    jg.num_dropouts = prepare_joint(gm, dropout=dropout, num_fwd_outputs=jg.num_fwd_outputs)
    recorded.clear()
    return jg


def with_dropout(joint: JointGraph, dropout: str) -> JointGraph:
    """``joint`` with dropout rewritten as ``dropout`` (see :mod:`profiles.dropout_pass`),
    from the graph as captured: the same as capturing again, without running the model."""
    if joint.raw_gm is None:
        raise ValueError("this JointGraph keeps no copy of the captured graph; capture the model again")
    gm = copy_graph_module(joint.raw_gm)
    jg = JointGraph(
        gm=gm,
        num_fwd_outputs=joint.num_fwd_outputs,
        primal_roles=list(joint.primal_roles),
        primal_names=list(joint.primal_names),
        primal_values=list(joint.primal_values),
        fingerprint=joint.fingerprint,
        structure=joint.structure,
        node_digests=list(joint.node_digests),
        dropout=dropout,
        raw_gm=joint.raw_gm,
        fake=joint.fake,
    )
    jg.num_dropouts = prepare_joint(gm, dropout=dropout, num_fwd_outputs=jg.num_fwd_outputs)
    return jg
