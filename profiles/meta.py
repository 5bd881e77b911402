"""Capture a model built on the meta device without allocating it.

``with torch.device("meta"): model = ...`` builds a model whose tensors have shapes
and dtypes but no storage. Capturing such a model directly would trace meta
kernels, which differ from the real device's: some composite ops (``nll_loss``)
have meta kernels that bypass autograd, so the captured step would have no
backward. Instead, every meta parameter, buffer and input is swapped, for the
duration of the capture, for a *fake* CPU tensor (``FakeTensorMode``: metadata
only, no storage) with the same shape, strides, dtype and ``requires_grad``, and
the capture runs inside that fake mode. The graph is then the one a CPU model of
the same shapes gives (same ops, same fingerprint), and nothing is allocated.

Limits: the fake device is CPU, so ops whose kernel depends on the device
(``scaled_dot_product_attention`` picks a CUDA kernel on a GPU) are captured as
their CPU variants; a fake CUDA device is not possible on a CPU-only torch build.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ._torch_private import fake_tensor_mode, tree_leaves, tree_map_only

__all__ = ["uses_meta", "capture_meta", "FAKE_DEVICE"]

#: The device the fake tensors claim to be on while a meta model is captured.
FAKE_DEVICE = torch.device("cpu")


def _is_meta(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "meta"


def uses_meta(model: nn.Module, args: tuple, kwargs: dict) -> bool:
    """True when any parameter, buffer or input tensor of the step is on the meta device."""
    if any(_is_meta(t) for t in tree_leaves((args, kwargs))):
        return True
    return any(_is_meta(p) for p in model.parameters()) or any(_is_meta(b) for b in model.buffers())


def _faker(mode) -> Callable[[torch.Tensor], torch.Tensor]:
    """Tensor -> fake CPU tensor of the same layout (meta tensors) or the same
    metadata (real ones, through ``mode.from_tensor``, which copies nothing). The
    same tensor passed twice (``input_ids`` that are also ``labels``) gets the same
    fake, so the captured step sees one input as the real one would."""
    memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) in memo:
            return memo[id(t)][1]
        if t.device.type == "meta":
            with mode:
                out = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device=FAKE_DEVICE)
            if t.requires_grad:
                out.requires_grad_(True)
        else:
            out = mode.from_tensor(t)
        memo[id(t)] = (t, out)  # keeps t alive so its id is not reused
        return out

    return fake


@contextlib.contextmanager
def _swapped(model: nn.Module, fake: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace every parameter and buffer of ``model`` by its fake (a tensor shared
    by several modules, e.g. tied weights, gets one fake), and put the originals
    back afterwards, whatever happens."""
    memo: dict[int, torch.Tensor] = {}
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    try:
        for mod in model.modules():
            for kind in ("_parameters", "_buffers"):
                table = getattr(mod, kind)
                for key, t in list(table.items()):
                    if t is None:
                        continue
                    if id(t) not in memo:
                        f = fake(t.detach())
                        if isinstance(t, nn.Parameter):
                            f = nn.Parameter(f, requires_grad=t.requires_grad)
                        memo[id(t)] = f
                    swapped.append((table, key, t))
                    table[key] = memo[id(t)]
        yield
    finally:
        for table, key, t in reversed(swapped):
            table[key] = t


def capture_meta(model: nn.Module, args: tuple, kwargs: dict, capture_fn: Callable[..., Any], **capture_kw):
    """Run ``capture_fn(model, inputs, **capture_kw)`` on fake CPU stand-ins of the
    model's meta tensors and of the inputs; return its joint graph with no real
    values (``primal_values`` empty) and ``fake`` set."""
    mode = fake_tensor_mode()
    fake = _faker(mode)
    f_args, f_kwargs = tree_map_only(torch.Tensor, fake, (args, kwargs))
    inputs = f_kwargs if f_kwargs else f_args
    with _swapped(model, fake), mode:
        joint = capture_fn(model, inputs, **capture_kw)
    return dataclasses.replace(joint, primal_values=[], fake=True)  # fakes: nothing to run
