"""Run a model under a plan: an ``nn.Module`` whose backward recomputes what the plan did not keep.

The wrapped module compiles the model with an AOTAutograd backend whose
partitioner splits the joint graph by the plan (:func:`runtime.partition.split_joint`),
and runs both graphs with the boxed calling convention so every value, inputs
included, is freed after its last use. In ``eval()`` mode or under
``torch.no_grad()`` it calls the original model directly.

With ``compile="inductor"`` (the default for a plan made with
``executor="inductor"``, or for a ``torch.compile``-d model) the same split is
compiled by Inductor instead of run op by op (:mod:`runtime.inductor`);
inference calls then run the model compiled by Inductor.

A plan for a model that breaks the graph (``Plan.regions``) compiles the model
without ``fullgraph``, each region split by its own decisions (:mod:`runtime.regions`).

Inputs of other shapes than planned (the last, smaller batch of an epoch) compile
again: when the graph is the plan's apart from sizes the plan's decisions are
reused (with a :class:`BudgetWarning` when the re-simulated peak is over the
budget); otherwise the model is planned again for those shapes at the plan's budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from planner import plan as plan_model
from planner import LoopNotResimulated, resimulate
from planner.deepspeed_config import DeepSpeedSettings
from planner.distributed import from_record
from planner.plan_type import GiB, Plan
from planner.zero_tangents import skippable_tangents, skips_zero_tangents
from profiles import available_targets
from profiles._torch_private import (
    aot_autograd,
    allow_recompiles,
    backend_error_cause,
    backward_without_autocast,
    graph_break_info,
    no_ddp_graph_split,
    quiet_graph_breaks,
)
from profiles.allocator import granularity, graph_device_type
from profiles.capture import prepare_joint
from profiles.causal_sdpa import with_causal_sdpa
from profiles.executors import EXECUTORS, unwrap_compiled
from profiles.capture_errors import explain_capture_failure
from profiles.device import target_device_type
from profiles.signature import (
    check_input_devices,
    describe_inputs,
    first_difference,
    graph_fingerprint,
    parameter_mismatch,
    structure_fingerprint,
)

from .arrange import arrange_graphs
from .block_runtime import PlannedBlocks
from .distributed import check_wrapping
from .inductor import PlanPartitioner, compile_inference, compile_planned, compiling, plans_key
from .partition import op_by_op, split_joint
from .mismatch import AutocastMismatch, PlanMismatch, check_step_autocast
from .regions import RegionBackend, RegionMismatch
from .zero_grads import accept_missing_tangents, skip_zero_grads

__all__ = ["PlannedModule", "ShapeEntry", "PlanMismatch", "AutocastMismatch", "ShapeWarning", "BudgetWarning", "apply"]


class ShapeWarning(UserWarning):
    """Inputs of other shapes than planned change the graph: the model is planned again for them."""


class BudgetWarning(ShapeWarning):
    """Inputs of other shapes than planned are predicted to need more than the plan's budget."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ShapeEntry:
    """How a :class:`PlannedModule` runs inputs of one signature (its ``shapes`` values)."""

    #: ``"planned"``: the plan's own input shapes; ``"reused"``: other sizes of the same
    #: graph structure, run with the plan's decisions; ``"replanned"``: a graph of another
    #: structure, planned again at the plan's budget.
    how: str
    #: The plan these inputs run under (the module's own plan unless ``how`` is ``"replanned"``).
    plan: Plan
    #: Predicted peak bytes of the step at these shapes; ``None`` for ``"reused"`` until its
    #: first compilation re-simulates the step, and after it when the plan's training loop
    #: cannot be re-simulated (``loss_fn``, an optimizer; a :class:`ShapeWarning` says so).
    predicted_peak_bytes: int | None


class _Replan(Exception):
    """Raised inside the compiler when new input shapes change the graph's structure."""


def _key(inputs) -> str:
    """The ``shapes`` key of an input signature (``describe_inputs``, or ``ModelInfo.inputs``)."""
    return json.dumps(inputs)


