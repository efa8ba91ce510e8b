"""Runs' test metrics and their mean ± standard deviation over seeds: the sweep tables (``eblvm/sweeps.py``) and the
study scripts (``experiments/*/study.py``) share these functions."""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

Metric = tuple[str, str, str]  # a key of summary.json, its column title, the format of a value
# The test metrics of a run's summary.json, in table order; the tables have a column for each one some run has.
METRICS: tuple[Metric, ...] = (
    ("test/log_likelihood", "log-likelihood", "+.3f"),
    ("test/sm_objective", "SM objective", "+.3f"),
    ("test/fid", "FID", ".2f"),
    ("ms_per_step", "ms / step", ".2f"),
)
# The AIS standard error of the log-likelihood (0.0 when log Z is exact), shown beside one run's log-likelihood.
LOG_LIKELIHOOD_STDERR = "test/log_likelihood_stderr"
# Override keys whose values do not change what a run does: its seed, and where it writes (hydra.*, paths.*).
SEED = "seed"
PATH_ROOTS = ("hydra", "paths")

Run = TypeVar("Run")


def read_summary(run_dir: Path) -> dict:
    """The ``summary.json`` a finished run wrote into ``run_dir``; empty when there is none (or it is unreadable)."""
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def job_metrics(summary: Mapping) -> dict[str, float]:
    """The ``METRICS`` and the log-likelihood's standard error that ``summary`` holds."""
    keys = [key for key, _, _ in METRICS] + [LOG_LIKELIHOOD_STDERR]
    return {key: summary[key] for key in keys if key in summary}


def present_metrics(runs: Iterable[Mapping[str, float]]) -> list[Metric]:
    """The entries of ``METRICS`` that at least one of ``runs`` has."""
    keys = {key for run in runs for key in run}
    return [metric for metric in METRICS if metric[0] in keys]


def setting(overrides: Sequence[str]) -> tuple[str, ...]:
    """The overrides that set what a run does: all but its ``seed`` and those naming paths (``hydra.*``,
    ``paths.*``, ``hydra/launcher=...``)."""
    keys = [override.split("=", 1)[0].lstrip("+~") for override in overrides]
    return tuple(
        override
        for override, key in zip(overrides, keys, strict=True)
        if key != SEED and re.split(r"[./]", key)[0] not in PATH_ROOTS
    )


def group_by_setting(runs: Iterable[tuple[Sequence[str], Run]]) -> dict[tuple[str, ...], list[Run]]:
    """``(overrides, run)`` pairs grouped by the ``setting`` of their overrides, in order of first appearance."""
    groups: dict[tuple[str, ...], list[Run]] = {}
    for overrides, run in runs:
        groups.setdefault(setting(overrides), []).append(run)
    return groups


def mean_and_stdev(values: Sequence[float]) -> tuple[float, float]:
    """The mean and sample standard deviation of ``values`` (0 for one finite value). A non-finite value (a diverged
    run's loss, an infinite divergence) makes the mean non-finite and the deviation nan, where ``statistics``
    would raise."""
    if not all(math.isfinite(value) for value in values):
        return sum(values) / len(values), math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_std(values: Sequence[float], fmt: str = "+.3f") -> str:
    """``mean ± sample standard deviation`` of ``values`` (the value alone for one), the mean formatted by ``fmt``
    and the deviation by ``fmt`` without its sign."""
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    mean, stdev = mean_and_stdev(values)
    return f"{mean:{fmt}} ± {stdev:{_unsigned(fmt)}}"


def _unsigned(fmt: str) -> str:
    """A format spec without its ``+`` (a deviation or standard error is written without a sign)."""
    return fmt.replace("+", "")


def job_cells(metrics: Mapping[str, float], columns: Sequence[Metric]) -> list[str]:
    """One run's cells for ``columns`` (entries of ``METRICS``): each value, empty where the run lacks it; the
    log-likelihood as ``value ± stderr`` where its AIS standard error is above 0."""
    cells = []
    for key, _, fmt in columns:
        stderr = metrics.get(LOG_LIKELIHOOD_STDERR, 0.0) if key == "test/log_likelihood" else 0.0
        if key not in metrics:
            cells.append("")
        elif stderr > 0:
            cells.append(f"{metrics[key]:{fmt}} ± {stderr:{_unsigned(fmt)}}")
        else:
            cells.append(f"{metrics[key]:{fmt}}")
    return cells


def mean_std_cells(runs: Sequence[Mapping[str, float]], columns: Sequence[Metric]) -> list[str]:
    """One cell per column of ``columns`` (entries of ``METRICS``): ``mean_std`` over the runs that have the metric,
    empty where none has it."""
    cells = []
    for key, _, fmt in columns:
        values = [run[key] for run in runs if key in run]
        cells.append(mean_std(values, fmt) if values else "")
    return cells
