"""What the command line reads: the model factory named by MODEL, the model it returns, and plan JSON files.

Anything wrong with them is a :class:`~runtime.tools.cli.checks.CliError` saying
what to give instead.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from planner import Plan

from .checks import CliError, describe, first_line

__all__ = ["load_factory", "load_model", "read_plan"]

_MODEL_FORM = "path/to/file.py:factory or package.module:factory"


def _import_file(where: str) -> ModuleType:
    """Import ``path/to/file.py`` as a module, with its folder importable while it runs."""
    path = Path(where)
    if not path.is_file():
        raise CliError(f"no such file: {where} (MODEL is path/to/file.py:factory)")
    folder = str(path.resolve().parent)
    spec = importlib.util.spec_from_file_location(f"_planner_factory_{abs(hash(str(path.resolve())))}", path)
    module = importlib.util.module_from_spec(spec)
    # registered, as an import does: torch.compile looks functions' modules up by name
    # (a loss_fn the factory defines is traced when the loss is planned)
    sys.modules[spec.name] = module
    sys.path.insert(0, folder)  # let the file import its neighbours
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's code: whatever it raises is bad input, named in one line
        sys.modules.pop(spec.name, None)
        raise CliError(f"importing {where} failed: {type(e).__name__}: {first_line(e)}") from e
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)
    return module


def _import_module(where: str) -> ModuleType:
    """Import ``package.module`` from the current directory, as ``python -m`` would."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as e:
        raise CliError(f"no module named {e.name!r} (importing {where}): install it, run from the directory that holds it, "
                       "or give path/to/file.py:factory") from e
    except Exception as e:  # the user's code: whatever it raises is bad input, named in one line
        raise CliError(f"importing {where} failed: {type(e).__name__}: {first_line(e)}") from e


def load_factory(spec: str) -> Callable[[], Any]:
    """``path/to/file.py:factory`` or ``package.module:factory`` -> the factory."""
    if ":" not in spec:
        raise CliError(f"MODEL must be {_MODEL_FORM}, not {spec!r}")
    where, name = spec.rsplit(":", 1)
    if not where or not name.isidentifier():
        raise CliError(f"MODEL must be {_MODEL_FORM}, not {spec!r}")
    is_file = where.endswith(".py") or os.sep in where or "/" in where
    module = _import_file(where) if is_file else _import_module(where)
    factory = getattr(module, name, None)
    if factory is None:
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise CliError(f"{where} has no {name!r}" + (f"; it defines {', '.join(found)}" if found else ""))
    if not callable(factory):
        raise CliError(f"{where}:{name} is a {type(factory).__name__}, not a function returning (model, example_inputs)")
    return factory


def load_model(spec: str):
    """Call the factory named by ``spec``; check it returned ``(model, example_inputs)``
    or ``(model, example_inputs, loss_fn)``; returns the three (``loss_fn`` None when
    not given: the model returns its loss, or only its outputs' gradients are counted)."""
    factory = load_factory(spec)
    try:
        result = factory()
    except Exception as e:  # the user's code: whatever it raises is bad input, named in one line
        raise CliError(f"{spec}() raised {type(e).__name__}: {first_line(e)}") from e
    want = ("(model, example_inputs) or (model, example_inputs, loss_fn): an nn.Module, a tuple, dict or tensor "
            "of inputs, and the loss as the training loop computes it from the outputs")
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        raise CliError(f"{spec}() must return {want}; it returned {describe(result)}")
    model, inputs, loss_fn = (*result, None) if len(result) == 2 else result
    if not isinstance(model, torch.nn.Module):
        raise CliError(f"{spec}() must return {want}; its first item is {describe(model)}")
    if not (inputs is None or isinstance(inputs, (tuple, list, dict, torch.Tensor))):
        raise CliError(f"{spec}() must return {want}; its second item is {describe(inputs)}")
    if loss_fn is not None and not callable(loss_fn):
        raise CliError(f"{spec}() must return {want}; its third item is {describe(loss_fn)}, not a function")
    return model, (tuple(inputs) if isinstance(inputs, list) else inputs), loss_fn


def _read_text(path: str) -> str:
    """The file's text; a CliError for a missing, unreadable, binary or empty file."""
    p = Path(path)
    if not p.is_file():
        raise CliError(f"no plan file at {path} (write one with 'planner plan MODEL --budget-gb X -o {path}')")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CliError(f"{path} is a binary file, not a plan JSON (written by 'planner plan ... -o plan.json')") from e
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror or e}") from e
    if not text.strip():
        raise CliError(f"{path} is empty, not a plan: write one with 'planner plan MODEL --budget-gb X -o {path}'")
    return text


def read_plan(path: str) -> Plan:
    """Read and check a plan JSON file; any problem is a :class:`CliError`."""
    text = _read_text(path)
    if not text.lstrip().startswith(("{", "[")):
        raise CliError(f"{path} is not JSON, so not a plan; plans are written by 'planner plan MODEL --budget-gb X -o plan.json'")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CliError(f"{path} is truncated or invalid JSON ({e}); write it again with 'planner plan ... -o {path}'") from e
    if not isinstance(data, dict) or "schema_version" not in data or "nodes" not in data:
        raise CliError(f"{path} is JSON but not a plan (no 'schema_version' and 'nodes'); plans are written by 'planner plan'")
    try:
        return Plan.from_dict(data)
    except ValueError as e:
        raise CliError(f"{path}: {e}") from e
