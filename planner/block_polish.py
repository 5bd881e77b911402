"""Improve a block master's integer solution one block copy at a time.

Column generation finds the patterns the LP relaxation wants; an integer solution
may want others (a block that keeps a little more so that its neighbour can
keep less). Here each copy in turn solves its own pattern ILP (the kind's rules,
:class:`planner.block_patterns.PatternIlp`) under every row of the master, with
the other copies and values fixed at the solution: the cheapest pattern (in
budget mode) or the one that lowers the peak most (in least-peak mode) that
keeps the solution feasible. A better pattern replaces the copy's and becomes a
column of every copy of its kind, so that the master's MILP, solved again from
the improved solution, can combine the new patterns.
"""

from __future__ import annotations

import numpy as np

from .block_master import BlockMaster
from .block_patterns import Pattern, PatternIlp
from .highs import HighsModel

__all__ = ["polish", "AREA_PRICE"]

#: Objective price of a pattern's memory summed over the memory rows (scaled bytes),
#: far below any difference in recompute cost.
AREA_PRICE = 1e-7


def polish(master: BlockMaster, x: np.ndarray, ilps: dict[str, PatternIlp], *, sweeps: int = 2,
           group: int = 2) -> np.ndarray | None:
    """Improve the MILP solution ``x``: each copy alone, then each run of ``group``
    neighbouring copies of one kind (``sweeps`` passes); the improved solution over the
    master's columns (new ones included), or None when nothing better was found."""
    chosen = master.chosen(x)
    act = master.model.activities()
    # memory rows hold "- peak" (least peak) or "- slack" (0 in a MILP solution): their activity without it
    act[master.num_struct:] += x[master.extra]
    peak = _peak(master, act)
    copies = sorted(chosen)
    groups = [[c] for c in copies] + [copies[i:i + group] for i in range(len(copies) - group + 1)
                                      if len({li for li, _ in copies[i:i + group]}) == 1] if group > 1 else []
    improved = False
    for _ in range(sweeps):
        changed = False
        for g in groups:
            found = _best_in_context(master, ilps, g, chosen, act, peak)
            if found is None:
                continue
            new, peak = found
            for (li, k), p in zip(g, new):
                old_idx, old_val = master.column_entries(li, k, chosen[(li, k)])
                for kk in range(len(master.layouts[li].blocks)):
                    master.add_patterns(li, kk, [p])
                new_idx, new_val = master.column_entries(li, k, p)
                act = _grow(act, master.model.num_rows)
                act[old_idx] -= old_val
                act[new_idx] += new_val
                chosen[(li, k)] = p
            changed = improved = True
        if not changed:
            break
    if not improved:
        return None
    start = np.zeros(master.model.num_cols)
    start[: len(master.node_cols)] = x[: len(master.node_cols)]
    start[master.extra] = peak if master.budget is None else 0.0
    for key, pattern in chosen.items():
        start[master.column_of[(*key, pattern)]] = 1.0
    return start


def _values(ilp: PatternIlp, p: Pattern) -> np.ndarray:
    """``p`` as 0/1 values over the columns of :meth:`PatternIlp.rules`."""
    lay = ilp.layout
    return np.array([1.0 if i in p.recompute else 0.0 for i in lay.recomputable]
                    + [1.0 if i in p.save else 0.0 for i in lay.candidates])


def _peak(master: BlockMaster, act: np.ndarray) -> float:
    """The model's peak (scaled) over the memory rows added, for row activities ``act``."""
    const = master.memory.const[np.array(master.mem_rows, dtype=int)] * master.scale
    return float((const + act[master.num_struct:master.num_struct + len(const)]).max(initial=0.0))


def _grow(a: np.ndarray, n: int) -> np.ndarray:
    return a if len(a) >= n else np.concatenate([a, np.zeros(n - len(a))])


