"""The VaGES paper's Fisher-divergence benchmark (docs/methods.md §4.3): estimated against exact values.

    python experiments/fisher_estimation/benchmark.py                  # d = 200, perturbations 0 … 1 (both scores)
    python experiments/fisher_estimation/benchmark.py --dims 200 500   # the paper's two dimensions
    python experiments/fisher_estimation/benchmark.py --setting quick  # the pipeline in seconds (d = 10, 300 steps)
    python experiments/fisher_estimation/benchmark.py --scores vaes --levels 0 0.4  # some levels only
    python experiments/fisher_estimation/benchmark.py --scores exact --fit regression  # the critic's own limit

Data: 20,000 draws of N(0, I_d), split 16k/2k/2k (train/val/test: the critic reported is the one with the best
validation objective, checked every 500 steps from its start at f = 0). For each perturbation level p, a GRBM with
v_dim = h_dim = d, σ = 1 and W, b, c = p·N(0, 1) (at p = 0 it is the data distribution); its true Fisher divergence
from the data is ``½ mean_test ‖−v − s_θ(v)‖²``. The critic is trained with the exact score and with VaES through a
relaxed-Bernoulli q (linear logits, temperature 0.1, L = 1, 5 ELBO steps per critic step). A level passes when
|estimate − truth| ≤ 2 standard errors + 5 % of the truth. Writes results.md and fisher_estimation.png beside
this file; a run with other options adds them to both names (``--scores exact --fit regression`` writes
results_exact_regression.md).
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from eblvm.atomic import write_text  # noqa: E402
from eblvm.evaluation.plots import save_figure  # noqa: E402
from eblvm.fisher import (  # noqa: E402
    SCHEDULES,
    FisherSettings,
    benchmark_case,
    estimate_fisher,
    true_fisher_to_standard_normal,
)
from eblvm.posteriors import RelaxedBernoulliPosterior  # noqa: E402
from eblvm.studies import code_version, provenance, threads_per_job  # noqa: E402

LEVELS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
SETTINGS = {
    "default": {"n_rows": 20000, "steps": 20000, "levels": LEVELS},
    "quick": {"n_rows": 2000, "steps": 300, "levels": (0.0, 0.5)},
}
SCORES = ("exact", "vaes")
FITS = ("bound", "regression")


def passes(estimate, truth) -> bool:
    return abs(estimate.value - truth.value) <= 2 * estimate.stderr + 0.05 * abs(truth.value)


def run(dim: int, level: float, score: str, n_rows: int, settings: FisherSettings, fit: str, threads: int,
        progress: bool):  # fmt: skip
    """One estimate with ``threads`` threads: (estimate, truth, seconds). ``fit="regression"`` fits the critic
    onto the optimal critic ``s_θ + v`` (the data's score is ``−v``) instead of through the bound."""
    torch.set_num_threads(threads)
    case = benchmark_case(dim, level, n_rows, settings.seed)
    torch.manual_seed(settings.seed)
    posterior = RelaxedBernoulliPosterior(dim, dim, temperature=0.1, net="linear") if score == "vaes" else None
    start = time.perf_counter()
    data_score = (lambda v: -v) if fit == "regression" else None
    estimate = estimate_fisher(
        case.model, case.train, case.test, score, posterior, settings, progress, case.val, data_score
    )
    return estimate, true_fisher_to_standard_normal(case.model, case.test), time.perf_counter() - start


def results_suffix(args: argparse.Namespace) -> str:
    """What the file names add after ``results``/``fisher_estimation``: every option that differs from the default
    run, so that no run writes over another's results (``results.md`` is the default run's)."""
    parts = [
        args.setting if args.setting != "default" else "",
        "-".join(sorted(args.scores)) if set(args.scores) != set(SCORES) else "",
        args.fit if args.fit != "bound" else "",
        "d" + "-".join(map(str, args.dims)) if args.dims else "",
        "p" + "-".join(f"{level:g}" for level in args.levels) if args.levels else "",
        f"lr{args.lr:g}" if args.lr != FisherSettings.lr else "",
        args.schedule if args.schedule != FisherSettings.schedule else "",
        f"w{args.critic_width}" if args.critic_width else "",
        f"seed{args.seed}" if args.seed != FisherSettings.seed else "",
    ]
    return "".join(f"_{part}" for part in parts if part)


def plot(results: list[dict], path: Path, fit: str) -> Path:
    dims = sorted({row["dim"] for row in results})
    fig, axes = plt.subplots(1, len(dims), figsize=(5.5 * len(dims), 4.2), squeeze=False)
    for ax, dim in zip(axes[0], dims, strict=True):
        rows = [row for row in results if row["dim"] == dim]
        levels = sorted({row["level"] for row in rows})
        truth = [next(r["truth"].value for r in rows if r["level"] == level) for level in levels]
        ax.plot(levels, truth, "k-", marker="s", label="true")
        for score, style in zip(SCORES, ("o--", "^:"), strict=True):
            ours = sorted((r for r in rows if r["score"] == score), key=lambda r: r["level"])
            if ours:
                ax.errorbar([r["level"] for r in ours], [r["estimate"].value for r in ours],
                            [2 * r["estimate"].stderr for r in ours], fmt=style, capsize=3,
                            label=f"estimated ({'exact score' if score == 'exact' else 'VaES'}"
                                  f"{', critic by regression onto f*' if fit == 'regression' else ''})")  # fmt: skip
        ax.set(xlabel="perturbation p", ylabel="Fisher divergence", title=f"GRBM, d = {dim}", yscale="symlog")
        ax.legend()
    return save_figure(fig, path)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=SETTINGS, default="default")
    parser.add_argument("--dims", type=int, nargs="+", help="dimensions (default 200; quick: 10)")
    parser.add_argument("--scores", nargs="+", choices=SCORES, default=list(SCORES))
    parser.add_argument("--levels", type=float, nargs="+", help="perturbations p (default: the setting's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=FisherSettings.lr, help="the critic's Adam rate")
    parser.add_argument("--schedule", choices=SCHEDULES, default=FisherSettings.schedule)
    parser.add_argument("--critic-width", type=int, help="the critic's hidden width (default d, the paper's)")
    parser.add_argument(
        "--fit",
        choices=FITS,
        default="bound",
        help="how the critic is trained: through the bound (the estimator), or by regression onto the optimal "
        "critic, which the benchmark knows (a diagnostic of how well this critic can be learned; exact score only)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="estimates computed side by side (default 2)")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    if args.fit == "regression" and "vaes" in args.scores:
        parser.error("--fit regression needs the exact score: add --scores exact")
    return args


def main() -> None:
    args = parse_arguments()
    setting = SETTINGS[args.setting]
    dims = args.dims or ([10] if args.setting == "quick" else [200])
    args.out.mkdir(parents=True, exist_ok=True)
    cases = [(dim, level, score) for dim in dims for level in args.levels or setting["levels"] for score in args.scores]
    cases.sort(key=lambda case: (-case[0], case[2] != "vaes"))  # the longest first, so the jobs end together
    settings = FisherSettings(
        steps=setting["steps"], seed=args.seed, lr=args.lr, schedule=args.schedule, critic_width=args.critic_width
    )
    start, results, version = time.perf_counter(), [], code_version()
    print(f"{len(cases)} estimates, {args.jobs} side by side, {setting['steps']} critic steps each", flush=True)
    print(f"{'d':>4} {'p':>4} {'score':>6} {'estimate':>22} {'true':>22} {'pass':>5} {'seconds':>8}")
    # fresh processes (spawn), not forks of this one
    threads = threads_per_job(args.jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = [
            pool.submit(run, dim, level, score, setting["n_rows"], settings, args.fit, threads, args.jobs == 1)
            for dim, level, score in cases
        ]
        for (dim, level, score), future in zip(cases, futures, strict=True):
            estimate, truth, seconds = future.result()
            ok = passes(estimate, truth)
            results.append({"dim": dim, "level": level, "score": score, "estimate": estimate, "truth": truth,
                            "passes": ok, "seconds": seconds})  # fmt: skip
            print(f"{dim:>4} {level:>4} {score:>6} {estimate.value:>12.3f} ± {estimate.stderr:<7.3f} "
                  f"{truth.value:>12.3f} ± {truth.stderr:<7.3f} {'yes' if ok else 'NO':>5} {seconds:>8.1f}",
                  flush=True)  # fmt: skip
    results.sort(key=lambda r: (r["dim"], r["level"], r["score"]))
    suffix = results_suffix(args)
    figure = plot(results, args.out / f"fisher_estimation{suffix}.png", args.fit)
    command = "python experiments/fisher_estimation/benchmark.py " + " ".join(sys.argv[1:])
    lines = [
        f"# Fisher-divergence estimation on the perturbed GRBM ({args.setting})\n",
        "Test objective of the critic with the best validation objective (mean ± standard error over test rows; "
        "its step in the last column but one) against the exact Fisher "
        "divergence (mean ± standard error of the same test rows); pass: |estimate − truth| ≤ 2 s.e. + 5 % of the "
        f"truth. {setting['steps']} critic steps (Adam {settings.lr}, {settings.schedule}, hidden width "
        f"{settings.critic_width or 'd'}), {setting['n_rows']} rows. "
        + (
            "The critic was trained through the bound."
            if args.fit == "bound"
            else "Diagnostic: the critic was trained by regression onto the optimal critic s_θ + v (the data's "
            "score is −v), not through the bound; it is checked and reported through the bound."
        )
        + "\n",
        "| d | p | score | estimate | true | pass | critic step | seconds |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['dim']} | {r['level']} | {r['score']} | {r['estimate'].value:.3f} ± {r['estimate'].stderr:.3f} | "
            f"{r['truth'].value:.3f} ± {r['truth'].stderr:.3f} | {'yes' if r['passes'] else '**no**'} | "
            f"{r['estimate'].critic_step} | {r['seconds']:.0f} |"
            for r in results
        ),  # fmt: skip
        "",
        provenance(command.strip(), version, time.perf_counter() - start),
        f"\n![estimated against true]({figure.name})\n",
    ]
    results_file = args.out / f"results{suffix}.md"
    write_text(results_file, "\n".join(lines))
    print(f"wrote {results_file}")


if __name__ == "__main__":
    main()
