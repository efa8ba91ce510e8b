"""A Hydra callback for multiruns: one table of every job's outcome and test metrics, one of their mean over seeds.

Each job of ``python train.py -m ...`` writes ``<job dir>/outcome.json`` (``train.py``), and ``summary.json`` when it
finished; a job that fails, diverges or is preempted does not stop the sweep. ``SweepOutcomes`` gathers these files at
the end of the sweep into ``<sweep dir>/outcomes.json`` and ``<sweep dir>/outcomes.md``; ``python -m eblvm.sweeps
<sweep dir>`` writes them for a sweep that did not reach its end.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from eblvm.aggregate import group_by_setting, job_cells, job_metrics, mean_std_cells, present_metrics, read_summary
from eblvm.atomic import write_json, write_text

log = logging.getLogger(__name__)

OUTCOME_FILE = "outcome.json"
# A job directory is one Hydra wrote its .hydra/ folder into (before the job's code ran) or that holds an outcome.
HYDRA_FOLDER = ".hydra"
# The order in which the count line lists statuses; others (none expected) follow alphabetically.
STATUS_ORDER = ("ok", "diverged", "failed", "preempted", "missing")


@dataclass(frozen=True)
class JobOutcome:
    """How one job of a sweep ended: its directory relative to the sweep directory, its overrides, the ``status``,
    ``exit_code``, ``message`` and ``step`` of its ``outcome.json`` (a finished job's step: its ``summary.json``'s
    ``steps``), and a finished job's test metrics (``eblvm.aggregate.job_metrics``)."""

    job_dir: str
    overrides: list[str]
    status: str
    exit_code: int | None
    message: str
    step: int | None
    metrics: dict[str, float]


def _natural_key(path: Path) -> list[Any]:
    """Sort key that orders ``2_...`` before ``10_...`` (Hydra numbers job directories from 0)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.as_posix())]


def find_job_dirs(sweep_dir: Path) -> list[Path]:
    """Every job directory below ``sweep_dir``, at any depth, in natural order; hidden folders such as submitit's
    ``.submitit/`` logs are skipped."""
    candidates = {path.parent for path in sweep_dir.rglob(HYDRA_FOLDER) if path.is_dir()}
    candidates |= {path.parent for path in sweep_dir.rglob(OUTCOME_FILE)}
    job_dirs = [
        path
        for path in candidates
        if path != sweep_dir and not any(part.startswith(".") for part in path.relative_to(sweep_dir).parts)
    ]
    return sorted(job_dirs, key=lambda path: _natural_key(path.relative_to(sweep_dir)))


def read_job_outcome(job_dir: Path, sweep_dir: Path) -> JobOutcome:
    """The outcome of the job in ``job_dir``; status ``missing`` when it wrote no readable ``outcome.json`` (it was
    killed before the end, or is still running). Only a job with status ``ok`` has metrics."""
    overrides_file = job_dir / HYDRA_FOLDER / "overrides.yaml"
    overrides = (yaml.safe_load(overrides_file.read_text()) or []) if overrides_file.is_file() else []
    job = job_dir.relative_to(sweep_dir).as_posix()
    try:
        outcome = json.loads((job_dir / OUTCOME_FILE).read_text())
    except FileNotFoundError:
        message = f"no {OUTCOME_FILE}: killed before its end, or still running"
        return JobOutcome(job, overrides, "missing", None, message, None, {})
    except json.JSONDecodeError as error:
        return JobOutcome(job, overrides, "missing", None, f"unreadable {OUTCOME_FILE}: {error}", None, {})
    summary = read_summary(job_dir) if outcome["status"] == "ok" else {}
    return JobOutcome(
        job,
        overrides,
        outcome["status"],
        outcome["exit_code"],
        outcome.get("message", ""),
        summary.get("steps", outcome.get("step")),
        job_metrics(summary),
    )


def collect_outcomes(sweep_dir: Path) -> list[JobOutcome]:
    """The outcome of every job below ``sweep_dir``."""
    return [read_job_outcome(job_dir, sweep_dir) for job_dir in find_job_dirs(sweep_dir)]


def _status_rank(status: str) -> tuple[int, str]:
    """Sort key of a status: its place in ``STATUS_ORDER``, unknown ones last."""
    return (STATUS_ORDER.index(status) if status in STATUS_ORDER else len(STATUS_ORDER), status)


def count_line(outcomes: list[JobOutcome]) -> str:
    """``3 jobs: 2 ok, 1 diverged``: how many jobs ended in each status."""
    counts = Counter(outcome.status for outcome in outcomes)
    parts = ", ".join(f"{counts[status]} {status}" for status in sorted(counts, key=_status_rank))
    jobs = f"{len(outcomes)} job" + ("" if len(outcomes) == 1 else "s")
    return f"{jobs}: {parts}" if outcomes else jobs


def _cell(text: str) -> str:
    """Text made safe for one markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = [header, ["---"] * len(header), *([_cell(cell) for cell in row] for row in rows)]
    return "".join("| " + " | ".join(line) + " |\n" for line in lines)


