"""The ``planner`` CLI and the plan JSON it writes: schema, round trip, determinism,
one-line errors with exit status 2, progress only on a terminal, show/sweep/verify.

Most cases call ``runtime.tools.cli.main([...])`` in-process; a few run ``python -m
planner`` and the ``planner`` console script to check what a user sees (pure JSON on
stdout, progress on a terminal).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pty
import re
import select
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import planner
from runtime.tools.cli import main
from runtime.tools.cli.autocast import recorded_autocast

ROOT = Path(__file__).resolve().parents[1]
FACTORY = f"{ROOT / 'examples' / 'tiny_models.py'}:residual_mlp"
BUDGET = "0.005"  # GiB: between residual_mlp's minimum (~3.6 MiB) and no-checkpoint peak (~7.4 MiB)
SCHEMA = json.loads((ROOT / "docs" / "plan.schema.json").read_text())


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _strip_seconds(d: dict) -> dict:
    d = json.loads(json.dumps(d))
    d["solver"].pop("seconds")
    return d


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    assert main(["plan", FACTORY, "--budget-gb", BUDGET, "-o", str(path), "--quiet"]) == 0
    return path


# -- plan and the JSON ----------------------------------------------------------------
def test_plan_writes_json_and_a_summary(capsys, tmp_path):
    out_path = tmp_path / "p.json"
    rc, out, err = _run(capsys, "plan", FACTORY, "--budget-gb", BUDGET, "-o", out_path)
    assert rc == 0 and out == ""
    p = planner.Plan.from_json(out_path)
    assert err == f"{p.summary()}\nwrote {out_path}\n"  # no progress when stderr is not a terminal
    for words in ("budget:                5.12 MiB", "predicted peak:", "no-checkpoint peak:", "recompute:",
                  "solver:                ilp: Optimal"):
        assert words in err, (words, err)
    assert p.predicted_peak_bytes <= p.budget_bytes < p.baseline_peak_bytes
    assert p.recomputed and p.model.class_name == "ResidualMLP"


def test_plan_json_matches_the_schema_and_round_trips(plan_file):
    jsonschema = pytest.importorskip("jsonschema")
    text = plan_file.read_text()
    data = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.validate(data, SCHEMA, cls=jsonschema.Draft202012Validator)
    for key in ("schema_version", "model", "target", "budget_bytes", "predicted_peak_bytes", "baseline_peak_bytes",
                "recompute_flops", "total_flops", "solver", "nodes"):
        assert key in data
    assert {n["decision"] for n in data["nodes"]} == {"save", "recompute"}
    p = planner.Plan.from_json(plan_file)
    assert p.to_json() + "\n" == text  # exact round trip
    assert planner.Plan.from_json(p.to_json()) == p
    bad = json.loads(text)
    bad["nodes"][0]["decision"] = "maybe"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMA, cls=jsonschema.Draft202012Validator)


def test_every_plan_field_is_documented():
    """docs/plan.schema.json and docs/plan-schema.md describe every field the Plan writes."""
    md = (ROOT / "docs" / "plan-schema.md").read_text()
    assert SCHEMA["properties"]["schema_version"]["const"] == planner.SCHEMA_VERSION
    for cls, props in (
        (planner.Plan, SCHEMA["properties"]),
        (planner.NodeDecision, SCHEMA["properties"]["nodes"]["items"]["properties"]),
        (planner.SolverInfo, SCHEMA["properties"]["solver"]["properties"]),
        (planner.ModelInfo, SCHEMA["properties"]["model"]["properties"]),
        (planner.DistributedInfo, SCHEMA["properties"]["distributed"]["properties"]),
    ):
        for f in dataclasses.fields(cls):
            key = "class" if (cls, f.name) == (planner.ModelInfo, "class_name") else f.name  # its JSON key
            assert key in props, f"{cls.__name__}.{f.name} is missing from docs/plan.schema.json"
            assert f"| `{key}` |" in md, f"{cls.__name__}.{f.name} is missing from docs/plan-schema.md"
    for key in SCHEMA["required"]:
        assert key in {f.name for f in dataclasses.fields(planner.Plan)}


def test_same_options_give_the_same_json(capsys, plan_file):
    rc, out, _ = _run(capsys, "plan", FACTORY, "--budget-gb", BUDGET)
    assert rc == 0
    assert _strip_seconds(json.loads(out)) == _strip_seconds(json.loads(plan_file.read_text()))


def test_module_entry_point_prints_pure_json_and_progress_on_a_terminal(plan_file, tmp_path):
    """`python -m planner plan` with stderr on a terminal: stdout is only the JSON
    (no solver banner), stderr shows progress and the summary, and no profiler noise."""
    main_fd, term_fd = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "planner", "plan", FACTORY, "--budget-gb", BUDGET],
        stdout=subprocess.PIPE, stderr=term_fd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    os.close(term_fd)
    err = b""
    while True:
        ready, _, _ = select.select([main_fd], [], [], 300)
        if not ready:
            break
        try:
            chunk = os.read(main_fd, 4096)
        except OSError:  # the terminal closed
            break
        if not chunk:
            break
        err += chunk
    out, _ = proc.communicate(timeout=300)
    os.close(main_fd)
    err_text = err.decode(errors="replace")
    assert proc.returncode == 0, err_text
    assert _strip_seconds(json.loads(out)) == _strip_seconds(json.loads(plan_file.read_text()))
    assert "[planner] capturing ResidualMLP" in err_text and "solving" in err_text
    assert "predicted peak" in err_text
    assert "USDT" not in err_text and "HiGHS" not in err_text


def test_console_script_quiet_when_not_a_terminal(plan_file):
    exe = Path(sys.executable).with_name("planner")  # the console script installed next to this interpreter
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "planner"]
    r = subprocess.run([*cmd, "show", str(plan_file), "--depth", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == ""
    assert "per module (depth 1)" in r.stdout


def test_tool_package_runs_as_a_module(capsys, plan_file):
    """`python -m runtime.tools.cli` is the same command as `planner` and `python -m planner`."""
    r = subprocess.run([sys.executable, "-m", "runtime.tools.cli", "show", str(plan_file), "--depth", "1"], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    rc, out, err = _run(capsys, "show", plan_file, "--depth", "1")
    assert r.returncode == rc == 0 and r.stderr == err == ""
    assert r.stdout == out and "per module (depth 1)" in out


def test_progress_shows_on_a_terminal_and_quiet_silences_everything(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    rc, out, err = _run(capsys, "plan", FACTORY, "--budget-gb", "1")
    assert rc == 0 and "[planner] capturing" in err and "budget fits without recomputation" in err
    rc, out, err = _run(capsys, "plan", FACTORY, "--budget-gb", "1", "--quiet")
    assert rc == 0 and err == "" and json.loads(out)["solver"]["name"] == "none"


# -- bad input: one line, exit status 2 -------------------------------------------------------
def _factory_file(tmp_path, body: str) -> str:
    path = tmp_path / "factories.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


BAD_FACTORIES = """
    import torch
    def returns_one():
        return torch.nn.Linear(2, 2)
    def returns_strings():
        return "model", "inputs"
    def bad_inputs():
        return torch.nn.Linear(2, 2), 3
    def raises():
        raise RuntimeError("weights not found")
    def no_grad_model():
        m = torch.nn.Linear(2, 2).requires_grad_(False)
        return m, (torch.randn(3, 2),)
    not_callable = 3
