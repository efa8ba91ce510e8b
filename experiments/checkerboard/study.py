"""The checkerboard studies of the BiSM and VaGES papers: every method over several seeds, aggregated into a table
and figures.

    python experiments/checkerboard/study.py                    # BiSM study: 20k steps, seeds 1 2 3 (about 40 min)
    python experiments/checkerboard/study.py --study vages      # VaGES study: 20k steps, the paper's 10 seeds
    python experiments/checkerboard/study.py --setting quick    # a smoke test of the whole pipeline (minutes)
    python experiments/checkerboard/study.py --setting paper    # the papers' 100k steps
    python experiments/checkerboard/study.py --aggregate-only   # rebuild the table and figures from the runs

Each method's seeds train as one ensemble (``ensemble.size=S``, docs/methods.md §9), two methods side by side, so
both cores are used; the members go to experiments/checkerboard/runs/<setting>/<method>/members/<k>/ (W&B off: the
table is built from each member's summary.json, and a member's time is its share of its ensemble's). The VaGES
study's rows that the BiSM study also has (BiDSM, DSM, CD-1, PCD-1, NCE, VNCE) are read from that study's runs, not
trained again. Results beside this file: results.md and density_grid.png (BiSM, 20k), results_vages.md,
density_grid_vages.png and curves_vages.png (VaGES, 20k), with ``_<setting>`` for the other settings.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from eblvm.aggregate import mean_std  # noqa: E402
from eblvm.assemble import instantiate_node  # noqa: E402
from eblvm.atomic import write_text  # noqa: E402
from eblvm.checkpoints import load_checkpoint  # noqa: E402
from eblvm.evaluation.plots import plot_density_grid, save_figure  # noqa: E402
from eblvm.studies import Method, code_version, collect, launch_ensembles, load_model, provenance  # noqa: E402

# Each method's cost is its seconds per 1000 steps in the 20k study (results.md, results_vages.md; IS-KSD's and
# VaGES-KSD's three settings share their mean): the study starts the costliest first, so both queues end together.
BISM_METHODS = (
    Method("BiDSM N=0", ("experiment=checkerboard_bidsm", "objective.n_unroll=0"), cost=6.5),
    Method("BiDSM N=5", ("experiment=checkerboard_bidsm",), cost=12.3),
    Method("BiDSM N=10", ("experiment=checkerboard_bidsm", "objective.n_unroll=10"), cost=18.9),
    Method("BiSSM", ("experiment=checkerboard_bissm",), cost=13.6),
    Method("DSM", ("experiment=checkerboard_dsm",), cost=1.4),
    Method("SSM", ("experiment=checkerboard_ssm",), cost=1.4),
    Method("CD-1", ("experiment=checkerboard_cd", "objective.k=1"), cost=1.5),
    Method("CD-5", ("experiment=checkerboard_cd", "objective.k=5"), cost=2.0),
    Method("CD-10", ("experiment=checkerboard_cd", "objective.k=10"), cost=2.6),
    Method("PCD-1", ("experiment=checkerboard_pcd",), cost=1.5),
    # NCE and VNCE with the paper's noise N(0, I) (objective.noise=standard_normal, set by their experiment files).
    Method("NCE", ("experiment=checkerboard_nce",), cost=1.8),
    Method("VNCE", ("experiment=checkerboard_vnce",), cost=6.1),
)

VAGES_METHODS = (
    Method("VaGES-DSM L=2 K=5", ("experiment=checkerboard_vagesdsm",), cost=4.2),
    Method("KSD", ("experiment=checkerboard_ksd",), cost=0.8),
    *(
        Method(f"IS-KSD K={k}", ("experiment=checkerboard_is_ksd", f"objective.n_proposals={k}"), cost=1.4)
        for k in (2, 5, 10)
    ),
    *(
        Method(f"VaGES-KSD L={n}", ("experiment=checkerboard_vagesksd", f"objective.n_particles={n}"), cost=5.7)
        for n in (2, 5, 10)
    ),
)
VAGES_SEEDS = (1, 22, 77, 123, 666, 1234, 3333, 7777, 9090, 23333)  # the VaGES paper's


@dataclass(frozen=True)
class Study:
    """One paper's table: the methods it trains, the BiSM study's rows it shows beside them (read from that study's
    runs), its seeds per setting, the authors' 20k-step values and, where a training curve is compared, the
    authors' log-likelihood at given steps."""

    paper: str
    methods: tuple[Method, ...]
    seeds: dict[str, tuple[int, ...]]
    reference: dict[str, float]
    suffix: str
    shared: tuple[str, ...] = ()
    curve: tuple[str, dict[int, float]] | None = None


