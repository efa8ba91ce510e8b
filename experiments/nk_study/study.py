"""BiSM's N-K study: n_lower_steps (K) x n_unroll (N) with BiDSM, and the gradient bias against both counts.

    python experiments/nk_study/study.py --setting quick   # the whole pipeline in about a minute
    python experiments/nk_study/study.py --setting short   # 5k steps per run: about 30 minutes on 2 CPU cores
    python experiments/nk_study/study.py                   # 20k steps per run

Data: Frey Face (GRBM 560->400, BiDSM sigma 0.3, Adam lr 2e-4, docs/methods.md §7) when data/frey_rawface.mat exists,
otherwise scikit-learn's digits (GRBM 64->64, same objective). Every (K, N) in {0,1,5,10}^2 is trained with
Hydra multirun; the table holds each run's test log-likelihood (AIS). The figure is the paper's Figure 1: at the
final checkpoint of the K=5, N=5 run, BiSM's energy-gradient bias against the exact-score DSM gradient for every
(K, N), each from the same posterior weights and optimizer state, over --repeats noise and posterior draws.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from eblvm.aggregate import METRICS, job_cells  # noqa: E402
from eblvm.assemble import rebuild  # noqa: E402
from eblvm.evaluation.plots import save_figure  # noqa: E402
from eblvm.evaluation.posterior import gradient_bias  # noqa: E402
from eblvm.studies import ROOT, Method, collect, launch, provenance  # noqa: E402

COUNTS = (0, 1, 5, 10)
LOG_LIKELIHOOD = [metric for metric in METRICS if metric[0] == "test/log_likelihood"]  # with its AIS stderr
REFERENCE = (5, 5)
FREY = ROOT / "data" / "frey_rawface.mat"
SETTINGS = {
    "quick": ("trainer.max_steps=10", "trainer.val_check_interval=5", "evaluation.ais_temperatures=50",
              "evaluation.ais_chains=20", "evaluation.gradient_bias_repeats=2", "sampling.gibbs_sweeps=5",
              "sampling.n_samples=16"),
    "short": ("trainer.max_steps=5000", "trainer.val_check_interval=1000"),
    "default": ("trainer.max_steps=20000", "trainer.val_check_interval=2000"),
}  # fmt: skip


def data_overrides() -> tuple[str, ...]:
    if FREY.is_file():
        return ("data=freyface", "model.h_dim=400", "objective.sigma=0.3", "optim.lr=2e-4")
    return ("data=digits", "model.h_dim=64", "objective.sigma=0.3", "optim.lr=2e-4")


def grid_methods(jobs: int) -> list[Method]:
    """The (K, N) grid as ``jobs`` multiruns of about equal cost: K values are dealt out largest first."""
    queues: list[list[int]] = [[] for _ in range(jobs)]
    for k in sorted(COUNTS, reverse=True):
        min(queues, key=lambda queue: sum(1 + n for n in queue)).append(k)
    counts = ",".join(map(str, COUNTS))
    return [
        Method(
            f"grid_K{'_'.join(map(str, sorted(queue)))}",
            (
                "objective=bism",
                *data_overrides(),
                f"objective.n_lower_steps={','.join(map(str, sorted(queue)))}",
                f"objective.n_unroll={counts}",
                "hydra.sweep.subdir=K${objective.n_lower_steps}_N${objective.n_unroll}",
            ),
        )  # fmt: skip
        for queue in queues
        if queue
    ]


def bias_grid(run_dir: Path, repeats: int) -> dict[tuple[int, int], object]:
    """Gradient bias for every (K, N) from one run's final weights and posterior-optimizer state."""
    trained = rebuild(run_dir / "checkpoints" / "last.ckpt")
    model, posterior, objective = trained.model, trained.posterior, trained.parts.objective
    optimizer = torch.optim.Adam(posterior.parameters())
    optimizer.load_state_dict(trained.checkpoint["optimizer_states"][1])
    v = trained.datamodule.splits.test[: trained.parts.evaluation.gradient_bias_batch]
    return {
        (k, n): gradient_bias(model, posterior, optimizer, objective, v, repeats, n_lower_steps=k, n_unroll=n)
        for k in COUNTS
        for n in COUNTS
    }


def plot_bias(biases: dict, path: Path) -> Path:
    fig, (by_n, by_k) = plt.subplots(1, 2, figsize=(10, 4))
    for k in COUNTS:
        values = [biases[k, n] for n in COUNTS]
        by_n.errorbar(COUNTS, [b.bias for b in values], [b.stderr for b in values], marker="o", capsize=3,
                      label=f"K={k}")  # fmt: skip
    for n in COUNTS:
        values = [biases[k, n] for k in COUNTS]
        by_k.errorbar(COUNTS, [b.bias for b in values], [b.stderr for b in values], marker="o", capsize=3,
                      label=f"N={n}")  # fmt: skip
    by_n.set(xlabel="N (n_unroll)", ylabel="gradient bias ‖E[g_BiSM] − ∇J‖", title="against N")
    by_k.set(xlabel="K (n_lower_steps)", title="against K")
    for ax in (by_n, by_k):
        ax.legend()
    return save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=SETTINGS, default="default")
    parser.add_argument("--repeats", type=int, default=100, help="noise and posterior draws per (K, N)")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for runs/ and the results (default: here)")
    parser.add_argument("--jobs", type=int, default=1, help="multiruns side by side (each gets cores / jobs threads)")
    parser.add_argument("--aggregate-only", action="store_true")
    args = parser.parse_args()
    runs_dir = args.out / "runs" / args.setting
    seconds = None
    if not args.aggregate_only:
        common = (*SETTINGS[args.setting], "logger=csv", "callbacks.progress.refresh_rate=0")
        seconds = launch(grid_methods(args.jobs), common, seeds=(1,), runs_dir=runs_dir, jobs=args.jobs)
    runs = {(r["config"]["objective"]["n_lower_steps"], r["config"]["objective"]["n_unroll"]): r
            for method_dir in sorted(runs_dir.glob("grid*")) for r in collect(method_dir)}  # fmt: skip
    biases = bias_grid(Path(runs[REFERENCE]["run_dir"]), args.repeats)
    suffix = "" if args.setting == "default" else f"_{args.setting}"
    figure = plot_bias(biases, args.out / f"gradient_bias{suffix}.png")
    header = "| K \\ N | " + " | ".join(map(str, COUNTS)) + " |\n|---|" + "---|" * len(COUNTS) + "\n"
    ll_rows = "\n".join(
        f"| {k} | "
        + " | ".join(job_cells(runs[k, n], LOG_LIKELIHOOD)[0] if (k, n) in runs else "" for n in COUNTS)
        + " |"
        for k in COUNTS
    )
    bias_rows = "\n".join(
        f"| {k} | " + " | ".join(f"{biases[k, n].bias:.3f} ± {biases[k, n].stderr:.3f}" for n in COUNTS) + " |"
        for k in COUNTS
    )
    exact_norm = next(b.bias / b.relative_bias for b in biases.values() if b.relative_bias > 0)
    any_run = next(iter(runs.values()))
    command = "python experiments/nk_study/study.py " + " ".join(sys.argv[1:])
    results = args.out / f"results{suffix}.md"
    results.write_text(
        f"# N-K study ({args.setting}): {any_run['config']['data']['splits']['_target_'].rsplit('.', 1)[-1]}, "
        f"GRBM {any_run['config']['model']['h_dim']} hidden units, BiDSM\n\n"
        f"Test log-likelihood (nats per point, {any_run['log_z']} log Z) by K = n_lower_steps (rows) and "
        "N = n_unroll (columns):\n\n" + header + ll_rows + "\n\n"
        f"Gradient bias ‖E[g_BiSM] − ∇J‖ ± standard error at the final K=5, N=5 checkpoint, {args.repeats} draws "
        f"per cell (‖∇J‖ = {exact_norm:.3f}, so divide by it for the relative bias):\n\n"
        + header
        + bias_rows
        + "\n\n"
        + provenance(
            command.strip(), seconds if seconds is not None else sum(r["train_seconds"] for r in runs.values())
        )
        + f"\n![gradient bias]({figure.name})\n"
    )
    print(f"wrote {results} and {figure}")


if __name__ == "__main__":
    main()
