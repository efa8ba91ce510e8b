"""BiSM's N-K study and VaGES's L-K grid on a GRBM, with BiSM's gradient bias against the counts.

    python experiments/nk_study/study.py --setting quick                # the whole pipeline in about a minute
    python experiments/nk_study/study.py --setting short                # 5k steps per run
    python experiments/nk_study/study.py                                # 20k steps per run
    python experiments/nk_study/study.py --study vages --setting short  # VaGES-DSM over L x K, 5k steps per run

Data: Frey Face (GRBM 560->400, DSM sigma 0.3, Adam lr 2e-4, docs/methods.md §7) when data/frey_rawface.mat exists,
otherwise scikit-learn's digits (GRBM 64->64, same objective).

``--study bism`` (default) trains BiDSM over every (K, N) in {0,1,5,10}^2 with Hydra multirun; the table holds each
run's test log-likelihood (AIS). The figure is the BiSM paper's Figure 1: at the final checkpoint of the K=5, N=5
run, BiSM's energy-gradient bias against the exact-score DSM gradient for every (K, N), each from the same
posterior weights and optimizer state, over --repeats noise and posterior draws.

``--study vages`` trains VaGES-DSM over L = n_particles in {2,4,6,8,10} x K = n_lower_steps in {1..5} (the VaGES
paper's Frey-Face grid); its tables hold each run's test log-likelihood and milliseconds per step, and VaGES's
gradient bias against the exact-score DSM gradient for every (L, K) at the final L=2, K=5 checkpoint (as the BiSM
study's figure does for (K, N)); its figure plots the three against L.
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
from eblvm.assemble import instantiate_node, rebuild  # noqa: E402
from eblvm.atomic import write_text  # noqa: E402
from eblvm.evaluation.plots import save_figure  # noqa: E402
from eblvm.evaluation.posterior import gradient_bias  # noqa: E402
from eblvm.studies import ROOT, Method, code_version, collect, launch, provenance  # noqa: E402

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
# The VaGES grid: L = n_particles (columns) by K = n_lower_steps (rows); the quick setting runs a corner of it.
VAGES_PARTICLES = {"quick": (2, 4), "short": (2, 4, 6, 8, 10), "default": (2, 4, 6, 8, 10)}
VAGES_LOWER_STEPS = {"quick": (1, 2), "short": (1, 2, 3, 4, 5), "default": (1, 2, 3, 4, 5)}


def data_overrides() -> tuple[str, ...]:
    if FREY.is_file():
        return ("data=freyface", "model.h_dim=400", "objective.sigma=0.3", "optim.lr=2e-4")
    return ("data=digits", "model.h_dim=64", "objective.sigma=0.3", "optim.lr=2e-4")


def split_grid(
    name: str,
    objective: str,
    split: tuple[str, tuple[int, ...]],
    rest: tuple[str, tuple[int, ...]],
    subdir: str,
    jobs: int,
    fixed_cost: float,
) -> list[Method]:
    """A two-way grid of integer settings as ``jobs`` multiruns of about equal cost: the values of the ``split``
    key are dealt out largest first, each to the cheapest queue so far, and each multirun sweeps all of ``rest``'s
    values; ``subdir`` names each run's folder. A run's cost is taken as ``fixed_cost + value``, in units of what
    one more of the split setting costs per step (averaged over ``rest``'s values)."""
    (split_key, split_values), (rest_key, rest_values) = split, rest
    queues: list[list[int]] = [[] for _ in range(jobs)]
    for value in sorted(split_values, reverse=True):
        min(queues, key=lambda queue: sum(fixed_cost + other for other in queue)).append(value)
    return [
        Method(
            f"{name}{'_'.join(map(str, sorted(queue)))}",
            (
                f"objective={objective}",
                *data_overrides(),
                f"objective.{split_key}={','.join(map(str, sorted(queue)))}",
                f"objective.{rest_key}={','.join(map(str, rest_values))}",
                f"hydra.sweep.subdir={subdir}",
            ),
        )  # fmt: skip
        for queue in queues
        if queue
    ]


def grid_methods(jobs: int) -> list[Method]:
    """BiDSM's (K, N) grid, the K values dealt out over the ``jobs`` multiruns."""
    subdir = "K${objective.n_lower_steps}_N${objective.n_unroll}"
    # The 20k-step default run's ms per step was about 2.0 + 0.7·K + 0.96·N, so a run (N averaged over the grid)
    # costs about 8 + K lower steps' worth.
    return split_grid("grid_K", "bism", ("n_lower_steps", COUNTS), ("n_unroll", COUNTS), subdir, jobs, fixed_cost=8)


def vages_methods(setting: str, jobs: int) -> list[Method]:
    """VaGES-DSM's (L, K) grid, the L values dealt out over the ``jobs`` multiruns."""
    subdir = "L${objective.n_particles}_K${objective.n_lower_steps}"
    split, rest = ("n_particles", VAGES_PARTICLES[setting]), ("n_lower_steps", VAGES_LOWER_STEPS[setting])
    # The short run's ms per step (K averaged) was about 21.6 + 1.8·L, so a run costs about 12 + L particles' worth.
    return split_grid("vages_L", "vages", split, rest, subdir, jobs, fixed_cost=12)


def restart_point(run_dir: Path):
    """A run's final weights, its posterior optimizer restored from the checkpoint, and the gradient-bias batch."""
    trained = rebuild(run_dir / "checkpoints" / "last.ckpt")
    optimizer = torch.optim.Adam(trained.posterior.parameters())
    optimizer.load_state_dict(trained.checkpoint["optimizer_states"][1])
    return trained, optimizer, trained.datamodule.splits.test[: trained.parts.evaluation.gradient_bias_batch]


def bias_grid(run_dir: Path, repeats: int) -> dict[tuple[int, int], object]:
    """Gradient bias for every (K, N) from one run's final weights and posterior-optimizer state."""
    trained, optimizer, v = restart_point(run_dir)
    model, posterior, objective = trained.model, trained.posterior, trained.parts.objective
    return {
        (k, n): gradient_bias(model, posterior, optimizer, objective, v, repeats, n_lower_steps=k, n_unroll=n)
        for k in COUNTS
        for n in COUNTS
    }


def vages_bias_grid(run_dir: Path, particles: tuple[int, ...], lower_steps: tuple[int, ...], repeats: int) -> dict:
    """VaGES's gradient bias for every (L, K) from one run's final weights and posterior-optimizer state: the
    objective rebuilt from the run's config with ``n_particles = L``, q restarted for each cell."""
    trained, optimizer, v = restart_point(run_dir)
    model, posterior = trained.model, trained.posterior
    biases = {}
    for n in particles:
        node = trained.config.objective.copy()
        node.n_particles = n
        objective = instantiate_node("objective", node)
        for k in lower_steps:
            biases[n, k] = gradient_bias(model, posterior, optimizer, objective, v, repeats, n_lower_steps=k)
    return biases


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


def bism_study(args: argparse.Namespace, runs_dir: Path, suffix: str) -> tuple[list[dict], str, list[Path]]:
    """BiDSM's (K, N) grid: its log-likelihood table and the gradient bias at the K=5, N=5 run's final checkpoint."""
    runs = {(r["config"]["objective"]["n_lower_steps"], r["config"]["objective"]["n_unroll"]): r
            for method_dir in sorted(runs_dir.glob("grid*")) for r in collect(method_dir)}  # fmt: skip
    biases = bias_grid(Path(runs[REFERENCE]["run_dir"]), args.repeats)
    figure = plot_bias(biases, args.out / f"gradient_bias{suffix}.png")
    header = table_header("K \\ N", COUNTS)
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
    exact_norm = biases[REFERENCE].exact_norm
    any_run = next(iter(runs.values()))
    text = (
        f"# N-K study ({args.setting}): {data_name(any_run)}, GRBM {any_run['config']['model']['h_dim']} hidden "
        f"units, BiDSM\n\nTest log-likelihood (nats per point, {any_run['log_z']} log Z) by K = n_lower_steps "
        "(rows) and N = n_unroll (columns):\n\n" + header + ll_rows + "\n\n"
        f"Gradient bias ‖E[g_BiSM] − ∇J‖ ± standard error at the final K=5, N=5 checkpoint, {args.repeats} draws "
        f"per cell (‖∇J‖ = {exact_norm:.3f}, so divide by it for the relative bias):\n\n" + header + bias_rows + "\n\n"
    )
    return list(runs.values()), text, [figure]


def vages_study(args: argparse.Namespace, runs_dir: Path, suffix: str) -> tuple[list[dict], str, list[Path]]:
    """VaGES-DSM's (L, K) grid: tables of test log-likelihood, final gradient bias and time per step, and a figure
    of the three against L."""
    particles, lower_steps = VAGES_PARTICLES[args.setting], VAGES_LOWER_STEPS[args.setting]
    runs = {(r["config"]["objective"]["n_particles"], r["config"]["objective"]["n_lower_steps"]): r
            for method_dir in sorted(runs_dir.glob("vages_L*")) for r in collect(method_dir)}  # fmt: skip
    header = table_header("K \\ L", particles)

    def rows(cell) -> str:
        return "\n".join(
            f"| {k} | " + " | ".join(cell(runs[n, k], n, k) if (n, k) in runs else "" for n in particles) + " |"
            for k in lower_steps
        )

    reference = (particles[0], lower_steps[-1])
    biases = vages_bias_grid(Path(runs[reference]["run_dir"]), particles, lower_steps, args.repeats)
    exact_norm = biases[reference].exact_norm

    any_run = next(iter(runs.values()))
    text = (
        f"# L-K grid ({args.setting}): {data_name(any_run)}, GRBM {any_run['config']['model']['h_dim']} hidden "
        f"units, VaGES-DSM σ {any_run['config']['objective']['sigma']}\n\n"
        f"Test log-likelihood (nats per point, {any_run['log_z']} log Z) by K = n_lower_steps (rows) and L = "
        "n_particles in each of the three particle sets (columns):\n\n"
        + header + rows(lambda run, n, k: job_cells(run, LOG_LIKELIHOOD)[0]) + "\n\n"
        f"Gradient bias ‖E[g_VaGES] − ∇J‖ ± standard error at the final L={reference[0]}, K={reference[1]} "
        f"checkpoint, {args.repeats} draws per cell, q restarted from that checkpoint for each (L, K) "
        f"(‖∇J‖ = {exact_norm:.3f}; J is the same DSM loss with the exact score):\n\n"
        + header
        + rows(lambda run, n, k: f"{biases[n, k].bias:.3f} ± {biases[n, k].stderr:.3f}")
        + "\n\nMilliseconds per training step (validations included):\n\n"
        + header + rows(lambda run, n, k: f"{run['ms_per_step']:.1f}") + "\n\n"
        f"BiDSM's (K, N) grid on the same data and objective is in `results{suffix}.md` (`--study bism`).\n\n"
    )  # fmt: skip
    figure = plot_vages(runs, biases, particles, lower_steps, args.out / f"vages_grid{suffix}.png")
    return list(runs.values()), text, [figure]


def plot_vages(runs: dict, biases: dict, particles: tuple[int, ...], lower_steps: tuple[int, ...], path: Path) -> Path:
    """Test log-likelihood, gradient bias (at the common checkpoint) and ms per step against L, one line per K."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = (
        ("test log-likelihood (nats)", lambda n, k: runs[n, k]["test/log_likelihood"], None),
        ("gradient bias ‖E[g_VaGES] − ∇J‖", lambda n, k: biases[n, k].bias, lambda n, k: biases[n, k].stderr),
        ("ms / step", lambda n, k: runs[n, k]["ms_per_step"], None),
    )
    for ax, (label, value, error) in zip(axes, panels, strict=True):
        for k in lower_steps:
            present = [n for n in particles if (n, k) in runs]
            errors = [error(n, k) for n in present] if error else None
            ax.errorbar(present, [value(n, k) for n in present], errors, marker="o", capsize=3, label=f"K={k}")
        ax.set(xlabel="L (particles per set)", ylabel=label, xticks=particles)
        ax.legend()
    fig.suptitle("VaGES-DSM over L and K")
    return save_figure(fig, path)


def table_header(corner: str, columns: tuple[int, ...]) -> str:
    return f"| {corner} | " + " | ".join(map(str, columns)) + " |\n|---|" + "---|" * len(columns) + "\n"


def data_name(run: dict) -> str:
    return run["config"]["data"]["splits"]["_target_"].rsplit(".", 1)[-1]


STUDIES = {"bism": ("results", bism_study), "vages": ("results_vages", vages_study)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=STUDIES, default="bism", help="BiDSM's K x N grid or VaGES-DSM's L x K")
    parser.add_argument("--setting", choices=SETTINGS, default="default")
    parser.add_argument("--repeats", type=int, default=100, help="draws per gradient-bias cell")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for runs/ and the results (default: here)")
    parser.add_argument("--jobs", type=int, default=1, help="multiruns side by side (each gets cores / jobs threads)")
    parser.add_argument("--aggregate-only", action="store_true")
    args = parser.parse_args()
    runs_dir = args.out / "runs" / args.setting
    seconds, version = None, code_version()
    if not args.aggregate_only:
        common = (*SETTINGS[args.setting], "logger=csv", "callbacks.progress.refresh_rate=0")
        methods = grid_methods(args.jobs) if args.study == "bism" else vages_methods(args.setting, args.jobs)
        seconds = launch(methods, common, seeds=(1,), runs_dir=runs_dir, jobs=args.jobs)
    stem, study = STUDIES[args.study]
    suffix = "" if args.setting == "default" else f"_{args.setting}"
    runs, text, figures = study(args, runs_dir, suffix)
    command = "python experiments/nk_study/study.py " + " ".join(sys.argv[1:])
    results = args.out / f"{stem}{suffix}.md"
    write_text(
        results,
        text
        + provenance(command.strip(), version, seconds, sum(r["train_seconds"] for r in runs))
        + "".join(f"\n![{figure.stem}]({figure.name})\n" for figure in figures),
    )
    print(f"wrote {results} and {', '.join(map(str, figures))}")


if __name__ == "__main__":
    main()
