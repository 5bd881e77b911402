"""The ``Plan``: what to keep and what to recompute, with the numbers behind it.

A plan is immutable data: it serialises to versioned JSON and back exactly, and it
explains itself (``explain()``, ``summary()``): which values are saved, which are
recomputed, what each costs, where they come from in the model.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import view
from .training_loop import TrainingLoopInfo
from .units import GiB

__all__ = ["Plan", "ModelInfo", "DistributedInfo", "NodeDecision", "SolverInfo", "RegionInfo", "TrainingLoopInfo", "SCHEMA_VERSION",
           "READABLE_VERSIONS", "GiB"]

SCHEMA_VERSION = 3
#: Versions ``from_dict`` reads: 1 lacks ``NodeDecision.inputs`` (its consistency
#: check is then skipped) and the ``model`` entries that name mismatches
#: (``ModelInfo.structure``, ``graph``, ``parameters``); 1 and 2 lack ``training_loop``.
READABLE_VERSIONS = (1, 2, 3)


def _tuples(value):
    """``value`` with every list (at any depth) made a tuple: the records' immutable form of JSON arrays."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _lists(value):
    """``value`` with every tuple (at any depth) made a list: the JSON form of :func:`_tuples`."""
    return [_lists(v) for v in value] if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelInfo:
    """Which model and input a plan is for: the JSON ``model`` object.

    A field left ``None`` was not recorded (``plan_profile`` given no model record,
    or a schema version 1 file) and is left out of the JSON. JSON arrays are held
    as tuples, at every depth (lists given are converted)."""

    #: Hash of the captured joint graph, shapes included (``profiles.signature.graph_fingerprint``);
    #: "" when unknown.
    fingerprint: str = ""
    #: The model's class name, e.g. ``GPT2LMHeadModel`` (JSON key ``class``).
    class_name: str | None = None
    #: ``(name, shape, dtype)`` per example input (``profiles.signature.describe_inputs``):
    #: name is the keyword or the position; shape ``None`` for a non-tensor, whose type name stands in dtype.
    inputs: tuple[tuple[str, tuple[int, ...] | None, str], ...] | None = None
    #: The fingerprint without shapes (``profiles.signature.structure_fingerprint``):
    #: equal at other input sizes when the graph keeps its nodes, so the runtime reuses the decisions.
    structure: str | None = None
    #: Six hex digits per joint-graph node (``profiles.signature.node_digests``): names the first node that differs.
    graph: tuple[str, ...] | None = None
    #: ``(name, shape, dtype, requires_grad)`` per parameter, then ``(name, shape, dtype, None)``
    #: per buffer (``profiles.signature.parameter_signature``): names the first that differs.
    parameters: tuple[tuple[str, tuple[int, ...], str, bool | None], ...] | None = None
    #: The ``torch.autocast`` the step was captured under (``profiles.autocast_state``):
    #: ``"off"`` or ``"DEVICE_TYPE:DTYPE"`` (e.g. ``"cpu:bfloat16"``); the runtime refuses another.
    autocast: str | None = None
    #: ``(stack path, layers traced, layers)`` when the step was traced with a few
    #: layers of a deep stack and its graph repeated to all of them
    #: (``profiles.repeat_capture``); None when traced whole.
    repeated: tuple[str, int, int] | None = None

    def __post_init__(self):
        for name in ("inputs", "graph", "parameters", "repeated"):
            object.__setattr__(self, name, _tuples(getattr(self, name)))

    def to_dict(self) -> dict:
        """The JSON ``model`` object: the recorded fields, arrays as lists."""
        d = {"fingerprint": self.fingerprint}
        for attr, key in _MODEL_KEYS[1:]:
            value = getattr(self, attr)
            if value is not None:
                d[key] = _lists(value)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelInfo":
        """Read the JSON ``model`` object; keys other than the documented ones are not kept."""
        if not isinstance(d, dict) or not isinstance(d.get("fingerprint", ""), str):
            raise ValueError("the plan is inconsistent (edited by hand?): 'model' must be an object with a string 'fingerprint'")
        return cls(**{attr: d[key] for attr, key in _MODEL_KEYS if key in d})


