"""Training-mode BatchNorm backward reads no running statistics: stop handing it the new ones.

AOTAutograd's functional BatchNorm (``_native_batch_norm_legit_functional``) returns
the updated running mean and variance, copies them into the buffers at the end of
forward, and passes them to ``native_batch_norm_backward``. With ``train=True`` that
kernel (and its decomposition) reads the saved mean and inverse std only, never the
running statistics, yet passing them makes forward save them for backward: two
channel-sized tensors per BatchNorm that eager autograd does not keep.
:func:`drop_unread_running_stats` passes ``None`` in their place, so forward saves
what eager saves; the results are the same bit for bit.
"""

from __future__ import annotations

import torch
from torch import fx

__all__ = ["drop_unread_running_stats"]

_BACKWARD = torch.ops.aten.native_batch_norm_backward.default
#: Positions of ``running_mean``, ``running_var`` and ``train`` among its arguments.
_RUNNING, _TRAIN = (3, 4), 7


def drop_unread_running_stats(gm: fx.GraphModule) -> int:
    """Pass ``None`` as the running statistics of every training-mode
    ``native_batch_norm_backward`` of ``gm`` (in place; recompiled when changed).
    Returns how many were changed."""
    changed = 0
    for node in gm.graph.find_nodes(op="call_function", target=_BACKWARD):
        if len(node.args) <= _TRAIN or node.args[_TRAIN] is not True:
            continue
        if all(node.args[i] is None for i in _RUNNING):
            continue
        node.args = tuple(None if i in _RUNNING else a for i, a in enumerate(node.args))
        changed += 1
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed
