"""The shared aggregation of runs' test metrics: grouping by the overrides other than the seed, mean ± std cells."""

from __future__ import annotations

import json
import math

from eblvm.aggregate import (
    METRICS,
    group_by_setting,
    job_cells,
    job_metrics,
    mean_and_stdev,
    mean_std,
    mean_std_cells,
    present_metrics,
    read_summary,
    setting,
)


def test_mean_std_is_the_mean_and_sample_standard_deviation():
    assert mean_std([-1.0, -2.0]) == "-1.500 ± 0.707"
    assert mean_std([1.0, 2.0, 6.0]) == "+3.000 ± 2.646"
    assert mean_std([2.0, 4.0], ".2f") == "3.00 ± 1.41"
    assert mean_std([-0.25]) == "-0.250"


def test_setting_drops_the_seed_and_the_overrides_that_name_paths():
    overrides = ["objective.n_unroll=5", "seed=2", "hydra.sweep.dir=/tmp/x", "paths.output_dir=/tmp/y",
                 "hydra/launcher=slurm", "+model.h_dim=8", "++seed=3", "~objective.k"]  # fmt: skip
    assert setting(overrides) == ("objective.n_unroll=5", "+model.h_dim=8", "~objective.k")


def test_runs_are_grouped_by_setting_in_order_of_first_appearance():
    runs = [(["k=1", "seed=1"], "a"), (["k=0", "seed=1"], "b"), (["k=1", "seed=2"], "c"), (["seed=3"], "d")]
    assert group_by_setting(runs) == {("k=1",): ["a", "c"], ("k=0",): ["b"], (): ["d"]}


def test_job_metrics_are_read_from_summary_json(tmp_path):
    summary = {"steps": 30, "test/log_likelihood": -1.25, "test/log_likelihood_stderr": 0.0, "test/objective": 3.0,
               "test/fid": 12.5, "test/kid_mean": 0.01, "ms_per_step": 4.5}  # fmt: skip
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert read_summary(tmp_path) == summary
    assert read_summary(tmp_path / "missing") == {}
    assert job_metrics(summary) == {"test/log_likelihood": -1.25, "test/fid": 12.5, "ms_per_step": 4.5,
                                    "test/log_likelihood_stderr": 0.0}  # fmt: skip


def test_cells_hold_the_metrics_present_with_the_log_likelihoods_ais_stderr():
    image_run = {"test/fid": 12.345, "ms_per_step": 10.0}
    grbm_run = {"test/log_likelihood": -1.0, "test/log_likelihood_stderr": 0.0123, "ms_per_step": 2.0}
    columns = present_metrics([image_run, grbm_run])
    assert [title for _, title, _ in columns] == ["log-likelihood", "FID", "ms / step"]
    assert [key for key, _, _ in present_metrics([image_run])] == ["test/fid", "ms_per_step"]
    assert job_cells(grbm_run, columns) == ["-1.000 ± 0.012", "", "2.00"]
    assert job_cells({**grbm_run, "test/log_likelihood_stderr": 0.0}, columns) == ["-1.000", "", "2.00"]
    assert job_cells(image_run, columns) == ["", "12.35", "10.00"]
    assert mean_std_cells([image_run, grbm_run], columns) == ["-1.000", "12.35", "6.00 ± 5.66"]
    assert mean_std_cells([], METRICS) == ["", "", "", ""]


def test_a_non_finite_value_gives_a_non_finite_mean_instead_of_an_error():
    """An ensemble member or a run with an infinite metric (an infinite KL, a diverged loss): the summary is
    still written, its mean non-finite and its deviation nan (``statistics.stdev`` raises on inf)."""
    mean, stdev = mean_and_stdev([0.5, math.inf, 1.5])
    assert mean == math.inf and math.isnan(stdev)
    assert mean_and_stdev([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_and_stdev([4.0]) == (4.0, 0.0)
    assert mean_std([0.5, math.inf], ".2f") == "inf ± nan"