#: ``ModelInfo`` field and JSON key, in the JSON's order.
_MODEL_KEYS = (("fingerprint", "fingerprint"), ("class_name", "class"), ("inputs", "inputs"),
               ("structure", "structure"), ("graph", "graph"), ("parameters", "parameters"), ("autocast", "autocast"),
               ("repeated", "repeated"))


@dataclass(frozen=True, kw_only=True, slots=True)
class DistributedInfo:
    """How a per-rank plan's step is trained, and the bytes one rank holds beyond the
    model's step (the JSON ``distributed`` object; :func:`planner.distributed.record`)."""

    #: Processes (ranks) training together.
    world_size: int
    #: The engine around the planned module: ``"ddp"``, ``"fsdp"`` (FSDP2, one parameter group)
    #: or ``"none"`` (one process, optimizer state only).
    sharding: str
    #: Optimizer whose state is counted: ``"adamw"`` or ``"none"``.
    optimizer: str
    #: Bytes added to every forward point of the timelines (engine and optimizer state,
    #: FSDP2's all-gather output).
    forward_bytes: int
    #: Bytes added to every backward point of the timelines.
    backward_bytes: int
    #: Bytes added to the level at the end of backward while gradients are reduced
    #: (may be negative: FSDP2 frees the unsharded parameters first).
    end_bytes: int
    #: The optimizer's state, included in the three above.
    optimizer_bytes: int
    #: Under ``"fsdp"``: ``"model"`` (one ``fully_shard`` around the planned module) or ``"blocks"``
    #: (``fully_shard`` on each repeated block, then on the model; the bytes above are then the
    #: most added at a point of the phase, and may be negative). The JSON has it only for ``"blocks"``.
    fsdp_wrap: str = "model"
    #: For ``fsdp_wrap="blocks"``: the wrapped blocks' module paths, in forward order.
    fsdp_blocks: tuple[str, ...] = ()
    #: For ``sharding="deepspeed"``: the DeepSpeed settings read from its config
    #: (``planner.deepspeed_config.DeepSpeedSettings.to_dict``); left out of the JSON otherwise.
    deepspeed: dict | None = None


