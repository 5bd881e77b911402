"""Two gloo processes on loopback, and a per-rank peak measured from torch.profiler.

Shared by ``tests/test_distributed.py`` and ``bench/bench_distributed.py``: the
engines (DDP, FSDP2) set up so that the profiler sees every free, two training
steps with AdamW in between (the peak of a measured region:
``profiles.memory.allocator_peak``).
"""

from __future__ import annotations

import copy
import gc
import socket
from typing import NamedTuple

import torch
import torch.distributed as dist

# FSDP2's interface for a custom reduce-scatter (FSDPModule.set_custom_reduce_scatter is
# public, the base class it takes is not exported): used only by the measurement fence below.
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

from helpers import run_step
from profiles import storage_bytes
from profiles.memory import allocator_peak

__all__ = ["WORLD", "free_port", "init", "spawn", "wrap", "local_grads", "assert_same_grads", "train", "train_against_eager", "PlannedRun"]

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Measuring a rank's memory with torch.profiler: the profiler sees an allocator
# event only on a thread it profiles, and gloo runs collectives on worker threads of
# its own. Whichever thread drops a collective's last reference frees its buffers;
# when that is gloo's thread, the free is never reported and the block looks held for
# the rest of the session. Found in CI: every FSDP2 run measured 541 KB too much
# (never on the idle development machine); the likely block is the 532 KB clone
# of the reduce-scatter input that gloo's work holds. Two test-only changes make
# the frees land on the rank's own thread without changing what is allocated or
# when it is freed, and the measurement corrects for any free still missed when
# the block's address is reused (``profiles.memory.allocator_peak``):
# - gloo with one worker thread (stock gloo uses two), so the collectives of a rank
#   run one after another, each released before the next starts;
# - FSDP2's own reduce-scatter (the same dist call as its default), followed by a
#   one-element all-reduce on the same group: when that returns, gloo's worker has
#   let go of the reduce-scatter, and the reference dropped here is the last one.


def _gloo_one_thread(store, rank, size, timeout):
    opts = dist.ProcessGroupGloo._Options()
    opts._threads = 1
    opts._timeout = timeout
    opts._devices = [dist.ProcessGroupGloo.create_default_device()]
    return dist.ProcessGroupGloo(store, rank, size, opts)


def init(rank: int, port: int) -> None:
    if "gloo_one_thread" not in dist.Backend.backend_list:
        dist.Backend.register_backend("gloo_one_thread", _gloo_one_thread, devices=["cpu"])
    dist.init_process_group("gloo_one_thread", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)


class _ReduceScatterFreedHere(ReduceScatter):
    """FSDP2's default reduce-scatter (same call, same buffers), then the fence described above."""

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)  # as FSDP2's DefaultReduceScatter

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        work = dist.reduce_scatter_single(output=output_tensor, input=input_tensor, group=group, op=op, async_op=True)
        work.wait()
        dist.all_reduce(torch.zeros(1), group=group)  # gloo's one worker released `work` before running this
        del work  # the last reference: gloo's clone of the input is freed on this thread
        return None


def spawn(fn, *args) -> None:
    torch.multiprocessing.spawn(fn, args=(free_port(), *args), nprocs=WORLD, join=True)


def wrap(module, sharding: str, order: str = "outer"):
    """``module`` wrapped by the engine; ``order="inner"``: fully_shard first, the plan inside."""
    if sharding == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # Small buckets: several of them, which dynamo's DDPOptimizer would split the graph at.
        # No initial broadcast (every rank builds the same model from one seed): gloo
        # sometimes frees the broadcast's flat buffer on its own thread, where the
        # profiler does not see the free, and the measurement would keep it forever.
        return DistributedDataParallel(module, bucket_cap_mb=0.1, init_sync=False)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    sharded = fully_shard(module, mesh=init_device_mesh("cpu", (WORLD,)))
    sharded.set_custom_reduce_scatter(_ReduceScatterFreedHere())
    return sharded


def local_grads(model) -> dict:
    """This rank's gradients, copied by numpy: outside the torch allocator the measurement sees."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        out[name] = None if g is None else torch.from_numpy((g.to_local() if hasattr(g, "to_local") else g).detach().numpy().copy())
    return out


def assert_same_grads(ref: dict, got: dict, what: str, *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert ref.keys() == got.keys()
    for k in ref:
        if ref[k] is None:
            assert got[k] is None, f"{what}: {k} has a gradient only with the plan"
        else:
            assert got[k] is not None, f"{what}: {k} has no gradient with the plan"
            torch.testing.assert_close(got[k], ref[k], rtol=rtol, atol=atol, msg=lambda m: f"{what}, grad of {k}: {m}")


def train(wrapped, model, inputs, *, measure: str = ""):
    """Two steps with AdamW in between; returns (grads of step 1, grads of step 2, absolute peak of step 2)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    run_step(wrapped, inputs, seed=10)
    first = local_grads(model)
    opt.step()
    opt.zero_grad(set_to_none=True)
    gc.collect()  # the first call's compilation leaves cyclic garbage behind
    if measure:
        from torch.profiler import record_function

        with record_function(measure):
            run_step(wrapped, inputs, seed=11)
    else:
        run_step(wrapped, inputs, seed=11)
    return first, local_grads(model)


class PlannedRun(NamedTuple):
    """What :func:`train_against_eager` measured of the planned run."""

    #: Absolute peak of the second step (inputs included) and the frees the profiler evidently missed.
    measured: int
    missed_frees: int
    #: The planned module's ``compiled_graphs``, and the reference's gradients at both steps.
    compiled_graphs: list
    reference: tuple


def train_against_eager(base, inputs, sharding: str, apply, what: str, *, region: str, **tolerance) -> PlannedRun:
    """Train ``sharding`` around ``apply(copy of base)`` and around a copy of ``base``
    itself; assert equal gradients at both steps (``what`` names the case). Everything
    the planned run holds is allocated inside a profiled session, so its frees are
    seen too (frees of older memory are not reported); its second step is traced as
    ``region``."""
    from torch.profiler import ProfilerActivity, profile

    ref_model = copy.deepcopy(base)
    ref = train(wrap(ref_model, sharding), ref_model, inputs)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = copy.deepcopy(base)
        planned = apply(model)
        got = train(wrap(planned, sharding), model, inputs, measure=region)
        graphs = list(planned.compiled_graphs)
        del model, planned
        gc.collect()
    for step in (0, 1):
        assert_same_grads(ref[step], got[step], f"{what}, {sharding}, step {step + 1}", **tolerance)
    peak, missed = allocator_peak(prof, region=region)
    return PlannedRun(measured=storage_bytes(inputs.values()) + peak, missed_frees=missed, compiled_graphs=graphs,
                      reference=ref)