"""


@pytest.mark.parametrize(
    "argv, words",
    [
        (["plan", FACTORY, "--budget-gb", "-1"], "above 0"),
        (["plan", FACTORY, "--budget-gb", "0"], "above 0"),
        (["plan", FACTORY, "--budget-gb", "nan"], "above 0"),
        (["plan", FACTORY, "--budget-gb", "inf"], "above 0"),
        (["plan", FACTORY, "--budget-gb", "1e12"], "over a PiB"),
        (["plan", FACTORY, "--budget-gb", "1e-12"], "less than one byte"),
        (["plan", FACTORY, "--budget-gb", "lots"], "number of GiB"),
        (["plan", FACTORY, "--budget-gb", "200", "--target", "h100"], "80 GiB of memory"),
        (["plan", FACTORY, "--budget-gb", "1", "--solver", "magic"], "invalid choice: 'magic'"),
        (["plan", FACTORY, "--budget-gb", "1", "--target", "tpu9"], "unknown target 'tpu9': choose one of"),
        (["plan", FACTORY], "required: --budget-gb"),
        (["plan", "missing.py:f", "--budget-gb", "1"], "no such file: missing.py"),
        (["plan", "examples/tiny_models.py", "--budget-gb", "1"], "path/to/file.py:factory"),
        (["plan", f"{FACTORY}x", "--budget-gb", "1"], "has no 'residual_mlpx'; it defines"),
        (["plan", "no_such_module_xyz:f", "--budget-gb", "1"], "no module named 'no_such_module_xyz'"),
        (["plan", "{F}:returns_one", "--budget-gb", "1"], "must return (model, example_inputs)"),
        (["plan", "{F}:returns_strings", "--budget-gb", "1"], "its first item is a str"),
        (["plan", "{F}:bad_inputs", "--budget-gb", "1"], "its second item is an int"),
        (["plan", "{F}:raises", "--budget-gb", "1"], "raised RuntimeError: weights not found"),
        (["plan", "{F}:not_callable", "--budget-gb", "1"], "not a function"),
        (["plan", "{F}:no_grad_model", "--budget-gb", "1"], "no output requires grad"),
        (["plan", FACTORY, "--budget-gb", "1", "-o", "/no/such/dir/p.json"], "does not exist"),
        (["plan", FACTORY, "--budget-gb", "1", "--time-limit", "0"], "--time-limit must be a positive number"),
        (["sweep", FACTORY, "--time-limit", "nan"], "--time-limit must be a positive number"),
        (["sweep", FACTORY, "--points", "1"], "--points must be 2 or more"),
        (["sweep", FACTORY, "--budgets", "0.1,,-3"], "--budgets must be a finite number"),
        (["sweep", FACTORY, "--budgets", "0.1", "--points", "3"], "not allowed with argument"),
        (["show", "missing.json"], "no plan file at missing.json"),
        (["show", "{J}:truncated"], "truncated or invalid JSON"),
        (["show", "{J}:foreign"], "JSON but not a plan"),
        (["show", "{J}:a_list"], "JSON but not a plan"),
        (["show", "{J}:empty"], "is empty"),
        (["show", "{J}:binary"], "binary file"),
        (["show", "{J}:text"], "is not JSON"),
        (["show", "{J}:future"], "schema version 99 is not supported"),
        (["show", "{J}:bad_decision"], "expected 'save' or 'recompute'"),
        (["show", "{J}:plan", "--depth", "0"], "--depth must be 1 or more"),
        (["show", "{J}:plan", "--plot", "{tmp}/out.txt"], ".png"),
        (["verify", FACTORY, "missing.json"], "no plan file"),
        ([], "give a command"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, plan_file, argv, words):
    factories = _factory_file(tmp_path, BAD_FACTORIES)
    text = plan_file.read_text()
    files = {
        "truncated": text[: len(text) // 2],
        "foreign": json.dumps({"name": "not a plan", "version": 3}),
        "a_list": "[1, 2, 3]",
        "empty": "",
        "text": "hello, world\n",
        "future": text.replace(f'"schema_version": {planner.SCHEMA_VERSION}', '"schema_version": 99', 1),
        "bad_decision": text.replace('"decision": "save"', '"decision": "maybe"', 1),
        "plan": text,
    }
    for name, content in files.items():
        (tmp_path / f"{name}.json").write_text(content)
    (tmp_path / "binary.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")

    def fill(a: str) -> str:
        a = a.replace("{F}", factories).replace("{tmp}", str(tmp_path))
        return re.sub(r"\{J\}:(\w+)", lambda m: str(tmp_path / f"{m.group(1)}.json"), a)

    rc, out, err = _run(capsys, *[fill(a) for a in argv])
    assert rc == 2, (rc, err)
    assert out == ""
    assert err.startswith("planner: error: ") and err.count("\n") == 1, err
    assert words in err, err
    assert "Traceback" not in err


def test_budget_below_the_minimum_names_it(capsys, tmp_path):
    rc, out, err = _run(capsys, "plan", FACTORY, "--budget-gb", "0.001")
    assert rc == 2 and out == "" and err.count("\n") == 1
    m = re.search(r"minimum of ([0-9.]+) GiB .*--budget-gb ([0-9.]+) works", err)
    assert m, err
    assert float(m.group(2)) >= float(m.group(1))
    rc, out, err = _run(capsys, "plan", FACTORY, "--budget-gb", m.group(2), "-q")
    assert rc == 0 and json.loads(out)["predicted_peak_bytes"] <= float(m.group(2)) * 2**30


# -- show, sweep, verify, targets -----------------------------------------------------------
def test_show_prints_a_table_and_plots(capsys, plan_file, tmp_path):
    png = tmp_path / "timeline.png"
    rc, out, err = _run(capsys, "show", plan_file, "--depth", "1", "--top", "3", "--plot", png)
    assert rc == 0, err
    p = planner.Plan.from_json(plan_file)
    assert "per module (depth 1)" in out and "blocks" in out and "total" in out
    assert "largest recomputed values (top 3 of" in out
    assert "recompute:" in out and "solver:" in out and "no-checkpoint peak:" in out
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert f"{len(p.saved):>4}" in total and f"{len(p.recomputed):>4}" in total
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_table_and_plot(capsys, tmp_path):
    png = tmp_path / "tradeoff.png"
    rc, out, err = _run(capsys, "sweep", FACTORY, "--budgets", "0.002,0.005,0.01", "--plot", png)
    assert rc == 0, err
    lines = out.splitlines()
    assert "no-checkpoint peak" in lines[0] and "minimum budget" in lines[0]
    assert "below the minimum budget" in lines[2]
    assert "ilp: Optimal" in lines[3]
    assert "budget fits without recomputation" in lines[4]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verify_passes_and_fails_on_a_broken_budget(capsys, plan_file, tmp_path):
    rc, out, err = _run(capsys, "verify", FACTORY, plan_file)
    assert rc == 0, out + err
    assert "within budget" in out and "gradients: equal to eager's" in out and "verdict:   OK" in out
    assert "measured" in out and "predicted" in out and "FLOPs:" in out
    tight = json.loads(plan_file.read_text())
    tight["budget_bytes"] = tight["static_bytes"] + 1  # a budget no step can keep
    (tmp_path / "tight.json").write_text(json.dumps(tight))
    rc, out, err = _run(capsys, "verify", FACTORY, tmp_path / "tight.json")
    assert rc == 1 and "OVER budget" in out and "verdict:   FAILED" in out


def test_verify_refuses_a_plan_for_another_model(capsys, plan_file, tmp_path):
    other = _factory_file(tmp_path, """
        import sys
        sys.path.insert(0, %r)
        from tiny_models import ResidualMLP
        import torch
        def wider():
            torch.manual_seed(0)
            return ResidualMLP(blocks=3), {"x": torch.randn(512, 64), "target": torch.randint(0, 8, (512,))}
    """ % str(ROOT / "examples"))
    rc, out, err = _run(capsys, "verify", f"{other}:wider", plan_file)
    assert rc == 2 and err.count("\n") == 1
    assert "made for another model" in err and "'head.weight'" in err  # names the first differing parameter


def test_targets(capsys):
    rc, out, _ = _run(capsys, "targets")
    assert rc == 0
    names = [line.split()[0] for line in out.splitlines()]
    assert "cpu" in names and "h100" in names


def test_plan_and_verify_under_autocast(capsys, tmp_path):
    """``--autocast bf16`` plans the step under ``torch.autocast("cpu", dtype=torch.bfloat16)``
    (recorded in the plan), the factory's loss included; ``planner verify`` runs the plan's
    steps under the autocast it recorded."""
    factory = _factory_file(tmp_path, """
        import torch
        from torch import nn
        def mlp():
            torch.manual_seed(0)
            model = nn.Sequential(*[m for _ in range(2) for m in (nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))])
            x, y = torch.randn(512, 64), torch.randint(0, 64, (512,))
            return model, (x,), lambda out: nn.functional.cross_entropy(out.float(), y)
    """) + ":mlp"
    path = tmp_path / "bf16.json"
    rc, _, err = _run(capsys, "plan", factory, "--budget-gb", "0.0017", "--autocast", "bf16", "-o", path, "--quiet")
    assert rc == 0, err
    p = planner.Plan.from_json(path)
    assert p.model.autocast == "cpu:bfloat16" and p.recomputed and p.training_loop.loss == "loss_fn"
    with recorded_autocast(p.model.autocast):  # what `planner verify` runs the plan's steps under
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    rc, _, err = _run(capsys, "plan", factory, "--budget-gb", "0.0017", "--autocast", "fp32")
    assert rc == 2 and "invalid choice: 'fp32'" in err
