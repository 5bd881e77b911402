"""Measure a device profile on the device at hand (``planner calibrate``).

Microbenchmarks, each the median of ``repeats`` timed runs after one warm-up:

- peak FLOP/s per dtype: an ``n x n`` by ``n x n`` matmul (``2 n^3`` FLOPs);
- bandwidth: ``dst.copy_(src)`` of a large buffer (its bytes read plus written);
- per-op overhead: an add of two one-element tensors.

Memory capacity is the device's total memory (``torch.cuda`` properties, or the
machine's RAM for the CPU). The result is a :class:`~profiles.device.DeviceProfile`
with a source for every number, written as the same JSON as ``profiles/devices/``,
so ``plan(..., target="my.json")`` and ``--target my.json`` accept it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from .device import DeviceProfile

__all__ = ["calibrate", "write_profile", "DEFAULT_DTYPES"]

DEFAULT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _timer(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    """``time(fn, repeats)``: median seconds of ``fn()`` after one warm-up run."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def time_it(fn: Callable[[], object], repeats: int) -> float:
        fn()
        sync()
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)

    return time_it


def _copy_seconds(time_it, elems: int, device: torch.device, repeats: int) -> float:
    """Median seconds of copying ``elems`` float32 values (buffers freed on return)."""
    src = torch.ones(elems, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return time_it(lambda: dst.copy_(src), repeats)


def _memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch threads"


def _matmul_peaks(time_it, device: torch.device, n: int, dtypes: Sequence[str], repeats: int, where: str, say) -> tuple[dict[str, float], dict[str, str]]:
    """``(peak FLOP/s, sources)`` by dtype name, from an ``n x n`` matmul per dtype;
    a dtype the device cannot multiply is left out."""
    sources: dict[str, str] = {}
    peak: dict[str, float] = {}
    for dt_name in dtypes:
        dtype = getattr(torch, dt_name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {dt_name!r}: give torch dtype names such as float32, bfloat16")
        try:
            a = torch.ones(n, n, dtype=dtype, device=device)
            b = torch.ones(n, n, dtype=dtype, device=device)
            out = torch.empty(n, n, dtype=dtype, device=device)
            secs = time_it(lambda: torch.mm(a, b, out=out), repeats)
        except RuntimeError as e:  # the device has no matmul kernel for this dtype
            say(f"{dt_name}: no matmul on {device} ({str(e).splitlines()[0]}); left out")
            continue
        finally:
            a = b = out = None
        peak[dt_name] = 2.0 * n**3 / secs
        sources[f"peak_flops.{dt_name}"] = f"{where}: {n}x{n} matmul, median of {repeats}"
        say(f"{dt_name} matmul {n}x{n}: {peak[dt_name] / 1e12:.3f} TFLOP/s")
    return peak, sources


def calibrate(
    *,
    device: str | torch.device | None = None,
    name: str | None = None,
    matmul_size: int | None = None,
    copy_bytes: int | None = None,
    dtypes: Sequence[str] = DEFAULT_DTYPES,
    repeats: int = 5,
    log: Callable[[str], None] | None = None,
) -> DeviceProfile:
    """Measure a device profile.

    ``device``: ``"cuda"``, ``"cuda:1"`` or ``"cpu"`` (default: the current CUDA device
    if there is one, else the CPU). ``name``: the profile's name (default
    ``"calibrated-<device type>"``). ``matmul_size``: ``n`` of the matmul (default
    8192 on a GPU, 1024 on the CPU). ``copy_bytes``: size of the copied buffer
    (default 1 GiB on a GPU, 256 MiB on the CPU). ``dtypes``: dtypes to measure
    matmul throughput for; one the device cannot multiply is left out, and
    the profile then falls back to its float32 figure for it.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"calibrate measures a 'cpu' or 'cuda' device, not {str(device)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("calibrate: no CUDA device is available here; use device='cpu' or run it on the GPU machine")
    gpu = device.type == "cuda"
    n = int(matmul_size or (8192 if gpu else 1024))
    nbytes = int(copy_bytes or (2**30 if gpu else 2**28))
    if n < 1 or nbytes < 1 or repeats < 1:
        raise ValueError(f"matmul_size, copy_bytes and repeats must be positive, not {n}, {nbytes}, {repeats}")
    say = log or (lambda msg: None)
    time_it = _timer(device)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    where = f"measured by planner calibrate on {_describe(device)} at {when}, torch {torch.__version__}"
    peak, sources = _matmul_peaks(time_it, device, n, dtypes, repeats, where, say)
    if not peak:
        raise ValueError(f"calibrate: none of the dtypes {list(dtypes)} could be multiplied on {device}")
    elems = max(1, nbytes // 4)
    secs = _copy_seconds(time_it, elems, device, repeats)
    bandwidth = 2.0 * elems * 4 / secs
    say(f"copy {elems * 4 / 2**20:.0f} MiB: {bandwidth / 1e9:.1f} GB/s")
    x = torch.ones(1, device=device)
    y = torch.ones(1, device=device)
    overhead = time_it(lambda: torch.add(x, y), max(repeats, 50))
    say(f"one-element add: {overhead * 1e6:.1f} us")
    memory = _memory_bytes(device)
    return DeviceProfile(
        name=name or f"calibrated-{device.type}",
        description=f"{_describe(device)} (calibrated)",
        device_type=device.type,
        memory_bytes=memory,
        peak_flops=peak,
        bandwidth_bytes_per_s=bandwidth,
        overhead_s=overhead,
        sources={
            "memory_bytes": ("torch.cuda.get_device_properties().total_memory" if gpu else "physical RAM (sysconf)")
            + f" on {_describe(device)}",
            **sources,
            "bandwidth_bytes_per_s": f"{where}: copy of {elems * 4} bytes (read + written), median of {repeats}",
            "overhead_s": f"{where}: one-element add, median of {max(repeats, 50)}",
        },
    )


def write_profile(profile: DeviceProfile, path: str | Path) -> Path:
    """Write ``profile`` as device-profile JSON (the format of ``profiles/devices``)."""
    path = Path(path)
    path.write_text(json.dumps(profile.to_dict(), indent=1) + "\n")
    return path
