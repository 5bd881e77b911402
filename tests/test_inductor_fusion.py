"""The pieces of the simulation of a conv plan as Inductor runs it on the CPU, on small hand-made graphs.

``planner.inductor_fusion``: which values Inductor generates inside their one reader,
and which kernels write over a dying input; ``planner.layout_copies``: the
channels-last copies as they live. ``tests/test_inductor.py`` checks the whole
against measured peaks of compiled steps.
"""

from __future__ import annotations

from profiles.graph_profile import NodeInfo
from planner.inductor_fusion import fused_graph, is_pointwise, writes_over_input
from planner.layout_copies import LayoutCopies
from planner.schedule import GraphOrder


def _info(name: str, op: str, storages: tuple[int, ...], nbytes: int) -> NodeInfo:
    return NodeInfo(name=name, op=op, phase="forward", module="", bytes=nbytes, flops=0, time_s=0.0,
                    storages=storages)


def _graph():
    """x -> conv -> mul -> view -> add -> relu (returned); sub reads conv and is read by two kernels."""
    info = {
        "x": _info("x", "placeholder", (0,), 0),
        "conv": _info("conv", "aten.convolution.default", (1,), 64),
        "mul": _info("mul", "aten.mul.Tensor", (2,), 64),
        "view": _info("view", "aten.view.default", (2,), 0),
        "add": _info("add", "aten.add.Tensor", (3,), 64),
        "sub": _info("sub", "aten.sub.Tensor", (4,), 64),
        "sum": _info("sum", "aten.sum.dim_IntList", (5,), 4),
        "relu": _info("relu", "aten.relu.default", (6,), 64),
    }
    order = GraphOrder(nodes=(
        ("x", "placeholder", ()),
        ("conv", "call_function", ("x",)),
        ("mul", "call_function", ("conv",)),
        ("view", "call_function", ("mul",)),
        ("add", "call_function", ("view", "conv")),
        ("sub", "call_function", ("conv",)),
        ("sum", "call_function", ("sub",)),
        ("relu", "call_function", ("add", "sub", "sum")),
    ), outputs=("relu",))
    return info, order


def test_a_pointwise_value_read_by_one_kernel_is_inlined_with_its_views():
    info, order = _graph()
    fused = fused_graph(info, order)
    # mul (through its view) has one reader, add, and add one, relu: none of them is allocated
    assert fused.inlined == {"mul", "view", "add"}
    # relu's kernel reads what they read; sub (two readers), sum (a reduction), conv (a library
    # kernel) and relu (returned) are stored
    assert fused.inputs["add"] == ("conv",)
    assert fused.inputs["relu"] == ("conv", "sub", "sum")
    assert is_pointwise("aten.mul.Tensor") and not is_pointwise("aten.mul_.Tensor")
    assert not is_pointwise("aten.convolution.default") and not is_pointwise("aten.sum.dim_IntList")


def test_a_generated_kernel_writes_over_a_dying_input_of_its_size_only():
    info, _ = _graph()
    sizes = [0, 64, 64, 64, 64, 4, 64]
    # relu (generated) is the last reader of add, held once: it writes over it
    assert writes_over_input(info, "relu", (6,), [("sum", (5,)), ("add", (3,))], sizes, {3: 1, 5: 1}) == "add"
    # not over a buffer another value still refers to, nor one of another size
    assert writes_over_input(info, "relu", (6,), [("add", (3,))], sizes, {3: 2}) is None
    assert writes_over_input(info, "relu", (6,), [("sum", (5,))], sizes, {5: 1}) is None
    # a library kernel (the convolution) never does
    assert writes_over_input(info, "conv", (1,), [("x", (0,))], [64, 64], {0: 1}) is None


def test_layout_copies_live_from_the_start_of_forward_to_their_last_backward_reader():
    copies = LayoutCopies(freed={"conv_bwd_b": 10, "conv_bwd_a": 90}, forward_only=10, total=110)
    assert copies.held == 100
    # made by forward's first kernel, before anything else runs
    assert copies.along("forward", ["x", "conv_a", "relu", "conv_b"]) == [110, 110, 110, 110]
    # live while the last reader runs, freed after it
    assert copies.along("backward", ["g", "conv_bwd_b", "conv_bwd_a", "end"]) == [100, 100, 90, 0]