STUDIES = {
    # The authors' code at the paper's settings, 20k steps, seed 1234, on a 2-core CPU (issues 3 and 10).
    "bism": Study(
        "BiSM",
        BISM_METHODS,
        {"quick": (1, 2, 3), "default": (1, 2, 3), "paper": (1, 2, 3)},
        {"BiDSM N=5": -0.32, "BiSSM": 0.29, "DSM": 0.05, "CD-5": 0.20},
        "",
    ),
    "vages": Study(
        "VaGES",
        VAGES_METHODS,
        {"quick": (1, 2, 3), "default": VAGES_SEEDS, "paper": VAGES_SEEDS},
        {"VaGES-DSM L=2 K=5": 0.04},
        "_vages",
        shared=("BiDSM N=5", "DSM", "CD-1", "PCD-1", "NCE", "VNCE"),
        curve=("VaGES-DSM L=2 K=5", {5000: -0.33, 10000: -0.20, 15000: -0.11, 20000: 0.04}),
    ),
}

SETTINGS = {
    "quick": (
        "trainer.max_steps=20",
        "trainer.val_check_interval=10",
        "trainer.limit_val_batches=2",
        "data.splits.n_train=2000",
        "data.splits.n_val=500",
        "data.splits.n_test=500",
        "sampling.n_samples=100",
        "sampling.gibbs_sweeps=10",
        "evaluation.gradient_bias_repeats=2",
    ),
    "default": ("trainer.max_steps=20000", "trainer.val_check_interval=1000"),
    "paper": ("trainer.max_steps=100000", "trainer.val_check_interval=5000"),
}
# The paper reports the model at the end of training, so the study tests the final weights, not the best ones.
ALWAYS = ("logger=csv", "callbacks.progress.refresh_rate=0", "test_checkpoint=last")


def directory_name(method: Method) -> str:
    return method.name.lower().replace(" ", "_").replace("=", "")


def _table_methods(study: Study) -> list[Method]:
    """The study's rows: its shared BiSM rows first (in the BiSM study's order), then its own methods."""
    return [m for m in BISM_METHODS if m.name in study.shared] + list(study.methods)


def aggregate(study: Study, setting: str, out: Path, command: str, version: str, seconds: float | None) -> Path:
    """Write the study's results table, density grid and (where it compares one) curve figure from the finished
    runs under ``out/runs/<setting>``."""
    runs_dir = out / "runs" / setting
    rows, densities, total_seconds, data, excluded, missing = [], {}, 0.0, None, [], []
    for method in _table_methods(study):
        runs = collect(runs_dir / directory_name(method))
        excluded += [Path(run["run_dir"]).relative_to(out) for run in runs if not _tested_final_weights(run)]
        runs = [run for run in runs if _tested_final_weights(run)]
        if not runs:
            missing.append(method.name)
            continue
        if method in study.methods:
            total_seconds += sum(run["train_seconds"] for run in runs)
        lls = [run["test/log_likelihood"] for run in runs]
        sms = [run["test/sm_objective"] for run in runs]
        times = [run["ms_per_step"] for run in runs]  # ms per step = s per 1000 steps
        reference = study.reference.get(method.name)
        shared = " (BiSM study's runs)" if method.name in study.shared else ""
        rows.append(
            f"| {method.name}{shared} | {len(runs)} | {mean_std(lls)} | {mean_std(sms)} | {mean_std(times, '.3f')} | "
            f"{'' if reference is None else f'{reference:+.2f}'} |"
        )
        first = min(runs, key=lambda run: run["seed"])
        model = load_model(first["run_dir"], _final_checkpoint(first))
        densities[f"{method.name} (seed {first['seed']})"] = (model, model.log_partition().item())
        if data is None:
            data = _training_data(first["config"])
    suffix = study.suffix + ("" if setting == "default" else f"_{setting}")
    figure = plot_density_grid(densities, data, out / f"density_grid{suffix}.png") if densities else None
    curve_section = _curve_section(study, runs_dir, out / f"curves{suffix}.png") if study.curve else ""
    results = out / f"results{suffix}.md"
    write_text(
        results,
        f"# Checkerboard study, {study.paper} paper ({setting})\n\n"
        "Test log-likelihood in nats per point (exact, by enumerating the 16 hidden states; the best possible is "
        "log 2 = 0.693), SM objective on test (exact score and Hessian trace; lower is better), and seconds per "
        "1000 training steps (validation excluded; a member's share of its ensemble's time), as mean ± standard "
        "deviation over seeds. The last column is the authors' code at 20k steps, seed 1234.\n\n"
        "| method | seeds | test log-likelihood | SM objective | s / 1000 steps | authors, 20k |\n"
        "|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n\n"
        + curve_section
        + provenance(command, version, seconds, total_seconds)
        + "".join(f"- excluded (tested an earlier best checkpoint, not the final weights): `{r}`\n" for r in excluded)
        + "".join(f"- not in the table (no finished runs under `runs/{setting}`): {name}\n" for name in missing)
        + (f"\n![learned densities]({figure.name})\n" if figure else ""),
    )
    return results


def validation_curve(run: dict) -> dict[int, float]:
    """A run's validation log-likelihood by step, from its metrics.csv (an ensemble member's rows of its
    ensemble's file)."""
    run_dir = Path(run["run_dir"])
    member = run_dir.name if run_dir.parent.name == "members" else None
    metrics = run_dir.parents[1] / "metrics.csv" if member is not None else run_dir / "metrics.csv"
    with metrics.open(newline="") as file:
        rows = [row for row in csv.DictReader(file) if member is None or row["member"] == member]
    return {int(row["step"]): float(row["val/log_likelihood"]) for row in rows if row.get("val/log_likelihood")}