class PlannedModule(nn.Module):
    """``model`` trained under ``plan``; shares its parameters and buffers.

    ``shapes`` maps each input signature seen in training (JSON of
    ``[name, shape, dtype]`` per input) to how it runs: a :class:`ShapeEntry`.
    ``executor`` is what runs the graphs (``"eager"``: op by op, or ``"inductor"``),
    ``compile_options`` the Inductor options."""

    def __init__(self, model: nn.Module, plan: Plan, *, compile: str | None = None, compile_options: dict | None = None):
        super().__init__()
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be a planner.Plan, not {type(plan).__name__}")
        model, compiled_options = unwrap_compiled(model)
        self.executor = _executor(plan, compile, compiled_options is not None)
        self.compile_options = dict(compile_options if compile_options is not None else compiled_options or {})
        check_wrapping(model, plan)
        plan.check()  # a Plan built or edited in code gets the checks from_json makes
        why = parameter_mismatch(model, plan.model.parameters)
        if why:
            raise PlanMismatch(
                f"this plan was made for another model ({plan.model.class_name or '?'}): {why}; "
                "plan again with planner.plan(model, budget_gb, inputs)"
            )
        param = next(iter(model.parameters()), None)
        if param is not None and param.device.type not in ("meta", target_device_type(plan.target)):
            raise PlanMismatch(
                f"this plan was made for target {plan.target!r} but the model is on {param.device}; its memory "
                f"predictions do not hold there: move the model to a {target_device_type(plan.target)} device, or plan "
                f"again on {param.device} with planner.plan(model, budget_gb, inputs)"
            )
        self.module = model
        self.plan = plan
        #: (forward, backward) GraphModules of each compilation, for inspection.
        self.compiled_graphs: list = []
        self.shapes: dict[str, ShapeEntry] = {}
        if plan.model.inputs:
            self.shapes[_key(plan.model.inputs)] = ShapeEntry(how="planned", plan=plan, predicted_peak_bytes=plan.predicted_peak_bytes)
        self._call_key = ""
        #: Whether gradients of outputs other than the loss reach backward as None (runtime.zero_grads).
        self._skip_zero_grads = skips_zero_tangents(loss=plan.training_loop.loss if plan.training_loop else None,
                                                    executor=self.executor, regions=bool(plan.regions), blocks=False)

        allow_recompiles()
        regions = None
        if plan.regions:  # a model that breaks the graph: each region split by its own decisions
            if self.executor != "eager":
                raise PlanMismatch("a plan for a model that breaks the graph runs op by op only: apply it with compile='eager'")
            regions = RegionBackend(plan, self.compiled_graphs)
            compiled = torch.compile(model, backend=regions, fullgraph=False, dynamic=False)
        elif self.executor == "inductor":
            compiled = compile_planned(model, PlanPartitioner(self._partition, self._plans_key), self.compile_options, plan)
        else:
            # attention rewritten as the capture rewrote it (profiles.causal_sdpa)
            backend = with_causal_sdpa(aot_autograd(fw_compiler=op_by_op, bw_compiler=op_by_op,
                                                    partition_fn=self._partition))
            compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
        # Not submodules: the compiled wrappers would list the parameters again.
        object.__setattr__(self, "_compiled", compiled)
        object.__setattr__(self, "_regions", regions)
        object.__setattr__(self, "_inference", None)

    # -- the partition hook: the plan's split of each compiled joint graph -----------
    def _partition(self, joint, joint_inputs, *, num_fwd_outputs, **kw):
        """AOTAutograd's partition hook: ``joint`` split by the plan chosen for this call's
        shapes, arranged as simulated when run op by op; the pair is kept in ``compiled_graphs``."""
        use = self._choose(joint, num_fwd_outputs)
        prepare_joint(joint, dropout=use.dropout, num_fwd_outputs=num_fwd_outputs)
        fwd, bwd, _ = split_joint(joint, frozenset(use.recomputed), num_fwd_outputs=num_fwd_outputs)
        entry = self.shapes.get(self._call_key)
        if entry is not None and entry.how == "reused" and entry.predicted_peak_bytes is None:
            self._resimulate(entry, use, joint, fwd, bwd, num_fwd_outputs)
        if self.executor == "eager":  # as the planner simulated it (Inductor orders the graphs itself)
            skipped = skippable_tangents(joint) if self._skip_zero_grads else None
            fwd, bwd = arrange_graphs(joint, num_fwd_outputs, fwd, bwd, dropout=use.dropout,
                                      granularity=granularity(graph_device_type(joint)),
                                      engine=from_record(use.distributed), skipped_tangents=skipped)
            if skipped is not None:
                bwd = accept_missing_tangents(bwd, skipped)
        self.compiled_graphs.append((fwd, bwd))
        return fwd, bwd

    def _resimulate(self, entry: "ShapeEntry", use: Plan, joint, fwd, bwd, num_fwd_outputs: int) -> None:
        """Record the predicted peak of reused decisions at new shapes; warn when it is over the budget."""
        planned = self.plan.model.to_dict().get("inputs")
        try:
            peak = resimulate(use, joint, fwd, bwd, num_fwd_outputs=num_fwd_outputs,
                              parameters=list(self.module.parameters()))
        except LoopNotResimulated as e:
            warnings.warn(f"inputs {self._call_key} differ from the planned {planned}; "
                          f"the plan's decisions still apply, but {e}", ShapeWarning, stacklevel=3)
            peak = None
        self.shapes[self._call_key] = dataclasses.replace(entry, predicted_peak_bytes=peak)
        if peak is not None and peak > use.budget_bytes:
            warnings.warn(
                f"inputs {self._call_key} differ from the planned {planned}; the plan's "
                f"decisions still apply, but the step is predicted to peak at {peak / GiB:.4f} GiB, over the "
                f"budget of {use.budget_bytes / GiB:.4f} GiB; plan for these shapes with planner.plan(...) "
                "to stay within it",
                BudgetWarning,
                stacklevel=3,
            )

    def _plans_key(self) -> str:
        """What the partition hook applies to the call being compiled: the plan, and
        the plan chosen for these inputs' shapes (Inductor's cache key)."""
        entry = self.shapes.get(self._call_key)
        chosen = [entry.plan] if entry is not None and entry.plan is not self.plan else []
        return plans_key([self.plan, *chosen]) + ("" if entry is None else ":" + entry.how)

    # -- which decisions a newly compiled graph gets ------------------------------
    def _choose(self, joint, num_fwd_outputs: int) -> Plan:
        plan = self.plan
        got = graph_fingerprint(joint, num_fwd_outputs)
        entry = self.shapes.get(self._call_key)
        if entry is not None and entry.how == "replanned":
            plan = entry.plan
            if got == plan.fingerprint:
                return plan
        elif not plan.fingerprint or got == plan.fingerprint:
            return plan
        elif entry is not None and entry.how == "reused" and structure_fingerprint(joint, num_fwd_outputs) == plan.model.structure:
            return plan  # compiled again (a guard failed) for shapes already handled
        planned_inputs = plan.model.inputs
        if entry is not None or not planned_inputs:
            # the planned input shapes (or unknown ones): the model itself differs
            why = first_difference(joint, plan.model.graph) or f"this model and input have fingerprint {got}"
            raise PlanMismatch(
                f"this plan was made for another model or input shapes (plan fingerprint {plan.fingerprint}; {why}); "
                "the model's forward or structure changed since it was planned: plan again with "
                "planner.plan(model, budget_gb, inputs)" + _repeated_hint(plan)
            )
        if plan.model.structure and structure_fingerprint(joint, num_fwd_outputs) == plan.model.structure:
            self.shapes[self._call_key] = ShapeEntry(how="reused", plan=plan, predicted_peak_bytes=None)
            return plan
        raise _Replan()

    def _replan(self, args, kwargs) -> None:
        if args and kwargs:
            raise PlanMismatch(
                f"inputs {self._call_key} change the graph's structure, and a call with both positional and keyword "
                "arguments cannot be planned again automatically: plan for these shapes with planner.plan(...)"
            )
        inputs = kwargs if kwargs else args
        loop = self.plan.training_loop
        if loop is not None and (loop.loss in ("loss_fn", "model eager") or loop.optimizer != "none"):
            what = {"loss_fn": "loss_fn", "model eager": "model's eager loss"}.get(loop.loss, "optimizer step")
            raise PlanMismatch(
                f"inputs {self._call_key} change the graph's structure, and this plan's budget counts the training "
                f"loop's {what}, which cannot be planned again "
                "automatically: plan for these shapes with planner.plan(..., loss_fn=..., optimizer=...) as before"
            )
        warnings.warn(
            f"inputs {self._call_key} change the graph's structure, not only its sizes; planning again for them "
            f"at the plan's budget of {self.plan.budget_bytes / GiB:.4f} GiB",
            ShapeWarning,
            stacklevel=4,
        )
        # the plan's device profile when it is a shipped one (a profile given by path records only its name)
        target = self.plan.target if self.plan.target in available_targets() else None
        dist = self.plan.distributed  # a per-rank plan is planned again per rank, for the same engine
        if dist is None:
            per_rank = {}
        elif dist.deepspeed is not None:  # the same DeepSpeed engine's settings
            per_rank = {"deepspeed": DeepSpeedSettings(**dist.deepspeed)}
        else:
            per_rank = {"world_size": dist.world_size, "sharding": dist.sharding, "optimizer": dist.optimizer}
        new = plan_model(self.module, self.plan.budget_bytes / GiB, inputs, target=target,
                           objective=self.plan.solver.objective, executor=self.executor,
                           compile_options={**_layout_kept(self.plan), **(self.compile_options or {})} or None,
                           grad_accumulation=loop is not None and loop.grad_accumulation, **per_rank)
        self.shapes[self._call_key] = ShapeEntry(how="replanned", plan=new, predicted_peak_bytes=new.predicted_peak_bytes)

    def _infer(self, *args, **kwargs):
        """An ``eval()`` or ``torch.no_grad()`` call: the model itself, or compiled by
        Inductor when the plan's graphs are."""
        if self.executor != "inductor":
            return self.module(*args, **kwargs)
        if self._inference is None:
            object.__setattr__(self, "_inference", compile_inference(self.module, self.compile_options))
        return self._inference(*args, **kwargs)

    def _run_regions(self, args, kwargs):
        """A training step of a model that breaks the graph (:mod:`runtime.regions`); inputs
        of other shapes than planned are planned again (a :class:`ShapeWarning` says so)."""
        if self.shapes and self._call_key not in self.shapes:
            self._replan(args, kwargs)
        entry = self.shapes.get(self._call_key)
        self._regions.start_step(self.plan if entry is None else entry.plan)
        try:
            with no_ddp_graph_split(), quiet_graph_breaks(), backward_without_autocast():
                return self._compiled(*args, **kwargs)
        except Exception as e:
            inner = backend_error_cause(e) or e
            if isinstance(inner, RegionMismatch):
                raise PlanMismatch(str(inner)) from e
            raise

    def forward(self, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return self._infer(*args, **kwargs)
        check_input_devices(self.module, args, kwargs, allow_meta=False)
        check_step_autocast(self.plan.model.autocast, self.module, args, kwargs)
        self._call_key = _key(describe_inputs(args, kwargs))
        if self._regions is not None:
            return self._run_regions(args, kwargs)
        for attempt in range(2):
            try:
                # one graph even inside DistributedDataParallel's forward; backward traced as eager runs it
                with no_ddp_graph_split(), backward_without_autocast(), \
                        (compiling() if self.executor == "inductor" else contextlib.nullcontext()):
                    out = self._compiled(*args, **kwargs)
                if self._skip_zero_grads:
                    skip_zero_grads(out, self.module.parameters())
                return out
            except Exception as e:
                inner = backend_error_cause(e)
                if isinstance(inner, _Replan) and attempt == 0:
                    self._replan(args, kwargs)
                    continue
                if isinstance(inner, PlanMismatch):
                    if any(t.is_meta for t in self.module.parameters()):
                        raise PlanMismatch(
                            f"{inner} - the model is on the meta device, which cannot run a training step: build it "
                            "for real on the target device (or model.to_empty(device=...) and load its weights) first"
                        ) from e
                    raise PlanMismatch(str(inner)) from e
                if graph_break_info(e) is not None:  # e.g. new shapes that take an untraceable path
                    raise explain_capture_failure(self.module, args, kwargs, e) from e
                raise
        raise AssertionError("unreachable")  # pragma: no cover


def _layout_kept(plan: Plan) -> dict:
    """The Inductor options ``plan`` was compiled with, its conv layout choice explicit, so
    that a plan for other shapes assumes the layout the compiled module keeps."""
    options = dict(plan.inductor_options)
    if options:
        options.setdefault("layout_optimization", True)
    return options


def _repeated_hint(plan: Plan) -> str:
    """For a plan whose graph was repeated from a few traced layers: how to trace them all."""
    if not plan.model.repeated:
        return ""
    stack, traced, layers = plan.model.repeated
    return (f". The plan's graph was made by tracing {traced} of the {layers} layers of {stack} and repeating them; "
            "if those layers do not all run the same operations, plan with the environment variable "
            "PLANNER_REPEAT_LAYERS=0 (every layer traced)")


def _executor(plan: Plan, compile: str | None, compiled: bool) -> str:
    """What runs the plan's graphs: ``compile`` when given, else the plan's executor
    (Inductor for a ``torch.compile``-d model). :class:`PlanMismatch` when the plan
    was made for another executor: its node names are another joint graph's."""
    if compile is not None and compile not in EXECUTORS:
        raise ValueError(f"compile must be one of {', '.join(map(repr, EXECUTORS))} or None, not {compile!r}")
    executor = compile or ("inductor" if compiled else plan.executor)
    if executor != plan.executor:
        why = "the model is compiled by torch.compile, so it runs under Inductor" if compile is None else f"compile={compile!r}"
        raise PlanMismatch(
            f"this plan was made for the {plan.executor!r} executor but {why}; the graphs differ (Inductor "
            f"partitions its decomposed joint graph): plan with planner.plan(model, budget_gb, inputs, "
            f"executor={executor!r})" + ("" if compile is None else f", or apply with compile={plan.executor!r}")
        )
    return executor


def apply(model: nn.Module, plan: Plan, *, compile: str | None = None,
          compile_options: dict | None = None) -> PlannedModule | PlannedBlocks:
    """Wrap ``model`` so that training steps follow ``plan``.

    ``compile``: ``"inductor"`` compiles the plan's graphs with Inductor (fused kernels;
    ``compile_options`` are its options, as ``torch.compile(options=...)`` takes), ``"eager"``
    runs them op by op; by default the plan's executor (``plan.executor``). A model
    already wrapped in ``torch.compile`` is unwrapped and runs under Inductor with the
    options it was compiled with (unless ``compile_options`` are given).

    Raises :class:`PlanMismatch` when the model's parameters or device differ from
    the planned model's, or the plan was made for another executor; a changed
    forward is refused at the first training call. A plan made with ``fsdp_wrap="blocks"``
    gives a :class:`runtime.block_runtime.PlannedBlocks` (each block compiled on its own),
    to wrap with :func:`runtime.fully_shard_blocks`."""
    d = plan.distributed if isinstance(plan, Plan) else None
    if d is not None and d.fsdp_wrap == "blocks":  # each block compiled on its own (runtime.block_runtime)
        if compile not in (None, "eager") or compile_options:
            raise ValueError("a plan made with fsdp_wrap='blocks' runs its blocks op by op only: apply it without compile=")
        return PlannedBlocks(model, plan)
    return PlannedModule(model, plan, compile=compile, compile_options=compile_options)
