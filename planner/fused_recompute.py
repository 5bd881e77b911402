"""Under Inductor, recompute the pointwise values backward can rebuild from what it keeps anyway.

Inductor generates a recomputed pointwise op inside the backward kernel that reads
it: it costs its arithmetic, while a saved value costs a write in forward and a
read in backward. torch's min-cut partitioner recomputes such values for that
reason; a plan that saved them all (the budget above the step's peak) ran 8%
slower than ``torch.compile`` on a 4-layer GPT-2 (BENCHMARKS.md).

:func:`recompute_fused` adds to a plan for Inductor each saved value that Inductor
fuses (:func:`planner.executor.is_extern` says which it does not), may be
recomputed, owns bytes and is not held anyway (a model output), and whose forward
inputs backward has without it: saved, recomputed, or added here. Recomputing it
adds no saved value and frees its own. The result is kept when its exact
simulation peaks no higher than the plan and within ``usable`` bytes.
"""

from __future__ import annotations

from .evaluation import Evaluation
from .executor import is_extern
from .problem import Problem

__all__ = ["recompute_fused"]


def recompute_fused(prob: Problem, ev: Evaluation, usable: float) -> Evaluation:
    """``ev`` with the fused values backward can rebuild from what it keeps recomputed
    as well, when that fits; ``ev`` itself for a plan not run by Inductor."""
    if prob.gp.joint.executor != "inductor":
        return ev
    info = prob.gp.nodes
    available = set(ev.saved) | set(ev.recompute)
    added: set[str] = set()
    for name in prob.fwd:  # forward order: a value's inputs are decided before it
        if (name not in ev.saved or name not in prob.can_recompute or name in prob.free_save
                or name in prob.parent or not prob.own_bytes.get(name) or is_extern(info[name].op)):
            continue
        if all(i in available or i in added for i in prob.fwd_inputs.get(name, ())):
            added.add(name)
    if not added:
        return ev
    new = prob.evaluate(frozenset(ev.recompute) | added)
    return new if new.sim.peak_bytes <= min(ev.sim.peak_bytes, usable) else ev