def _curve_section(study: Study, runs_dir: Path, path: Path) -> str:
    """The compared method's validation log-likelihood against the authors' values: a table of mean ± std over
    seeds at the authors' steps, whether each authors' value lies within max(2 std, 0.1 nats) of the mean, and a
    figure of every seed's curve."""
    name, authors = study.curve
    method = next(m for m in study.methods if m.name == name)
    curves = [validation_curve(run) for run in collect(runs_dir / directory_name(method))]
    curves = [curve for curve in curves if curve]
    if not curves:
        return ""
    steps = sorted(set.intersection(*(set(curve) for curve in curves)))
    values = torch.tensor([[curve[step] for step in steps] for curve in curves], dtype=torch.float64)
    mean, std = values.mean(0), values.std(0) if len(curves) > 1 else torch.zeros(len(steps))
    lines = [
        f"## {name}: validation log-likelihood against the authors' run\n",
        f"Exact validation log-likelihood logged every {steps[1] - steps[0] if len(steps) > 1 else steps[0]} steps, "
        f"mean ± standard deviation over {len(curves)} seeds; the authors' code at seed 1234 (test split). The bound "
        "is max(2 std, 0.1 nats) around the mean, checked at 5k, 10k and 15k; 20k is shown without one.\n",
        "| step | eblvm | authors | difference | within bound |",
        "|---|---|---|---|---|",
    ]
    for step, reference in authors.items():
        if step not in steps:
            continue
        i = steps.index(step)
        difference = reference - float(mean[i])
        bound = max(2 * float(std[i]), 0.1)
        verdict = "(no bound)" if step == max(authors) else ("yes" if abs(difference) <= bound else "**no**")
        lines.append(f"| {step} | {mean[i]:+.3f} ± {std[i]:.3f} | {reference:+.2f} | {difference:+.3f} | {verdict} |")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in values:
        ax.plot(steps, row, color="tab:blue", alpha=0.3, linewidth=1)
    ax.plot(steps, mean, color="tab:blue", linewidth=2, label=f"eblvm, mean of {len(curves)} seeds")
    ax.fill_between(steps, mean - 2 * std, mean + 2 * std, color="tab:blue", alpha=0.15, label="± 2 std")
    ax.plot(list(authors), list(authors.values()), "o", color="tab:red", label="authors' code, seed 1234")
    ax.set(xlabel="training step", ylabel="log-likelihood (nats per point)", title=name, ylim=(-1.5, 0.8))
    ax.axhline(0.693, color="gray", linestyle=":", linewidth=1)
    ax.legend(loc="lower right")
    save_figure(fig, path)
    return "\n".join(lines) + f"\n\n![validation curves]({path.name})\n\n"


def _tested_final_weights(run: dict) -> bool:
    """Whether a run's test metrics are those of its final weights (the paper's protocol)."""
    if run.get("tested") == "final weights":
        return True
    best = load_checkpoint(Path(run["run_dir"]) / "checkpoints" / "best.ckpt")
    return best["global_step"] == run["steps"]


def _final_checkpoint(run: dict) -> str:
    """The file holding a run's final weights: last.ckpt, or best.ckpt where it was written at the last step
    (runs from before last.ckpt was kept up to date)."""
    return "last.ckpt" if run.get("tested") == "final weights" else "best.ckpt"


def _training_data(config: dict) -> torch.Tensor:
    return instantiate_node("data.splits", OmegaConf.create(config["data"]["splits"])).train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=STUDIES, default="bism", help="which paper's table (default bism)")
    parser.add_argument("--setting", choices=SETTINGS, default="default")
    parser.add_argument("--jobs", type=int, default=2, help="methods trained side by side (default 2)")
    parser.add_argument("--methods", nargs="*", help="a subset of method names, e.g. 'BiDSM N=5' DSM")
    parser.add_argument("--aggregate-only", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for runs/ and the results (default: here)")
    args = parser.parse_args()
    study = STUDIES[args.study]
    runs_dir = args.out / "runs" / args.setting
    methods = [m for m in study.methods if not args.methods or m.name in args.methods]
    unknown = set(args.methods or ()) - {m.name for m in study.methods}
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {[m.name for m in study.methods]}")
    seconds, version = None, code_version()
    if not args.aggregate_only:
        seeds = study.seeds[args.setting]
        print(f"checkerboard study ({study.paper}), {args.setting}: {len(methods)} methods x {len(seeds)} seeds")
        named = [replace(m, name=directory_name(m)) for m in methods]
        seconds = launch_ensembles(named, SETTINGS[args.setting] + ALWAYS, seeds, runs_dir, args.jobs)
    command = "python experiments/checkerboard/study.py " + " ".join(sys.argv[1:])
    print(f"wrote {aggregate(study, args.setting, args.out, command.strip(), version, seconds)}")


if __name__ == "__main__":
    main()
