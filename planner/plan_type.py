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

from . import view
from .units import GiB

__all__ = ["Plan", "NodeDecision", "SolverInfo", "SCHEMA_VERSION", "READABLE_VERSIONS", "GiB"]

SCHEMA_VERSION = 2
#: Versions ``from_dict`` reads: 1 lacks ``NodeDecision.inputs`` (its consistency
#: check is then skipped) and the ``model`` entries used to name mismatches.
READABLE_VERSIONS = (1, 2)


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


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """An activation-checkpointing plan for one model and input shape."""

    #: Version of this structure's JSON form.
    schema_version: int = SCHEMA_VERSION
    #: Model identity: ``fingerprint`` (hash of the captured graph), ``class``, ``inputs``,
    #: and to name mismatches ``structure`` (the fingerprint without shapes),
    #: ``graph`` (a digest per joint-graph node) and ``parameters``.
    model: dict = field(default_factory=dict)
    #: Device profile the costs refer to (``"cpu"``, ``"h100"``, ...).
    target: str = "cpu"
    #: How node times were obtained (``"roofline:h100"``, ``"measured:cuda:0"``).
    time_source: str = ""
    #: How dropout outputs are rebuilt: ``"mask"`` (from the saved 1-byte mask) or
    #: ``"replay"`` (mask regenerated in backward from the saved RNG state).
    dropout: str = "mask"
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
    #: Solver name, status, seconds, gap.
    solver: SolverInfo
    #: Per-value decisions, in forward order.
    nodes: tuple[NodeDecision, ...] = ()
    #: Predicted live bytes after each node of the planned step: ``(phase, node, bytes)``
    #: with phase ``"forward"`` or ``"backward"`` (backward includes recomputation).
    timeline: tuple[tuple[str, str, int], ...] = ()
    #: The same for the step without recomputation.
    baseline_timeline: tuple[tuple[str, str, int], ...] = ()
    #: Empty for one process. Otherwise what ``plan(..., world_size=, sharding=, optimizer=)``
    #: was told (``world_size``, ``sharding``, ``optimizer``) and the bytes one rank holds
    #: beyond the model's step (``forward_bytes``, ``backward_bytes``, ``end_bytes``,
    #: ``optimizer_bytes``); the peaks and timelines above are then per rank and include them.
    distributed: dict = field(default_factory=dict)
    #: What runs the planned graphs: ``"eager"`` (op by op) or ``"inductor"`` (compiled
    #: by Inductor; node names are those of the joint graph Inductor partitions, and
    #: ``recompute_time_s`` uses its cost model, see :mod:`planner.executor`).
    executor: str = "eager"

    # -- derived -----------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.model.get("fingerprint", "")

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
        d["nodes"] = [asdict(n) for n in self.nodes]
        d["timeline"] = [list(p) for p in self.timeline]
        d["baseline_timeline"] = [list(p) for p in self.baseline_timeline]
        if not d["distributed"]:
            del d["distributed"]  # one process: the key is left out
        if d["executor"] == "eager":
            del d["executor"]  # op by op: the key is left out
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
            d["solver"] = SolverInfo(**d["solver"])
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
        if not isinstance(self.model, dict) or not isinstance(self.model.get("fingerprint", ""), str):
            raise ValueError(f"{bad}'model' must be an object with a string 'fingerprint'")
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
