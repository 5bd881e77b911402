"""Device profiles: what a device can do, as data, for estimating node times.

A profile is a JSON file in ``profiles/devices/``: memory capacity, peak dense
FLOP/s per dtype, memory bandwidth, a per-op launch overhead, and where each
number came from (``planner calibrate`` measures one on the device at hand, see
:mod:`profiles.calibrate`). Times are estimated with a roofline:
``max(flops / peak_flops[dtype], bytes_moved / bandwidth) + overhead``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

__all__ = ["DeviceProfile", "load_device_profile", "available_targets", "default_target_for", "target_device_type"]

_DIR = Path(__file__).parent / "devices"


@dataclass(frozen=True, kw_only=True)
class DeviceProfile:
    """One device's capabilities."""

    #: Short name used as ``target=`` (``"h100"``, ``"cpu"``).
    name: str
    #: Human-readable description.
    description: str = ""
    #: torch device type the profile describes (``"cuda"`` or ``"cpu"``): a model built
    #: on the meta device is planned with this device's allocator rounding and margin.
    device_type: str = "cuda"
    #: Device memory in bytes (0 when not meaningful).
    memory_bytes: int = 0
    #: Peak dense FLOP/s by dtype name (``"float32"``, ``"bfloat16"``, ...).
    peak_flops: dict[str, float] = field(default_factory=dict)
    #: Memory bandwidth in bytes/s.
    bandwidth_bytes_per_s: float = 1e11
    #: Fixed cost per op (kernel launch or dispatch), in seconds.
    overhead_s: float = 5e-6
    #: Where each number came from, keyed by field: ``"memory_bytes"``,
    #: ``"peak_flops.<dtype>"``, ``"bandwidth_bytes_per_s"``, ``"overhead_s"``.
    sources: dict[str, str] = field(default_factory=dict)

    def unsourced(self) -> list[str]:
        """Keys of the numbers that have no entry in ``sources``."""
        keys = ["memory_bytes", "bandwidth_bytes_per_s", "overhead_s"] + [f"peak_flops.{k}" for k in self.peak_flops]
        return [k for k in keys if not self.sources.get(k)]

    def flops_per_s(self, dtype: torch.dtype | str) -> float:
        key = str(dtype).replace("torch.", "")
        if key in self.peak_flops:
            return self.peak_flops[key]
        return self.peak_flops.get("float32", 1e12)

    def estimate_time(self, flops: float, bytes_moved: float, dtype: torch.dtype | str) -> float:
        """Roofline time of one op, in seconds."""
        return max(flops / self.flops_per_s(dtype), bytes_moved / self.bandwidth_bytes_per_s) + self.overhead_s

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "device_type": self.device_type,
            "memory_bytes": self.memory_bytes,
            "peak_flops": dict(self.peak_flops),
            "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
            "overhead_s": self.overhead_s,
            "sources": dict(self.sources),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "DeviceProfile":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"device profile {d.get('name', '?')!r} has unknown fields {unknown}; expected {sorted(known)}")
        return cls(**d)


def available_targets() -> list[str]:
    """Names of the device profiles shipped in ``profiles/devices``."""
    return sorted(p.stem for p in _DIR.glob("*.json"))


def load_device_profile(name: str | DeviceProfile) -> DeviceProfile:
    """Load a shipped profile by name (case-insensitive), or a JSON file by path."""
    if isinstance(name, DeviceProfile):
        return name
    if not isinstance(name, str) or not name:
        raise TypeError(f"target must be a device profile name such as 'cpu' or 'h100', not {name!r}")
    path = Path(name)
    if not (path.suffix == ".json" and path.exists()):
        path = _DIR / f"{name.lower()}.json"
    if not path.exists():
        raise ValueError(
            f"unknown target {name!r}: choose one of {', '.join(available_targets())} "
            "or give the path of a device profile JSON file"
        )
    return DeviceProfile.from_dict(json.loads(path.read_text()))


def default_target_for(device: torch.device) -> str:
    """The shipped profile that best matches a torch device."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key in ("h200", "h100", "a100", "l4", "4090"):
            if key in name:
                return {"4090": "rtx4090"}.get(key, key)
        return "h100"
    return "cpu"


def target_device_type(target: str) -> str:
    """``"cpu"`` or ``"cuda"``: the device type of a device profile named ``target``
    (its ``device_type``; for a name that is not a shipped profile, "cpu*" means CPU)."""
    if target.lower() in available_targets():
        return load_device_profile(target).device_type
    return "cpu" if target.lower().startswith("cpu") else "cuda"
