"""benchmarks/ on CPU: every module imports as part of the package (no path edits), the
shared helpers keep their conventions, and bench_rmsnorm's launch sweep always holds the
defaults it compares against. The timings themselves need a GPU (benchmarks/kernels_device.sh)."""

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
MODULES = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", MODULES)
def test_imports_as_a_package_module_without_path_edits(name):
    tree = ast.parse((BENCHMARKS / f"{name}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = ast.unparse(node.func)
            assert target not in ("sys.path.insert", "sys.path.append"), f"{name}: {target}"
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("benchmarks."):
            # benchmarks share benchmarks.common, not each other's private helpers
            assert all(not alias.name.startswith("_") for alias in node.names), (name, node.module)
    importlib.import_module(f"benchmarks.{name}")


def test_bandwidth_convention_and_atomic_json(tmp_path, monkeypatch):
    from benchmarks import common

    assert common.tbs(4e12, 1000.0) == pytest.approx(4.0)  # 4e12 bytes in 1 s = 4 TB/s
    monkeypatch.setenv("GIT_COMMIT", "abc123")
    assert common.commit() == "abc123"  # the device's copy of the tree has no .git
    path = tmp_path / "deep" / "r.json"
    common.write_json(path, {"x": 1.5, "path": tmp_path})
    assert json.loads(path.read_text()) == {"x": 1.5, "path": str(tmp_path)}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary left behind


@pytest.mark.parametrize("hidden", (4096, 5120, 8192, 1000))
def test_rmsnorm_sweep_holds_the_defaults_and_both_row_layouts(hidden):
    from benchmarks import rmsnorm_sweep as bench  # bench_rmsnorm's launch sweep
    from kernels import rmsnorm

    fwd, bwd = bench.forward_candidates(hidden), bench.backward_candidates(hidden)
    assert rmsnorm.forward_config(hidden) in fwd and rmsnorm.backward_config(hidden) in bwd
    assert len(set(fwd)) == len(fwd) and len(set(bwd)) == len(bwd)
    splits = rmsnorm.column_blocks(hidden)[1] > 0
    for candidates in (fwd, bwd):  # split and unsplit rows both timed where a split exists
        assert len({c.split for c in candidates}) == (2 if splits else 1)


def test_rmsnorm_bad_precompile_part_is_one_line():
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_rmsnorm", "--precompile", "3"],
                         cwd=BENCHMARKS.parent, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--precompile takes I/N" in out.stderr.strip().splitlines()[-1]