def _best_in_context(master: BlockMaster, ilps, group: list[tuple[int, int]], chosen: dict, act: np.ndarray,
                     peak: float) -> tuple[list[Pattern], float] | None:
    """The best patterns for the copies ``group`` with everything else as in ``act``
    (row activities, the peak column left out); None when none beats their patterns in ``chosen``."""
    least_peak = master.budget is None
    peak_cost = 1.0 if least_peak else 0.0
    others = act.copy()
    m = HighsModel(gap=1e-9)
    coefs, costs, spans = [], [], []
    for li, k in group:
        lay = master.layouts[li]
        old_idx, old_val = master.column_entries(li, k, chosen[(li, k)])
        others[old_idx] -= old_val
        nr, ns = len(lay.recomputable), len(lay.candidates)
        block = lay.blocks[k]
        cost = np.concatenate([[master.weights[block.forward[i]] for i in lay.recomputable], np.zeros(ns)])
        coefs.append(_own_coefficients(master, li, k))
        # less memory summed over the rows breaks ties between equally cheap patterns:
        # what one copy frees, the next move can spend
        cost = cost + AREA_PRICE * coefs[-1][master.num_struct:].sum(axis=0)
        first = m.add_cols(cost, np.zeros(nr + ns), np.ones(nr + ns), [], integer=True).start
        lower, upper, rules = ilps[lay.kind].rules()
        m.add_rows(lower, upper, [(idx + first, val) for idx, val in rules])
        costs.append(cost)
        spans.append((first, nr + ns))
    total = m.num_cols
    m.add_cols([peak_cost], [0.0], [1e30 if least_peak else master.budget * master.scale], [], integer=False)
    coef = np.concatenate(coefs, axis=1)
    picks = {master.pick_row[c] for c in group}
    lower, upper, rows = [], [], []
    for j in range(master.model.num_rows):
        if j in picks:
            continue
        nz = np.nonzero(coef[j])[0]
        idx, val = nz.astype(np.int32), coef[j, nz]
        if j >= master.num_struct:  # own + others + const <= peak
            idx, val = np.append(idx, total).astype(np.int32), np.append(val, -1.0)
            lower.append(None)
            upper.append(-float(master.memory.const[master.mem_rows[j - master.num_struct]]) * master.scale - others[j])
            rows.append((idx, val))
            continue
        if not len(nz):
            continue
        lo, hi = master.row_lower[j], master.row_upper[j]
        lower.append(None if lo is None else lo - others[j])
        upper.append(None if hi is None else hi - others[j])
        rows.append((idx, val))
    m.add_rows(lower, upper, rows)
    status, found = m.solve(integer=True)
    import os
    if os.environ.get("POLISH_DEBUG"):
        print("    sub", status, found, found and m.objective())
    if not found:
        return None
    sol = m.values()
    new = [ilps[master.layouts[li].kind].pattern_of(sol[f:f + n]) for (li, _), (f, n) in zip(group, spans)]
    new_obj = sum(float(c @ np.round(sol[f:f + n])) for c, (f, n) in zip(costs, spans))
    old_obj = sum(float(c @ _values(ilps[master.layouts[li].kind], chosen[(li, k)]))
                  for (li, k), c in zip(group, costs))
    new_peak = float(sol[total])
    new_obj, old_obj = new_obj + peak_cost * new_peak, old_obj + peak_cost * peak
    if new == [chosen[c] for c in group] or new_obj >= old_obj - 1e-9 * (1.0 + abs(old_obj)):
        return None
    return new, new_peak


def _own_coefficients(master: BlockMaster, li: int, k: int) -> np.ndarray:
    """Rows x the copy's variables (r per recomputable position, then s per
    candidate position): each variable's coefficient in each master row."""
    lay = master.layouts[li]
    block = lay.blocks[k]
    nr = len(lay.recomputable)
    out = np.zeros((master.model.num_rows, nr + len(lay.candidates)))
    at = {i: c for c, i in enumerate(lay.candidates)}
    for v, i in enumerate(lay.recomputable):
        for j, c in master.terms_of.get((block.forward[i], "r"), ()):
            out[j, v] += c
    for v, i in enumerate(lay.candidates):
        for j, c in master.terms_of.get((block.forward[i], "s"), ()):
            out[j, nr + v] += c
    rows = np.array(master.mem_rows, dtype=int)
    if len(rows):
        cols = lay.columns[k]
        mem = master.memory
        base = master.num_struct
        out[base:base + len(rows), nr:] = mem.save[np.ix_(rows, cols)] * master.scale
        for v, i in enumerate(lay.recomputable):
            if i in at:
                out[base:base + len(rows), v] = mem.recompute[rows, cols[at[i]]] * master.scale
    return out
