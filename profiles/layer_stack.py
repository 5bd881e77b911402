"""Find a model's stack of identical layers, and run it with fewer of them.

A *layer stack* is an ``nn.ModuleList`` whose entries are copies of one layer:
the same class, and parameters and buffers of the same names, shapes, dtypes and
``requires_grad`` (a transformer's ``model.layers``, GPT-2's ``transformer.h``).
:func:`shortened` swaps the list for one holding its first few layers (the same
module objects) for the duration of a ``with`` block, which is how
:mod:`profiles.repeat_capture` traces a deep model at the cost of a shallow one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

from torch import nn

__all__ = ["LayerStack", "find_layer_stack", "shortened"]


@dataclass(frozen=True, kw_only=True, slots=True)
class LayerStack:
    """A module list of identical layers inside a model."""

    #: Dotted path of the list from the model, e.g. ``transformer.h``.
    path: str
    #: The module holding the list, and the list's attribute name in it.
    parent: nn.Module
    name: str
    #: How many layers the list holds.
    depth: int


_PLAIN = (bool, int, float, str, type(None))


def _settings(module: nn.Module) -> dict[tuple[str, str], object]:
    """Each submodule's plain public attributes (numbers, strings, flags: a sliding
    window, a "use rope" flag), but ``training``."""
    return {(path, name): value for path, mod in module.named_modules() for name, value in vars(mod).items()
            if name != "training" and not name.startswith("_") and isinstance(value, _PLAIN)}


def _same_settings(layers: list[nn.Module]) -> bool:
    """Whether the layers' settings agree, but for counters of the layer's position
    (``layer_idx``: 0, 1, 2, ... or from another start)."""
    each = [_settings(layer) for layer in layers]
    if any(s.keys() != each[0].keys() for s in each):
        return False
    for key, first in each[0].items():
        values = [s[key] for s in each]
        if all(v == first for v in values):
            continue
        counter = all(type(v) is int for v in values) and values == list(range(values[0], values[0] + len(values)))
        if not counter:
            return False
    return True


def _layout(module: nn.Module) -> tuple:
    """What two layers must share to be copies: class, and each tensor's name, shape,
    dtype and grad flag (their settings are compared by :func:`_same_settings`)."""
    tensors = [(n, tuple(t.shape), t.dtype, t.requires_grad) for n, t in module.named_parameters()]
    tensors += [(n, tuple(t.shape), t.dtype, False) for n, t in module.named_buffers()]
    return (type(module), tuple(tensors))


def _mixed_layer_types(model: nn.Module) -> bool:
    """A Hugging Face config that gives its layers different kinds (``layer_types``:
    sliding-window and full attention)."""
    types = getattr(getattr(model, "config", None), "layer_types", None)
    return isinstance(types, (list, tuple)) and len(set(map(str, types))) > 1


def find_layer_stack(model: nn.Module, min_depth: int) -> LayerStack | None:
    """The module list of at least ``min_depth`` identical layers holding the most
    parameters (None when there is none). A list whose layers share a parameter
    or buffer with each other, or with the rest of the model, is not a stack; nor
    is any list of a model whose config mixes layer types."""
    if _mixed_layer_types(model):
        return None
    best: tuple[int, LayerStack] | None = None
    owners: dict[int, int] = {}
    for mod in model.modules():
        for t in [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]:
            owners[id(t)] = owners.get(id(t), 0) + 1
    for path, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < min_depth or not path:
            continue
        if len({_layout(layer) for layer in mod}) != 1 or not _same_settings(list(mod)):
            continue
        tensors = [t for layer in mod for t in [*layer.parameters(), *layer.buffers()]]
        if any(owners.get(id(t), 0) != 1 for t in tensors) or len({id(t) for t in tensors}) != len(tensors):
            continue
        size = sum(t.numel() for t in tensors)
        parent_path, _, name = path.rpartition(".")
        stack = LayerStack(path=path, parent=model.get_submodule(parent_path), name=name, depth=len(mod))
        if best is None or size > best[0]:
            best = (size, stack)
    return best[1] if best else None


@contextlib.contextmanager
def shortened(stack: LayerStack, depth: int) -> Iterator[None]:
    """Within the block, the stack holds only its first ``depth`` layers (the same
    module objects); the full list is put back afterwards, whatever happens."""
    full = stack.parent._modules[stack.name]
    if not isinstance(full, nn.ModuleList) or len(full) != stack.depth:
        raise RuntimeError(f"{stack.path} is no longer the module list of {stack.depth} layers that was found")
    stack.parent._modules[stack.name] = nn.ModuleList(list(full)[:depth])
    try:
        yield
    finally:
        stack.parent._modules[stack.name] = full

