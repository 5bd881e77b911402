"""Two small custom ops that let backward regenerate a dropout mask exactly.

``planner_rng::state(like)`` returns the RNG state of ``like``'s device generator
(a CPU byte tensor: 5,056 bytes for the CPU generator, 16 for a CUDA one). It reads
global state, so it is tagged ``nondeterministic_seeded``: the planner never
recomputes it, it is saved instead.

``planner_rng::replay_dropout_mask(state, size, stride, dtype, device, p)`` sets the
generator to ``state``, runs ``native_dropout`` on an uninitialised tensor of the
given layout (the mask depends on the generator, the layout and ``p``, not on the
values; on CPU it draws the mask the way that kernel does, without its output),
restores the generator, and returns the mask: bit-for-bit the mask the
forward drew, as ``torch.utils.checkpoint`` does when it preserves RNG state.
"""

from __future__ import annotations

import torch

__all__ = ["rng_state", "replay_dropout_mask", "state_nbytes"]


def _get_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


_STATE_BYTES = {"cpu": None, "cuda": None}


def state_nbytes(device: torch.device) -> int:
    """Bytes of the RNG state of ``device``'s generator (what ``planner_rng::state`` returns)."""
    key = device.type
    if _STATE_BYTES.get(key) is None:
        _STATE_BYTES[key] = _get_state(device).numel()
    return _STATE_BYTES[key]


@torch.library.custom_op("planner_rng::state", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def rng_state(like: torch.Tensor) -> torch.Tensor:
    return _get_state(like.device).clone()


@rng_state.register_fake
def _(like):
    return torch.empty(state_nbytes(like.device if like.device.type != "meta" else torch.device("cpu")), dtype=torch.uint8, device="cpu")


@torch.library.custom_op("planner_rng::replay_dropout_mask", mutates_args=())
def replay_dropout_mask(
    state: torch.Tensor, size: list[int], stride: list[int], dtype: torch.dtype, device: torch.device, p: float
) -> torch.Tensor:
    saved = _get_state(device)
    try:
        _set_state(device, state)
        dummy = torch.empty_strided(size, stride, dtype=dtype, device=device)
        if device.type == "cpu":
            # native_dropout's CPU kernel draws ``empty_like(x).bernoulli_(1 - p)``;
            # drawing the same way skips its output (one x-sized temporary less).
            mask = dummy.bernoulli_(1 - p).bool()
        else:
            _, mask = torch.ops.aten.native_dropout(dummy, p, True)
        del dummy
    finally:
        _set_state(device, saved)
    return mask


@replay_dropout_mask.register_fake
def _(state, size, stride, dtype, device, p):
    return torch.empty_strided(size, stride, dtype=torch.bool, device=device)