def _code(overrides: Sequence[str]) -> str:
    """Overrides as one code span (empty for none)."""
    return f"`{' '.join(overrides)}`" if overrides else ""


def markdown_table(outcomes: list[JobOutcome]) -> str:
    """The outcomes as a markdown table, one row per job, with a column for each test metric some job has."""
    columns = present_metrics(outcome.metrics for outcome in outcomes)
    header = ["job", "status", "exit code", "step", *(title for _, title, _ in columns), "overrides", "message"]
    rows = [
        [
            outcome.job_dir,
            outcome.status,
            "" if outcome.exit_code is None else str(outcome.exit_code),
            "" if outcome.step is None else str(outcome.step),
            *job_cells(outcome.metrics, columns),
            _code(outcome.overrides),
            outcome.message,
        ]
        for outcome in outcomes
    ]
    return _table(header, rows)


def mean_std_table(outcomes: list[JobOutcome]) -> str:
    """One row per setting of the overrides other than the seed (and paths): how many of its seeds finished, and
    each test metric's mean ± standard deviation over those."""
    columns = present_metrics(outcome.metrics for outcome in outcomes)
    groups = group_by_setting((outcome.overrides, outcome) for outcome in outcomes)
    rows = []
    for overrides, jobs in groups.items():
        finished = [job.metrics for job in jobs if job.status == "ok"]
        seeds = str(len(jobs)) if len(finished) == len(jobs) else f"{len(finished)} of {len(jobs)} finished"
        rows.append([_code(overrides) or "(none)", seeds, *mean_std_cells(finished, columns)])
    return _table(["overrides", "seeds", *(title for _, title, _ in columns)], rows)


def write_outcomes(sweep_dir: Path) -> list[JobOutcome]:
    """Write ``outcomes.json`` and ``outcomes.md`` into ``sweep_dir`` and return the outcomes they hold."""
    outcomes = collect_outcomes(sweep_dir)
    write_json(sweep_dir / "outcomes.json", [asdict(outcome) for outcome in outcomes])
    write_text(
        sweep_dir / "outcomes.md",
        f"{count_line(outcomes)}\n\n{markdown_table(outcomes)}\n"
        f"mean ± std over seeds, for each setting of the other overrides:\n\n{mean_std_table(outcomes)}",
    )
    return outcomes


class SweepOutcomes(Callback):
    """At the end of a multirun, gathers every job's ``outcome.json`` and test metrics into
    ``<sweep dir>/outcomes.json`` and ``outcomes.md`` and logs how many jobs ended in each status. Registered in
    ``conf/hydra/default.yaml``."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        outcomes = write_outcomes(sweep_dir)
        log.info("sweep outcomes: %s (%s)", count_line(outcomes), sweep_dir / "outcomes.md")


def main(argv: list[str] | None = None) -> None:
    """``python -m eblvm.sweeps <sweep dir>``: write the outcome files of a sweep whose end the callback did not see
    (a multirun that was killed or ended with an error, or SLURM jobs still running)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("sweep_dir", type=Path, help="the multirun's directory (hydra.sweep.dir)")
    sweep_dir = parser.parse_args(argv).sweep_dir
    outcomes = write_outcomes(sweep_dir)
    print(f"{count_line(outcomes)}: {sweep_dir / 'outcomes.md'}")


if __name__ == "__main__":
    main()
