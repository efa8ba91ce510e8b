"""The BiSM paper's checkerboard study: every method over several seeds, aggregated into a table and a figure.

    python experiments/checkerboard/study.py                    # 20k steps, seeds 1 2 3 (about 2 h on 2 cores)
    python experiments/checkerboard/study.py --setting quick    # a smoke test of the whole pipeline (minutes)
    python experiments/checkerboard/study.py --setting paper    # the paper's 100k steps
    python experiments/checkerboard/study.py --aggregate-only   # rebuild results.md and density_grid.png

Each method's seeds train as one ensemble (``ensemble.size=3``, docs/methods.md §9), two methods side by side, so
both cores are used; the members go to experiments/checkerboard/runs/<setting>/<method>/members/<k>/ (W&B off: the
table is built from each member's summary.json, and a member's time is its share of its ensemble's). Results:
results.md and density_grid.png beside this file (results_<setting>.md and density_grid_<setting>.png for the
other settings).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from eblvm.aggregate import mean_std  # noqa: E402
from eblvm.assemble import instantiate_node  # noqa: E402
from eblvm.checkpoints import load_checkpoint  # noqa: E402
from eblvm.evaluation.plots import plot_density_grid  # noqa: E402
from eblvm.studies import Method, collect, launch_ensembles, load_model, provenance  # noqa: E402

METHODS = [
    Method("BiDSM N=0", ("experiment=checkerboard_bidsm", "objective.n_unroll=0")),
    Method("BiDSM N=5", ("experiment=checkerboard_bidsm",)),
    Method("BiDSM N=10", ("experiment=checkerboard_bidsm", "objective.n_unroll=10")),
    Method("BiSSM", ("experiment=checkerboard_bissm",)),
    Method("DSM", ("experiment=checkerboard_dsm",)),
    Method("SSM", ("experiment=checkerboard_ssm",)),
    Method("CD-1", ("experiment=checkerboard_cd", "objective.k=1")),
    Method("CD-5", ("experiment=checkerboard_cd", "objective.k=5")),
    Method("CD-10", ("experiment=checkerboard_cd", "objective.k=10")),
    Method("PCD-1", ("experiment=checkerboard_pcd",)),
    # NCE and VNCE with the paper's noise N(0, I) (objective.noise=standard_normal, set by their experiment files).
    Method("NCE", ("experiment=checkerboard_nce",)),
    Method("VNCE", ("experiment=checkerboard_vnce",)),
]

# The authors' code at the paper's settings, 20k steps, seed 1234, on a 2-core CPU (issue 3).
REFERENCE_20K = {"BiDSM N=5": -0.32, "BiSSM": 0.29, "DSM": 0.05, "CD-5": 0.20}

SETTINGS = {
    "quick": {
        "seeds": (1, 2, 3),
        "common": (
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
    },
    "default": {"seeds": (1, 2, 3), "common": ("trainer.max_steps=20000", "trainer.val_check_interval=1000")},
    "paper": {"seeds": (1, 2, 3), "common": ("trainer.max_steps=100000", "trainer.val_check_interval=5000")},
}
# The paper reports the model at the end of training, so the study tests the final weights, not the best ones.
ALWAYS = ("logger=csv", "callbacks.progress.refresh_rate=0", "test_checkpoint=last")


def directory_name(method: Method) -> str:
    return method.name.lower().replace(" ", "_").replace("=", "")


def aggregate(setting: str, out: Path, command: str, seconds: float | None) -> Path:
    """Write the results table and the density grid from the finished runs under ``out/runs/<setting>``."""
    runs_dir = out / "runs" / setting
    rows, densities, total_seconds, data, excluded = [], {}, 0.0, None, []
    for method in METHODS:
        runs = collect(runs_dir / directory_name(method))
        excluded += [Path(run["run_dir"]).relative_to(out) for run in runs if not _tested_final_weights(run)]
        runs = [run for run in runs if _tested_final_weights(run)]
        if not runs:
            continue
        total_seconds += sum(run["train_seconds"] for run in runs)
        lls = [run["test/log_likelihood"] for run in runs]
        sms = [run["test/sm_objective"] for run in runs]
        times = [run["ms_per_step"] for run in runs]  # ms per step = s per 1000 steps
        reference = REFERENCE_20K.get(method.name)
        rows.append(
            f"| {method.name} | {len(runs)} | {mean_std(lls)} | {mean_std(sms)} | {mean_std(times, '.3f')} | "
            f"{'' if reference is None else f'{reference:+.2f}'} |"
        )
        first = min(runs, key=lambda run: run["seed"])
        model = load_model(first["run_dir"], _final_checkpoint(first))
        densities[f"{method.name} (seed {first['seed']})"] = (model, model.log_partition().item())
        if data is None:
            data = _training_data(first["config"])
    suffix = "" if setting == "default" else f"_{setting}"
    figure = plot_density_grid(densities, data, out / f"density_grid{suffix}.png") if densities else None
    results = out / f"results{suffix}.md"
    results.write_text(
        f"# Checkerboard study ({setting})\n\n"
        "Test log-likelihood in nats per point (exact, by enumerating the 16 hidden states; the best possible is "
        "log 2 = 0.693), SM objective on test (exact score and Hessian trace; lower is better), and seconds per "
        "1000 training steps (validation excluded), as mean ± standard deviation over seeds. "
        "The last column is the authors' code at 20k steps, seed 1234 (issue 3).\n\n"
        "| method | seeds | test log-likelihood | SM objective | s / 1000 steps | authors, 20k |\n"
        "|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n\n"
        + provenance(command, seconds if seconds is not None else total_seconds)
        + ("" if seconds is not None else "- (wall-clock time: the training time summed over runs)\n")
        + "".join(f"- excluded (tested an earlier best checkpoint, not the final weights): `{r}`\n" for r in excluded)
        + (f"\n![learned densities]({figure.name})\n" if figure else "")
    )
    return results


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
    parser.add_argument("--setting", choices=SETTINGS, default="default")
    parser.add_argument("--jobs", type=int, default=2, help="methods trained side by side (default 2)")
    parser.add_argument("--methods", nargs="*", help="a subset of method names, e.g. 'BiDSM N=5' DSM")
    parser.add_argument("--aggregate-only", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for runs/ and the results (default: here)")
    args = parser.parse_args()
    setting = SETTINGS[args.setting]
    runs_dir = args.out / "runs" / args.setting
    methods = [m for m in METHODS if not args.methods or m.name in args.methods]
    unknown = set(args.methods or ()) - {m.name for m in METHODS}
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {[m.name for m in METHODS]}")
    seconds = None
    if not args.aggregate_only:
        print(f"checkerboard study, setting {args.setting}: {len(methods)} methods x {len(setting['seeds'])} seeds")
        named = [Method(directory_name(m), m.overrides) for m in methods]
        seconds = launch_ensembles(named, setting["common"] + ALWAYS, setting["seeds"], runs_dir, args.jobs)
    command = "python experiments/checkerboard/study.py " + " ".join(sys.argv[1:])
    print(f"wrote {aggregate(args.setting, args.out, command.strip(), seconds)}")


if __name__ == "__main__":
    main()
