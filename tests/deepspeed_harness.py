"""DeepSpeed ranks on gloo, and a rank's peak measured from torch.profiler over whole accumulation windows.

Shared by ``tests/test_deepspeed.py`` and ``bench/bench_deepspeed.py``. Each rank
joins the one-worker-thread gloo group of ``dist_harness`` and reduces through
``_reduce_freed_here`` (so that the profiler sees every free), then trains an
engine: ``train`` runs ``windows`` accumulation windows of micro-steps (``engine(batch)``, ``engine.backward(loss)``,
``engine.step()``) and measures the last window's forwards and backwards, after
at least one optimizer step, so that the optimizer state is live as the plan
counts it. Everything the engine holds is allocated inside the profiled session
(the model is copied and the engine built there); the inputs, made before, are
added.
"""

from __future__ import annotations

import copy
import gc
import os

import torch

from dist_harness import WORLD, init
from profiles import storage_bytes
from profiles.memory import running_peak

__all__ = ["WORLD", "ds_init", "train", "weights"]


def ds_init(rank: int, port: int, world: int = WORLD) -> None:
    """Join the gloo group as DeepSpeed expects (LOCAL_RANK and friends), CPU accelerator."""
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init(rank, port)
    import deepspeed

    # DeepSpeed's shared-memory all-reduce serves its inference all-reduce only; building
    # it takes minutes on first use. DeepSpeed keeps this dict for the process, so the
    # entry turns the build off (training reduces through torch.distributed either way).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # deepspeed.initialize keeps a communication backend that is already set and initialized.
    deepspeed.comm.comm.cdb = _reduce_freed_here()("gloo_one_thread", None, None)


# ZeRO-2 reduces each bucket of gradients on a flattened copy (``allreduce_bucket``:
# ``torch.cat`` of the bucket's slices, then ``dist.all_reduce``, or ``dist.reduce``
# to the slices' owner), and drops the copy once its slices are copied out. The
# returned collective has released the rank, not yet gloo's worker: its reference
# to the work (and so to the copy) goes a moment later, and when that is the last
# one the copy is freed on gloo's thread, unseen. Traced on SimpleModel: a
# 4,487,208 B ``flatten_dense_tensors`` block with no free in the session, or one
# found only when its address came back, on one rank, varying run to run. The same
# fence as ``dist_harness``'s reduce-scatter makes DeepSpeed drop the last reference
# on the rank's own thread: DeepSpeed's collective (the same call and buffers), then
# a one-element all-reduce on the same group, which gloo's one worker runs only after
# it let go of the collective before. The fence's element is made at import, before
# any measured session, so that the measurement sees no byte of it.
_FENCE = torch.zeros(1)


def _reduce_freed_here() -> type:
    """DeepSpeed's torch backend, with the fence above after every blocking
    all-reduce and reduce (a class made on call: DeepSpeed is an optional extra)."""
    from deepspeed.comm.reduce_op import ReduceOp
    from deepspeed.comm.torch import TorchBackend

    def fence(group):
        torch.distributed.all_reduce(_FENCE, group=group)

    class ReduceFreedHere(TorchBackend):
        def all_reduce(self, tensor, op=torch.distributed.ReduceOp.SUM, group=None, async_op=False):
            work = super().all_reduce(tensor, op=op, group=group, async_op=async_op)
            if not async_op:
                fence(group)
            return work

        def reduce(self, tensor, dst, op=ReduceOp.SUM, group=None, async_op=False):
            work = super().reduce(tensor, dst, op=op, group=group, async_op=async_op)
            if not async_op:
                fence(group)
            return work

    return ReduceFreedHere


def weights(model) -> dict:
    """The model's parameters, copied by numpy (outside the allocator the measurement sees)."""
    return {n: torch.from_numpy(p.detach().float().numpy().copy()) for n, p in model.named_parameters()}


def _engine(module, config: dict):
    import deepspeed

    engine, *_ = deepspeed.initialize(model=module, model_parameters=[p for p in module.parameters() if p.requires_grad],
                                      config=config)
    return engine


def _loss(out):
    return out if isinstance(out, torch.Tensor) else out["loss"]


def train(make_module, base, config: dict, batches: list, *, windows: int = 2, measure: bool = False,
          hold_outputs: bool = False) -> dict:
    """Train ``make_module(copy of base)`` under ``config`` on ``batches`` (one per micro-step,
    ``windows * accumulation`` of them, each a dict of keyword inputs). Returns the losses,
    the final weights, and with ``measure`` the absolute peak of the last window's forwards
    and backwards (``peak``) and of its optimizer step (``step_peak``). The loop keeps only
    the loss of the engine's outputs (``loss = engine(**batch).loss``), or with ``hold_outputs``
    all of them until backward ends, as the planner counts them: without, the prediction is
    high by the outputs backward does not need (a language model's logits)."""
    from profiles._torch_private import allocator_events, record_function_ranges
    from torch.profiler import ProfilerActivity, profile, record_function

    acc = config["gradient_accumulation_steps"]
    assert len(batches) == windows * acc
    losses = []
    with profile(activities=[ProfilerActivity.CPU], profile_memory=measure) as prof:
        model = copy.deepcopy(base)
        engine = _engine(make_module(model), config)
        for i, batch in enumerate(batches):
            last = i >= (windows - 1) * acc
            if measure and i == (windows - 1) * acc:
                gc.collect()  # the first call's compilation leaves cyclic garbage behind, freed before the measured window
            torch.manual_seed(1000 + i)  # the same dropout masks with and without the plan
            with record_function(f"ds:fb{i}" if last else "ds:warm"):
                out = engine(**batch)
                loss, held = _loss(out), (out if hold_outputs else None)
                del out
                engine.backward(loss)
                del held
            losses.append(loss.item())
            del loss
            with record_function("ds:step" if last and i == len(batches) - 1 else "ds:idle"):
                engine.step()
        result = {"losses": losses, "weights": weights(model)}
        engine.destroy()
        del engine, model
        gc.collect()
    if measure:
        events = allocator_events(prof)
        # one micro-batch is the step's input; the others wait outside the profiled session
        inputs = max(storage_bytes([v for v in b.values() if isinstance(v, torch.Tensor)]) for b in batches)
        spans = {name: (s, e) for s, e, name in record_function_ranges(prof, "ds:")}
        fb = [spans[f"fb{i}"] for i in range((windows - 1) * acc, windows * acc)]
        peak, missed = running_peak(events, start=fb[0][0], end=fb[-1][1])
        result["peak"], result["missed_frees"] = inputs + peak, missed
        result["step_peak"] = inputs + running_peak(events, start=spans["step"][0], end=spans["step"][1])[0]
    return result
