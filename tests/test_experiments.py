"""The experiment commands run end to end in their quick settings and write their table and figure."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_checkerboard_study_quick_writes_table_and_figure(tmp_path):
    command = [sys.executable, "experiments/checkerboard/study.py", "--setting", "quick", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = (tmp_path / "results_quick.md").read_text()
    rows = [line for line in table.splitlines() if re.match(r"\| (Bi|DSM|SSM|CD|PCD|NCE|VNCE)", line)]
    assert len(rows) == 12
    assert all(row.split("|")[2].strip() == "3" for row in rows), "every method over 3 seeds"
    assert (tmp_path / "density_grid_quick.png").stat().st_size > 10_000
    assert len(list((tmp_path / "runs" / "quick").glob("*/seed_*/summary.json"))) == 36
