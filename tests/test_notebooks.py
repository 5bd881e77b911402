"""Every example keeps working: each notebook in examples/ runs headless (nbclient),
and each script in examples/ runs standalone through its ``main()``."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
SCRIPTS = sorted(EXAMPLES.glob("*.py"))


def test_there_are_examples():
    assert NOTEBOOKS and SCRIPTS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_headless(path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    pytest.importorskip("transformers")
    nb = nbformat.read(path, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path.name}: commit it without outputs"
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    html = [o for o in outputs if "text/html" in o.get("data", {})]
    assert images and html, "the notebook should draw plots and render a Plan as HTML"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_has_main(path):
    tree = ast.parse(path.read_text())
    assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), f"{path.name} has no main()"
    guard = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    assert guard and "main(" in ast.unparse(guard[0]), f"{path.name} does not call main() under __main__"
    assert ast.get_docstring(tree), f"{path.name} has no docstring saying what it shows"


def test_tiny_models_runs_standalone():
    pytest.importorskip("transformers")
    env = {**os.environ, "PYTHONPATH": str(EXAMPLES.parent)}
    r = subprocess.run([sys.executable, str(EXAMPLES / "tiny_models.py"), "residual_mlp"], capture_output=True, text=True,
                       timeout=300, env=env, cwd=EXAMPLES)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "== residual_mlp: planned at 60%" in r.stdout and "recomputed" in r.stdout
