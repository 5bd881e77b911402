"""Run traced attention as eager runs it: ``is_causal`` instead of a constant causal mask,
grouped key/value heads instead of repeated ones.

Under ``torch.compile``, Hugging Face transformers (5.x) builds an explicit boolean causal
mask and passes it to ``scaled_dot_product_attention``, where eager passes
``attn_mask=None, is_causal=True``. With a mask it also repeats the key/value heads
(``repeat_kv``) instead of passing ``enable_gqa=True``. The traced step therefore saves a
float copy of the mask per layer and the repeated keys and values, which eager does not:
more memory than eager, with the same results up to rounding.

:func:`restore_causal_sdpa` rewrites the graph dynamo hands its backend (torch-level,
before AOTAutograd), for every attention call that runs without dropout:

- an ``attn_mask`` computed from constants alone (no graph input reaches it; nothing
  random) is evaluated once; when it is boolean, does not broadcast the output, and
  equals the causal lower-triangular mask over (query length, key length) in every
  batch and head, the call gets ``attn_mask=None, is_causal=True``;
- then, with no mask left, keys and values that are ``repeat_kv``'s pattern
  (``x[:, :, None, :, :].expand(B, kv_heads, n_rep, S, D).reshape(B, kv_heads * n_rep, S, D)``,
  the same ``n_rep`` for both) are replaced by the unrepeated ``x``, and the call gets
  ``enable_gqa=True`` (query head ``h`` reads key/value head ``h // n_rep``, as ``repeat_kv``
  arranges it).

A mask that depends on an input (an ``attention_mask`` with padding) is left alone. Both
rewrites compute the same function; the nodes that only fed them are removed. Capture and
the runtime apply the same rewrite (:func:`with_causal_sdpa`), so plans describe the
graphs that run.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from ._torch_private import real_tensors, tree_map

__all__ = ["restore_causal_sdpa", "with_causal_sdpa"]

#: The torch-level attention call dynamo records (``F.scaled_dot_product_attention``).
_SDPA = F.scaled_dot_product_attention
#: Its parameters after query, key and value, in order, with their defaults.
_SDPA_PARAMS = (("attn_mask", None), ("dropout_p", 0.0), ("is_causal", False), ("scale", None), ("enable_gqa", False))
#: Parts of op names that draw random numbers: a mask built from them is never treated as a constant.
_RANDOM_WORDS = ("rand", "bernoulli", "dropout", "normal", "uniform", "multinomial", "poisson", "exponential", "cauchy")
#: The in-place operators of the ``operator`` module, as dynamo records ``x += y`` and ``x[i] = y``.
_OPERATOR_IN_PLACE = frozenset({
    "setitem", "delitem", "iadd", "isub", "imul", "imatmul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior",
    "ixor", "ilshift", "irshift", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__iand__", "__ior__", "__ixor__",
})
#: ``x[:, :, None, :, :]``: the index of ``repeat_kv``'s new axis.
_NEW_AXIS = (slice(None), slice(None), None, slice(None), slice(None))


def _sdpa_kwargs(node: fx.Node) -> dict[str, Any] | None:
    """The attention call's arguments after query, key and value, as keywords (None when
    it is not called as ``(query, key, value, ...)``)."""
    if len(node.args) < 3 or len(node.args) > 3 + len(_SDPA_PARAMS):
        return None
    kw = dict(_SDPA_PARAMS)
    kw.update(zip((name for name, _ in _SDPA_PARAMS), node.args[3:]))
    kw.update(node.kwargs)
    return kw if set(kw) == {name for name, _ in _SDPA_PARAMS} else None


def _mutates(node: fx.Node) -> bool:
    """Whether ``node`` writes into one of its arguments (``x.add_(y)``, ``x[i] = y``, ``x += y``)."""
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if getattr(node.target, "__module__", None) in ("_operator", "operator"):
            return name in _OPERATOR_IN_PLACE
    else:
        return False
    return name in _OPERATOR_IN_PLACE or name in ("__setitem__", "copy_") or (
        name.endswith("_") and not name.endswith("__"))


def _cone(node: fx.Node) -> list[fx.Node] | None:
    """The nodes ``node`` is computed from, in graph order, when they are all calls that
    read no graph input, no attribute and nothing random, and nothing writes into what
    they compute before the attention calls read it; None otherwise."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op not in ("call_function", "call_method"):
            return None
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        if any(word in name.lower() for word in _RANDOM_WORDS):
            return None
        stack.extend(n.all_input_nodes)
    # what reads the cone, up to the attention calls (whose outputs alias nothing of it):
    # an in-place write there may change the mask after the values the cone computes
    reached, stack = set(), list(seen)
    while stack:
        n = stack.pop()
        if n in reached:
            continue
        reached.add(n)
        if _mutates(n):
            return None
        if not (n.op == "call_function" and n.target is _SDPA):
            stack.extend(n.users)
    return [n for n in node.graph.nodes if n in seen]


