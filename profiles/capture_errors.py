"""Turn a failed capture into an error that says what went wrong and what to change.

Two causes get their own type: a graph break (the model cannot be traced as one
graph; the error names the file and line) and inputs the model itself rejects (the
model's own error, from an eager call, wrapped with the inputs that were tried).
"""

from __future__ import annotations

import torch

from ._torch_private import backend_error_cause, graph_break_info, tree_leaves
from .joint import CaptureError
from .signature import describe_inputs

__all__ = ["GraphBreak", "InputsRejected", "DataDependentShape", "check_static_shapes", "trace_frames", "explain_capture_failure"]


class GraphBreak(CaptureError):
    """torch.compile cannot trace the model's forward as one graph.

    ``file``, ``line`` and ``reason`` say where and why."""

    def __init__(self, message: str, *, file: str | None, line: int | None, reason: str):
        super().__init__(message)
        self.file = file
        self.line = line
        self.reason = reason


class InputsRejected(CaptureError, ValueError):
    """The model raised an error on the example inputs when called eagerly; that
    error is ``__cause__`` (and ``.error``), ``inputs`` is what was tried."""

    def __init__(self, message: str, *, error: BaseException, inputs: list):
        super().__init__(message)
        self.error = error
        self.inputs = inputs


class DataDependentShape(CaptureError):
    """A tensor's size depends on the values of the data (boolean-mask indexing,
    ``nonzero``, ``unique``): the planner counts bytes of known sizes.

    ``file``, ``line`` and ``code`` say where (``None`` and "" when unknown)."""

    def __init__(self, message: str, *, file: str | None, line: int | None, code: str):
        super().__init__(message)
        self.file = file
        self.line = line
        self.code = code


def trace_frames(trace: str) -> list[tuple[str, int, str]]:
    """``(file, line, code)`` of each frame of an fx node's ``stack_trace``, outermost first."""
    lines = trace.splitlines()
    frames = []
    for i, raw in enumerate(lines):
        text = raw.strip()
        if text.startswith("File "):
            file, _, rest = text[len("File "):].partition(", line ")
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            frames.append((file.strip('"'), int(rest.split(",")[0]), code))
    return frames


def check_static_shapes(gm, model_name: str) -> None:
    """:class:`DataDependentShape` naming the first node of dynamo's graph ``gm``
    whose size depends on the data (a symbolic size: the capture runs with
    ``dynamic=False``, so any is data-dependent)."""
    for node in gm.graph.nodes:
        for t in tree_leaves(node.meta.get("example_value")):
            if isinstance(t, torch.Tensor) and not all(isinstance(s, int) for s in t.shape):
                file, line, code = (trace_frames(node.meta.get("stack_trace") or "") or [(None, None, "")])[-1]
                where = f"{file}:{line} (`{code}`)" if file else f"node {node.name!r}"
                raise DataDependentShape(
                    f"cannot plan {model_name}: at {where} a tensor's size depends on the values of the data "
                    f"(shape {tuple(t.shape)}; boolean-mask indexing, nonzero or unique), and the planner counts the "
                    "bytes of tensors of known size. Keep the size fixed: multiply by the mask or use torch.where "
                    "instead of indexing with it, or move that code out of forward",
                    file=file, line=line, code=code,
                )


_ADVICE = {
    "Data-dependent branching": "make it branchless (torch.where, torch.clamp) or use torch.cond, "
    "or decide the branch outside forward",
    "Failed to trace builtin operator": "remove the call or move it out of forward",
}


def _describe(inputs: list) -> str:
    parts = []
    for name, shape, dtype in inputs:
        label = f"#{name}" if name.isdigit() else repr(name)
        parts.append(f"{label}: {'x'.join(map(str, shape)) or 'scalar'} {dtype}" if shape is not None else f"{label}: {dtype}")
    return "(" + ", ".join(parts) + ")"


def explain_capture_failure(model: torch.nn.Module, args: tuple, kwargs: dict, exc: BaseException) -> Exception:
    """The error to raise for ``exc``, raised by ``torch.compile`` while capturing
    ``model(*args, **kwargs)``. Calls the model eagerly (without gradients) when
    that is needed to tell bad inputs from an untraceable model."""
    name = type(model).__name__
    brk = graph_break_info(exc)
    if brk is not None:
        where = f"{brk['file']}:{brk['line']}" if brk["file"] else "an unknown line"
        code = f" (`{brk['code']}`)" if brk["code"] else ""
        fn = f" in {brk['function']}" if brk["function"] else ""
        advice = _ADVICE.get(brk["reason"]) or ("; ".join(brk["hints"][:2]) or "rewrite it so torch.compile(model, fullgraph=True) accepts it")
        detail = f": {brk['explanation']}" if brk["explanation"] else ""
        return GraphBreak(
            f"cannot capture {name} as one graph: torch.compile breaks the graph at {where}{fn}{code} "
            f"({brk['reason']}{detail}). The planner needs the whole training step as one graph here (it plans "
            f"a model that breaks the graph as regions only when planned and run op by op, executor='eager', "
            f"at the shapes planned); to plan this model, change that line: {advice}.",
            file=brk["file"],
            line=brk["line"],
            reason=brk["reason"],
        )
    inner = backend_error_cause(exc)
    if inner is None:
        try:
            with torch.no_grad():
                model(*args, **kwargs)
        except Exception as own:  # the model's own error on these inputs: that is the answer
            tried = describe_inputs(args, kwargs)
            return InputsRejected(
                f"{name} rejected the example inputs {_describe(tried)}: {type(own).__name__}: {own}. "
                "Pass inputs the model accepts when called as model(*args) or model(**kwargs).",
                error=own,
                inputs=tried,
            )
    cause = inner or exc
    first = str(cause).splitlines()[0] if str(cause) else ""
    return CaptureError(
        f"could not capture {name} as one forward+backward graph: {type(cause).__name__}: {first}. "
        "Check that the model runs eagerly on these inputs and that torch.compile("
        "model, fullgraph=True) accepts it (no graph breaks)."
    )
