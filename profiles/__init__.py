"""Capture a model's training step as a joint fx graph and measure each node.

Also holds device profiles (``profiles/devices/*.json``) for estimating times on
a device you don't have, and :func:`measure_peak` for measuring real peaks.
"""

from .capture import capture, normalize_inputs
from .capture_errors import DataDependentShape, GraphBreak, InputsRejected
from .device import DeviceProfile, available_targets, load_device_profile
from .graph_profile import FlopCountWarning, GraphProfile, NodeInfo, profile_graph
from .joint import CaptureError, JointGraph
from .memory import measure_peak, storage_bytes
from .signature import graph_fingerprint

__all__ = [
    "capture",
    "CaptureError",
    "GraphBreak",
    "DataDependentShape",
    "InputsRejected",
    "JointGraph",
    "graph_fingerprint",
    "normalize_inputs",
    "profile_graph",
    "GraphProfile",
    "NodeInfo",
    "FlopCountWarning",
    "DeviceProfile",
    "load_device_profile",
    "available_targets",
    "measure_peak",
    "storage_bytes",
]