def _tuple_blocks(d: dict) -> dict:
    """A JSON ``distributed`` object with ``fsdp_blocks`` as a tuple."""
    return {**d, "fsdp_blocks": tuple(d["fsdp_blocks"])} if "fsdp_blocks" in d else d


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeDecision:
    """One forward value that backward needs, and what the plan does with it."""

    #: fx node name in the joint graph.
    name: str
    #: Operator that produces it, e.g. ``aten.mm.default``.
    op: str
    #: Owning module path, e.g. ``transformer.h.3.mlp.c_fc``.
    module: str
    #: Bytes of storage the value owns (0 for views).
    bytes: int
    #: FLOPs to compute it once.
    flops: int
    #: Seconds to compute it once (see ``Plan.time_source``).
    time_s: float
    #: ``"save"``: kept from forward for backward; ``"recompute"``: rebuilt in backward.
    decision: str
    #: Why, in a few words (e.g. "random op: never recomputed").
    reason: str = ""
    #: Names of the forward values it is computed from (parameters and inputs not
    #: listed): a recomputed value's inputs must each be saved or recomputed.
    inputs: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class SolverInfo:
    """Which solver produced the plan, and how it went."""

    #: ``"none"`` (nothing to recompute), ``"ilp"`` or ``"sqrt"``.
    name: str
    #: Solver status, e.g. ``"Optimal"``.
    status: str
    #: Wall-clock seconds spent solving (all solver calls together).
    seconds: float
    #: Relative MIP gap when the solver reports one.
    gap: float | None = None
    #: Solver calls made (the ILP is re-solved until the exact simulation fits).
    calls: int = 1
    #: What the solvers minimised: ``"time"`` (estimated recompute seconds) or
    #: ``"flops"`` (recomputed FLOPs, then time).
    objective: str = "time"
    #: The MILP solver of an ILP plan: ``"highs"`` or ``"cbc"`` (None for other plans;
    #: left out of the JSON then).
    backend: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class RegionInfo:
    """One region of a step that breaks the graph (:mod:`profiles.regions`): a compiled
    piece of forward with its backward. A plan lists them in the order the step runs them."""

    #: Prefix of the region's node names in the plan (``"r1_"``).
    prefix: str
    #: Which compiled graph the region is a call of, in the order torch.compile compiles
    #: them (a module that breaks the graph and runs twice is one graph called twice).
    graph: int
    #: Fingerprint of the region's joint graph, shapes included, and without them.
    fingerprint: str
    structure: str
    #: The user's code the region was traced from (``file:first-last`` line).
    where: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """An activation-checkpointing plan for one model and input shape."""

    #: Version of this structure's JSON form.
    schema_version: int = SCHEMA_VERSION
    #: Which model and input the plan is for (fingerprint, class, inputs, and what
    #: names a mismatch: structure, a digest per graph node, parameters).
    model: ModelInfo = field(default_factory=ModelInfo)
    #: Device profile the costs refer to (``"cpu"``, ``"h100"``, ...).
    target: str = "cpu"
    #: How node times were obtained (``"roofline:h100"``, ``"measured:cuda:0"``).
    time_source: str = ""
    #: How dropout outputs are rebuilt: ``"mask"`` (from the saved 1-byte mask) or
    #: ``"replay"`` (mask regenerated in backward from the saved RNG state).
    dropout: str = "mask"
    #: What runs the planned graphs: ``"eager"`` (op by op) or ``"inductor"`` (compiled
    #: by Inductor; node names are those of the joint graph Inductor partitions, and
    #: ``recompute_time_s`` uses its cost model, see :mod:`planner.executor`).
    executor: str = "eager"
    #: The budget: bytes for the whole training step (parameters, buffers, inputs,
    #: activations, temporaries and gradients).
    budget_bytes: int
    #: Peak of the planned step, by exact liveness simulation.
    predicted_peak_bytes: int
    #: Peak of the same step with no recomputation.
    baseline_peak_bytes: int
    #: Bytes live for the whole step: parameters, buffers and inputs.
    static_bytes: int = 0
    #: FLOPs spent recomputing.
    recompute_flops: int
    #: Forward + backward FLOPs without recomputation.
    total_flops: int
    #: Seconds spent recomputing, by the same estimate as the node times.
    recompute_time_s: float = 0.0
    #: Seconds of the step's forward and backward without recomputation, by the same
    #: estimate (0.0 when not recorded): the planned step takes this plus ``recompute_time_s``.
    step_time_s: float = 0.0
    #: Solver name, status, seconds, gap.
    solver: SolverInfo
    #: Per-value decisions, in forward order.
    nodes: tuple[NodeDecision, ...] = ()
    #: Predicted live bytes after each node of the planned step: ``(phase, node, bytes)``
    #: with phase ``"forward"`` or ``"backward"`` (backward includes recomputation).
    timeline: tuple[tuple[str, str, int], ...] = ()
    #: The same for the step without recomputation.
    baseline_timeline: tuple[tuple[str, str, int], ...] = ()
    #: ``None`` for one process. Otherwise what ``plan(..., world_size=, sharding=, optimizer=)``
    #: was told and the bytes one rank holds beyond the model's step; the budget, peaks
    #: and timelines above are then per rank and include them.
    distributed: DistributedInfo | None = None
    #: What the budget assumed of the training loop (the loss, gradient accumulation,
    #: the optimizer step and its predicted peak); ``None`` when not recorded
    #: (``plan_profile`` without a loop, a version 1 or 2 file); per rank for a per-rank plan.
    training_loop: TrainingLoopInfo | None = None
    #: The regions of a model that breaks the graph, in the order the step runs them;
    #: empty for a step captured as one graph.
    regions: tuple[RegionInfo, ...] = ()
    #: The Inductor options the predicted peak assumes, as ``(name, value)`` pairs: set
    #: for Inductor's graph that convolves on the CPU (:mod:`planner.inductor_layout`);
    #: ``runtime.apply`` compiles with them, its own ``compile_options`` winning. Empty otherwise.
    inductor_options: tuple[tuple[str, Any], ...] = ()

    # -- derived -----------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint

    @property
    def recomputed(self) -> list[str]:
        """Names of the values rebuilt in backward."""
        return [n.name for n in self.nodes if n.decision == "recompute"]

    @property
    def saved(self) -> list[str]:
        return [n.name for n in self.nodes if n.decision == "save"]

    @property
    def overhead(self) -> float:
        """Recompute FLOPs as a fraction of the step's FLOPs."""
        return self.recompute_flops / self.total_flops if self.total_flops else 0.0

    # -- JSON ------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        d["nodes"] = [asdict(n) for n in self.nodes]
        d["timeline"] = [list(p) for p in self.timeline]
        d["baseline_timeline"] = [list(p) for p in self.baseline_timeline]
        if self.distributed is None:
            del d["distributed"]  # one process: the key is left out
        else:
            if self.distributed.deepspeed is None:
                del d["distributed"]["deepspeed"]  # not a DeepSpeed engine
            if self.distributed.fsdp_wrap == "model":
                del d["distributed"]["fsdp_wrap"], d["distributed"]["fsdp_blocks"]  # one FSDP2 group, or no FSDP2
        if self.solver.backend is None:
            del d["solver"]["backend"]  # not an ILP plan
        if d["executor"] == "eager":
            del d["executor"]  # op by op: the key is left out
        if self.training_loop is None:
            del d["training_loop"]
        if not self.regions:
            del d["regions"]  # one graph: the key is left out
        if self.inductor_options:
            d["inductor_options"] = dict(self.inductor_options)
        else:
            del d["inductor_options"]
        return d

    def to_json(self, path: str | Path | None = None, *, indent: int = 1) -> str:
        """The plan as JSON text; written to ``path`` too when given."""
        text = json.dumps(self.to_dict(), indent=indent, sort_keys=False)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        """Read a plan from its JSON form; ``ValueError`` naming the problem when the
        data is not a consistent plan of a version this planner reads."""
        if not isinstance(d, dict) or "schema_version" not in d:
            raise ValueError("not a plan: the JSON has no 'schema_version' (was it written by Plan.to_json?)")
        if d["schema_version"] not in READABLE_VERSIONS:
            raise ValueError(
                f"plan schema version {d['schema_version']!r} is not supported (this planner reads "
                f"versions {', '.join(map(str, READABLE_VERSIONS))}); re-plan the model with this version"
            )
        try:
            d = dict(d)
            d["model"] = ModelInfo.from_dict(d.get("model", {}))
            d["distributed"] = DistributedInfo(**_tuple_blocks(d["distributed"])) if d.get("distributed") else None
            d["training_loop"] = TrainingLoopInfo(**d["training_loop"]) if d.get("training_loop") else None
            d["solver"] = SolverInfo(**d["solver"])
            d["regions"] = tuple(RegionInfo(**r) for r in d.get("regions", ()))
            d["inductor_options"] = tuple(dict(d.get("inductor_options", {})).items())
            nodes = []
            for n in d["nodes"]:
                n = dict(n)
                if "inputs" in n:
                    if not isinstance(n["inputs"], (list, tuple)) or not all(isinstance(a, str) for a in n["inputs"]):
                        raise ValueError(f"node {n.get('name')!r}: 'inputs' must be a list of node names, not {n['inputs']!r}")
                    n["inputs"] = tuple(n["inputs"])
                nodes.append(NodeDecision(**n))
            d["nodes"] = tuple(nodes)
            for key in ("timeline", "baseline_timeline"):
                d[key] = tuple(tuple(p) for p in d.get(key, ()))
            d["schema_version"] = SCHEMA_VERSION  # read as the current version
            plan = cls(**d)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed plan JSON: {type(e).__name__}: {e}") from e
        plan.check()
        return plan

    def check(self) -> None:
        """Raise ``ValueError`` naming the first inconsistency: a field of the wrong
        type or sign, an unknown decision, a duplicate node, or a recomputed value
        whose inputs are neither saved nor recomputed. (A budget below the predicted
        peak is allowed: ``planner verify`` checks such edits against a real step.)"""
        bad = "the plan is inconsistent (edited by hand?): "
        for key in ("budget_bytes", "predicted_peak_bytes", "baseline_peak_bytes", "static_bytes", "recompute_flops", "total_flops"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{bad}{key} must be a non-negative integer, not {v!r}")
        if self.budget_bytes == 0:
            raise ValueError(f"{bad}budget_bytes is 0")
        if self.dropout not in ("mask", "replay"):
            raise ValueError(f"{bad}dropout is {self.dropout!r}; expected 'mask' or 'replay'")
        if self.executor not in ("eager", "inductor"):
            raise ValueError(f"{bad}executor is {self.executor!r}; expected 'eager' or 'inductor'")
        if not isinstance(self.model, ModelInfo) or not isinstance(self.model.fingerprint, str):
            raise ValueError(f"{bad}'model' must be a ModelInfo with a string 'fingerprint'")
        if self.distributed is not None and not isinstance(self.distributed, DistributedInfo):
            raise ValueError(f"{bad}'distributed' must be None (one process) or a DistributedInfo, "
                             f"not {type(self.distributed).__name__}")
        decided: dict[str, str] = {}
        for n in self.nodes:
            if not isinstance(n.name, str) or not n.name:
                raise ValueError(f"{bad}a node has name {n.name!r}")
            if n.decision not in ("save", "recompute"):
                raise ValueError(f"node {n.name!r} has decision {n.decision!r}; expected 'save' or 'recompute'")
            if n.name in decided:
                raise ValueError(f"{bad}node {n.name!r} appears twice")
            if isinstance(n.bytes, bool) or not isinstance(n.bytes, int) or n.bytes < 0:
                raise ValueError(f"{bad}node {n.name!r} has bytes {n.bytes!r}")
            decided[n.name] = n.decision
        for n in self.nodes:
            if n.decision != "recompute":
                continue
            for a in n.inputs:
                if a not in decided:
                    raise ValueError(
                        f"{bad}node {n.name!r} is recomputed but its input {a!r} is neither saved nor recomputed, "
                        "so backward could not rebuild it as planned; re-plan, or restore the edited decisions"
                    )

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> "Plan":
        """Read a plan from a JSON file path or JSON text."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            path = Path(text)
            if not path.exists():
                raise FileNotFoundError(f"no plan file at {path}")
            text = path.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"plan JSON is truncated or invalid: {e}") from e
        return cls.from_dict(data)

    # -- explaining (rendered by planner.view) ------------------------------------
    def summary(self) -> str:
        """The headline numbers, one per line: model, budget, peaks, recompute, solver
        (:func:`planner.view.summary`; what ``planner plan`` prints)."""
        return view.summary(self)

    def by_module(self, depth: int | None = None) -> list[dict]:
        """Per module (path cut to ``depth`` parts): bytes saved and recomputed, FLOPs recomputed."""
        rows: dict[str, dict] = defaultdict(lambda: {"saved_bytes": 0, "recomputed_bytes": 0, "recompute_flops": 0})
        for n in self.nodes:
            mod = n.module or "(top)"
            if depth is not None:
                mod = ".".join(mod.split(".")[:depth])
            r = rows[mod]
            if n.decision == "save":
                r["saved_bytes"] += n.bytes
            else:
                r["recomputed_bytes"] += n.bytes
                r["recompute_flops"] += n.flops
        return [{"module": k, **v} for k, v in rows.items()]

    def explain(self, *, depth: int | None = 3, top: int = 10) -> str:
        """What is saved and recomputed, per module, and the largest recomputed values
        (:func:`planner.view.explain`)."""
        return view.explain(self, depth=depth, top=top)

    def __str__(self) -> str:
        return self.summary()

    def memory_timeline(self) -> list[dict]:
        """Predicted live bytes through forward and backward, eager beside the plan:
        one dict per step (see :func:`planner.view.memory_timeline`)."""
        return view.memory_timeline(self)

    def plot(self, *, ax=None, title: str | None = None):
        """Draw the memory timeline with matplotlib: eager vs the plan, the budget,
        the forward/backward boundary. Returns the ``Axes``."""
        return view.plot(self, ax=ax, title=title)

    def _repr_html_(self) -> str:
        return view.html(self)