def _evaluate(nodes: list[fx.Node]) -> Any:
    """Run ``nodes`` (a cone from :func:`_cone`); the last one's value."""
    env: dict[fx.Node, Any] = {}
    with torch.no_grad():
        for n in nodes:
            args, kwargs = tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, (n.args, n.kwargs))
            if n.op == "call_method":
                env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
            else:
                env[n] = n.target(*args, **kwargs)
    return env[nodes[-1]]


def _shape(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _is_causal_mask(mask: Any, query: fx.Node, key: fx.Node) -> bool:
    """Whether ``mask`` is boolean, leaves the attention's shape as it is, and is the
    causal lower-triangular mask in every batch and head."""
    q, k = _shape(query), _shape(key)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or q is None or k is None or len(q) < 2:
        return False
    target = (*q[:-1], k[-2])
    try:
        if torch.broadcast_shapes(mask.shape, target) != target:
            return False
    except RuntimeError:  # not broadcastable: the call itself would fail, leave it to fail
        return False
    causal = torch.ones(target[-2:], dtype=torch.bool, device=mask.device).tril()
    full = torch.broadcast_shapes(mask.shape, causal.shape)
    return torch.equal(mask.expand(full), causal.expand(full))


def _unrepeated(node: Any) -> tuple[fx.Node, int] | None:
    """``(x, n_rep)`` when ``node`` is ``repeat_kv(x, n_rep)`` with ``n_rep > 1``, else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "reshape"):
        return None
    expand = node.args[0]
    if not (isinstance(expand, fx.Node) and expand.op == "call_method" and expand.target == "expand"):
        return None
    index = expand.args[0]
    if not (isinstance(index, fx.Node) and index.op == "call_function" and index.target is operator.getitem
            and len(index.args) == 2 and index.args[1] == _NEW_AXIS and isinstance(index.args[0], fx.Node)):
        return None
    x = index.args[0]
    src, rep, out = _shape(x), _shape(expand), _shape(node)
    if src is None or rep is None or out is None or len(src) != 4:
        return None
    b, kv, s, d = src
    n_rep = rep[2] if len(rep) == 5 else 0
    if n_rep < 2 or rep != (b, kv, n_rep, s, d) or out != (b, kv * n_rep, s, d):
        return None
    return x, n_rep


def _erase_unused(graph: fx.Graph, nodes: set[fx.Node]) -> None:
    """Erase those of ``nodes`` (pure calls of ``graph``) that nothing reads any more, last first."""
    for n in reversed([n for n in graph.nodes if n in nodes]):
        if not n.users:
            graph.erase_node(n)


def _rewrite(node: fx.Node, causal: dict[tuple, list[fx.Node] | None]) -> bool:
    """Rewrite one attention call (see the module docstring); whether it changed.
    ``causal`` maps each (mask node, query shape, key shape) already looked at to the
    mask's cone when it is causal there (None when not), so a mask shared by every
    layer is evaluated once."""
    kw = _sdpa_kwargs(node)
    if kw is None or kw["dropout_p"] != 0.0 or kw["enable_gqa"] is not False:
        return False
    query, key, value = node.args[:3]
    dead: list[fx.Node] = []
    mask = kw["attn_mask"]
    if isinstance(mask, fx.Node) and kw["is_causal"] is False:
        seen = (mask, _shape(query), _shape(key))
        if seen not in causal:
            cone = _cone(mask)
            with real_tensors():  # a meta model is captured inside a fake mode
                causal[seen] = cone if cone is not None and _is_causal_mask(_evaluate(cone), query, key) else None
        cone = causal[seen]
        if cone is None:
            return False
        kw.update(attn_mask=None, is_causal=True)
        dead += cone
    elif mask is not None:
        return False
    rep_k, rep_v = _unrepeated(key), _unrepeated(value)
    q, k = _shape(query), _shape(key)
    if (rep_k is not None and rep_v is not None and rep_k[1] == rep_v[1]
            and q is not None and k is not None and len(q) == 4 and q[:2] == k[:2]):
        dead += [key, value, key.args[0], value.args[0], key.args[0].args[0], value.args[0].args[0]]
        key, value = rep_k[0], rep_v[0]
        kw["enable_gqa"] = True
    if not dead:
        return False
    node.args = (query, key, value)
    node.kwargs = kw
    _erase_unused(node.graph, set(dead))
    return True


def restore_causal_sdpa(gm: fx.GraphModule) -> int:
    """Rewrite ``gm`` (a dynamo graph, torch-level) in place as the module docstring says;
    returns how many attention calls were rewritten."""
    causal: dict[tuple, list[fx.Node] | None] = {}
    count = sum(_rewrite(n, causal) for n in list(gm.graph.find_nodes(op="call_function", target=_SDPA)))
    if count:
        gm.recompile()
    return count


def with_causal_sdpa(backend: Callable) -> Callable:
    """The ``torch.compile`` backend ``backend``, given each graph after
    :func:`restore_causal_sdpa`."""

    def compile_restored(gm: fx.GraphModule, example_inputs):
        restore_causal_sdpa(gm)
        return backend(gm, example_inputs)

    return compile_restored
