"""Record the dtypes the CPU LayerNorm and BatchNorm kernels really give their statistics under mixed precision.

On the CPU, ``aten.native_layer_norm`` and the batch-norm forwards with a bf16 or fp16
input and an fp32 weight (a LayerNorm or BatchNorm under ``torch.autocast``) return
their mean and rstd (invstd) in fp32, while the traced graph records them in the
input's dtype (the decomposition fake tensors follow). Bytes are counted from the
recorded values and op temporaries are measured on inputs built from them (the
batch-norm backward refuses bf16 statistics with an fp32 weight), so
:func:`record_layer_norm_stat_dtypes` records what the kernels return. Only
``node.meta["val"]`` changes: the ops that run are the same.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

__all__ = ["record_layer_norm_stat_dtypes"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)

#: Ops whose outputs 1 and 2 are the statistics, and where their weight is among the arguments.
_NORMS = {torch.ops.aten.native_layer_norm.default: 2,
          torch.ops.aten._native_batch_norm_legit_functional.default: 1,
          torch.ops.aten._native_batch_norm_legit.default: 1,
          torch.ops.aten._native_batch_norm_legit_no_training.default: 1,
          torch.ops.aten.native_batch_norm.default: 1}


def _mixed_on_cpu(node: fx.Node) -> bool:
    """Whether ``node`` (one of ``_NORMS``) takes a low-precision CPU input and an fp32 weight."""
    x = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    where = _NORMS[node.target]
    weight = node.args[where] if len(node.args) > where else None
    w = weight.meta.get("val") if isinstance(weight, fx.Node) else None
    return (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and x.device.type == "cpu"
            and x.dtype in _LOW_PRECISION and w.dtype == torch.float32)


def record_layer_norm_stat_dtypes(gm: fx.GraphModule) -> int:
    """Give the statistics of every mixed-precision CPU layer norm and batch norm in ``gm``
    (and the ``getitem`` nodes that take them) fp32 values. Returns how many ops changed."""
    changed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _NORMS:
            continue
        val = node.meta.get("val")
        if not isinstance(val, (tuple, list)) or len(val) < 3 or not _mixed_on_cpu(node):
            continue
        if val[1].dtype == torch.float32 and val[2].dtype == torch.float32:
            continue
        fixed = (val[0], val[1].to(torch.float32), val[2].to(torch.float32), *val[3:])
        node.meta["val"] = fixed
        for user in node.users:
            if user.op == "call_function" and user.target is operator.getitem and user.args[1] in (1, 2):
                user.meta["val"] = fixed[user.args[1]]
        changed += 1
    return changed
