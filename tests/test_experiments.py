"""The experiment commands run end to end in their quick settings and write their table and figure."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _run_quick(tmp_path, script: str, *arguments: str, timeout: int) -> str:
    """``python <script> --setting quick --out <tmp_path> <arguments>``, which must succeed; its output."""
    command = [sys.executable, script, "--setting", "quick", "--out", str(tmp_path), *arguments]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def _import_script(script: str) -> ModuleType:
    """An experiment script imported as a module (its ``main`` not run)."""
    spec = importlib.util.spec_from_file_location(Path(script).stem, ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _quick_study(tmp_path, *arguments: str) -> str:
    return _run_quick(tmp_path, "experiments/checkerboard/study.py", *arguments, timeout=1200)


def test_checkerboard_studies_quick_write_their_tables_and_figures(tmp_path):
    """The BiSM study, then the VaGES study, which reads the rows they share from the BiSM study's runs."""
    _quick_study(tmp_path)
    table = (tmp_path / "results_quick.md").read_text()
    rows = [line for line in table.splitlines() if re.match(r"\| (Bi|DSM|SSM|CD|PCD|NCE|VNCE)", line)]
    assert len(rows) == 12
    assert all(row.split("|")[2].strip() == "3" for row in rows), "every method over 3 seeds"
    assert (tmp_path / "density_grid_quick.png").stat().st_size > 10_000
    # each method's seeds trained as one ensemble of 3 members
    assert len(list((tmp_path / "runs" / "quick").glob("*/members/*/summary.json"))) == 36

    output = _quick_study(tmp_path, "--study", "vages")
    assert "8 methods x 3 seeds" in output, "the shared rows are not trained again"
    table = (tmp_path / "results_vages_quick.md").read_text()
    rows = [line for line in table.splitlines() if re.match(r"\| (Bi|DSM|CD|PCD|NCE|VNCE|VaGES|KSD|IS-KSD)", line)]
    assert len(rows) == 14 and sum("(BiSM study's runs)" in row for row in rows) == 6
    assert "not in the table" not in table
    assert len(list((tmp_path / "runs" / "quick").glob("*/members/*/summary.json"))) == 36 + 24
    assert (tmp_path / "curves_vages_quick.png").stat().st_size > 10_000
    assert (tmp_path / "density_grid_vages_quick.png").stat().st_size > 10_000


def test_nk_study_quick_writes_table_and_gradient_bias_figure(tmp_path):
    _run_quick(tmp_path, "experiments/nk_study/study.py", "--repeats", "3", timeout=900)
    table = (tmp_path / "results_quick.md").read_text()
    grid_rows = [line for line in table.splitlines() if re.match(r"\| (0|1|5|10) \|", line)]
    assert len(grid_rows) == 8, "a 4x4 log-likelihood grid and a 4x4 gradient-bias grid"
    assert all(len(row.strip("|").split("|")) == 5 and "|  |" not in row for row in grid_rows)
    assert (tmp_path / "gradient_bias_quick.png").stat().st_size > 10_000
    assert len(list((tmp_path / "runs" / "quick").glob("grid*/K*_N*/summary.json"))) == 16


def test_nk_study_deals_its_k_values_to_queues_of_equal_measured_cost():
    """With two jobs the (K, N) grid's queues are K ∈ {0, 10} and {1, 5}: a run's fixed cost (start-up, N's unroll,
    the energy step) is about eight lower steps' worth, so the K = 10 runs alone (the old split, which counted a run
    as 1 + K) were 4 of 16 runs and left one core idle for the last 13 of 31 minutes."""
    study = _import_script("experiments/nk_study/study.py")
    queues = [next(o for o in method.overrides if "n_lower_steps=" in o) for method in study.grid_methods(jobs=2)]
    assert sorted(queues) == ["objective.n_lower_steps=0,10", "objective.n_lower_steps=1,5"]


def test_vages_grid_quick_writes_tables_and_figure(tmp_path, monkeypatch):
    _run_quick(tmp_path, "experiments/nk_study/study.py", "--study", "vages", "--repeats", "3", timeout=900)
    table = (tmp_path / "results_vages_quick.md").read_text()
    grid_rows = [line for line in table.splitlines() if re.match(r"\| (1|2) \|", line)]
    assert len(grid_rows) == 6, "log-likelihood, gradient-bias and time grids over K = 1, 2"
    assert all(len(row.strip("|").split("|")) == 3 and "|  |" not in row for row in grid_rows)
    assert (tmp_path / "vages_grid_quick.png").stat().st_size > 10_000
    run_dirs = sorted((tmp_path / "runs" / "quick").glob("vages_L*/L*_K*"))
    assert len([run for run in run_dirs if (run / "summary.json").is_file()]) == 4

    # the bias grid's cells: each (L, K) with an objective of L particles, restarted for K lower steps
    study = _import_script("experiments/nk_study/study.py")
    cells = []
    monkeypatch.setattr(study, "gradient_bias", lambda model, q, optimizer, objective, v, repeats, n_lower_steps: (
        cells.append((objective.estimator.n_particles, n_lower_steps, repeats))))  # fmt: skip
    study.vages_bias_grid(run_dirs[0], (2, 3, 5), (1, 4), repeats=7)
    assert cells == [(2, 1, 7), (2, 4, 7), (3, 1, 7), (3, 4, 7), (5, 1, 7), (5, 4, 7)]


def test_fisher_benchmark_runs_with_other_options_write_files_of_their_own():
    benchmark = _import_script("experiments/fisher_estimation/benchmark.py")
    names = {
        (): "",
        ("--scores", "vaes", "exact"): "",
        ("--scores", "exact"): "_exact",
        ("--scores", "exact", "--fit", "regression"): "_exact_regression",
        ("--setting", "quick", "--dims", "500", "--levels", "0.2", "1.0"): "_quick_d500_p0.2-1",
        ("--lr", "1e-3", "--schedule", "cosine", "--critic-width", "400", "--seed", "2"): "_lr0.001_cosine_w400_seed2",
    }
    for arguments, suffix in names.items():
        assert benchmark.results_suffix(benchmark.parse_arguments(list(arguments))) == suffix, arguments
    with pytest.raises(SystemExit):
        benchmark.parse_arguments(["--fit", "regression"])  # both scores: VaES cannot be regressed


def test_fisher_benchmark_quick_writes_table_and_figure(tmp_path):
    _run_quick(tmp_path, "experiments/fisher_estimation/benchmark.py", timeout=600)
    table = (tmp_path / "results_quick.md").read_text()
    rows = [line for line in table.splitlines() if re.match(r"\| 10 \| 0\.[05] \| (exact|vaes) \|", line)]
    assert len(rows) == 4, table
    assert (tmp_path / "fisher_estimation_quick.png").stat().st_size > 10_000
