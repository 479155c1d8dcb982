"""Is there a cheap score that ranks channel-pruned configs like the 2-epoch fine-tune?

Channel configs of a dense VGG, repaired onto a MACs budget (as a study does),
are scored on the validation split by (``neighbours`` computes ``no_recal``,
``bn4``, ``ft0.25`` and the two fine-tunes only):

* ``no_recal``: accuracy right after pruning;
* ``bn4`` / ``bn32``: accuracy after recomputing BatchNorm statistics on 4 or
  32 training batches of 128 (EagleEye's adaptive BN; ``bn32`` is most of an
  epoch of forward passes); ``bn32_loss`` / ``bn32_kl``: the same model's
  negated validation cross-entropy and negated KL divergence from the dense
  model's outputs (an output-reconstruction score: continuous where accuracy
  saturates at chance);
* ``ft0.1`` / ``ft0.25``: accuracy after a short fine-tune of its own (that
  fraction of an epoch's images, one cosine schedule, BN recalibrated before
  and after), the study's recipe otherwise;
* ``full``: what a trial does: BN recalibration (4 batches), then the study's
  2-epoch fine-tune (``autoprune.baseline.finetune``, seed 0). ``full_b`` is
  the same fine-tune with data-order seed 1: Spearman(full, full_b) is the
  ceiling any score can reach against one noisy fine-tune.

Two measurements (``--mode``), each a section of
``benchmarks/results/cheap-scores-channel.json`` (rows in
``cheap-scores-channel-<mode>.csv``):

* ``random``: random configs per budget; Spearman correlations within each
  budget (configs a screen compares share a budget; across budgets the budget
  alone ranks them), with a 95% bootstrap interval over configs;
* ``neighbours``: what a screen compares: a proposal and perturbations of it
  (``SearchSpace.perturb``) on one budget; for each score, the fine-tuned
  accuracy of the candidate it would pick minus the proposal's.

``--screen-cost`` also runs a small fine-grained subset study with
``[fidelity] screen = 8`` and records the seconds per screened candidate
against one fine-tune.

    OMP_NUM_THREADS=1 python benchmarks/cheap_scores.py --mode random --configs 12 --targets 0.4
    OMP_NUM_THREADS=1 python benchmarks/cheap_scores.py --mode neighbours --targets 0.4 --proposals 4 \
        --candidates 4 --screen-cost
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autoprune import budget  # noqa: E402
from autoprune.config import load_config  # noqa: E402
from autoprune.data import Data, Split, batches  # noqa: E402
from autoprune.model import load_checkpoint  # noqa: E402
from autoprune.baseline import finetune  # noqa: E402
from autoprune.plan import CHANNEL_LAYERS, PruningPlan, prune  # noqa: E402
from autoprune.train import TrainConfig, evaluate, fit, recalibrate_bn  # noqa: E402

STUDY = REPO / "studies" / "subset-channel.toml"
RESULTS = REPO / "benchmarks" / "results"
SCORES = ["no_recal", "bn4", "bn32", "bn32_loss", "bn32_kl", "ft0.1", "ft0.25", "full_b"]


@torch.no_grad()
def val_logits(model, split: Split) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x).float() for x, _ in batches(split, 128)])


def random_plan(channels, rng: random.Random, target: float) -> PruningPlan:
    prefs = {n: rng.random() for n in CHANNEL_LAYERS}
    ratios = budget.channel_budget(channels, target, "macs", prefs, upper={n: 0.85 for n in prefs})
    return PruningPlan("channel", ratios, "", tuple(channels))


def short_finetune(model, data: Data, recipe: TrainConfig, fraction: float, seed: int) -> float:
    """A fine-tune on ``fraction`` of the training images (own cosine schedule); val accuracy."""
    n = max(recipe.batch_size, math.ceil(fraction * len(data.train)))
    idx = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))[:n]
    part = Data(data.spec, Split(data.train.x[idx], data.train.y[idx]), data.val, data.test)
    recalibrate_bn(model, data.train, 4, 128, seed)
    fit(model, part, TrainConfig(**{**recipe.to_dict(), "epochs": 1, "seed": seed}), progress=False)
    recalibrate_bn(model, data.train, 4, 128, seed)  # 4-9 steps at momentum 0.1 leave the dense stats
    return evaluate(model, data.val)


def score_config(plan, dense, dense_logits, data, config, seed: int, scores=SCORES) -> dict:
    row, seconds = {}, {}
    base = prune(dense, plan).model
    row["no_recal"] = evaluate(base, data.val)
    for n_batches in (4, 32):
        if f"bn{n_batches}" not in scores:
            continue
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        recalibrate_bn(model, data.train, n_batches, 128, seed)
        row[f"bn{n_batches}"] = evaluate(model, data.val)
        seconds[f"bn{n_batches}"] = time.perf_counter() - t0
    if "bn32_kl" in scores:
        logits = val_logits(model, data.val)  # the bn32 model
        row["bn32_loss"] = -float(F.cross_entropy(logits, data.val.y))
        row["bn32_kl"] = -float(F.kl_div(F.log_softmax(logits, 1), F.log_softmax(dense_logits, 1),
                                         log_target=True, reduction="batchmean"))
    recipe = config.finetune_recipe()
    for fraction in (0.1, 0.25):
        if f"ft{fraction}" in scores:
            t0 = time.perf_counter()
            row[f"ft{fraction}"] = short_finetune(copy.deepcopy(base), data, recipe, fraction, seed)
            seconds[f"ft{fraction}"] = time.perf_counter() - t0
    for key, ft_seed in (("full", seed), ("full_b", seed + 1)):
        pruned = prune(dense, plan)
        t0 = time.perf_counter()
        recalibrate_bn(pruned.model, data.train, 4, 128, seed)  # as a trial does before its fine-tune
        history = finetune(pruned, dense, data, config, ft_seed)
        row[key] = history[-1]["val_accuracy"]
        seconds[key] = time.perf_counter() - t0
    row.update({f"seconds_{k}": v for k, v in seconds.items()})
    return row


def spearman_with_interval(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, n_boot: int = 2000) -> dict:
    rho = float(pd.Series(x).corr(pd.Series(y), method="spearman"))
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(x), len(x))
        if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
            boots.append(pd.Series(x[i]).rank().corr(pd.Series(y[i]).rank()))
    if not boots:  # too few configs to resample
        return {"spearman": round(rho, 3), "ci95": None}
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return {"spearman": round(rho, 3), "ci95": [round(float(lo), 3), round(float(hi), 3)]}


def screen_cost(checkpoint: Path, candidates: int, trials: int) -> dict:
    """Seconds per screened candidate vs one fine-tune, from a real fine-grained subset study."""
    import optuna
    from optuna.trial import TrialState

    from autoprune.search import run_search

    out = Path(tempfile.mkdtemp(prefix="cheap-scores-"))
    config = load_config(REPO / "studies" / "subset-fine-grained.toml", name="screen-cost", trials=trials,
                         out_dir=str(out), storage=f"sqlite:///{out / 'study.db'}")
    config.model.width, config.model.checkpoint = 0.125, str(checkpoint)
    config.priors.enabled = False  # no sensitivity scan: every trial is a sampled, screened one
    config.finetune.early_stop = False  # every trial runs the whole fine-tune it is compared with
    config.fidelity.screen = candidates
    run_search(config, progress=False)
    study = optuna.load_study(study_name="screen-cost", storage=config.storage_url)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    per_candidate = float(np.median([t.user_attrs["screen_seconds"] / len(t.user_attrs["screen_scores"])
                                     for t in done]))
    finetune_s = float(np.median([t.user_attrs["finetune_seconds"] for t in done]))
    return {"kind": "fine_grained", "size_fraction_cap": config.constraints.max_size_fraction,
            "candidates_per_trial": candidates, "trials": len(done),
            "seconds_per_candidate": round(per_candidate, 2), "finetune_seconds": round(finetune_s, 2),
            "candidate_cost_vs_finetune": round(per_candidate / finetune_s, 3)}


def random_configs(args, dense, dense_logits, data, config) -> dict:
    """Random configs per budget: does a cheap score rank them like the fine-tune?"""
    rng = random.Random(args.seed)
    rows = []
    targets = [float(t) for t in args.targets.split(",")]
    for target in targets:
        for i in range(args.configs):
            plan = random_plan(dense.channels, rng, target)
            rows.append({"target": target, "config": i, **score_config(plan, dense, dense_logits, data, config,
                                                                       args.seed), **ratio_columns(plan)})
            report(f"macs {target} {i + 1}/{args.configs}", rows[-1])
    df = pd.DataFrame(rows)
    df.to_csv(RESULTS / "cheap-scores-channel-random.csv", index=False)
    boot = np.random.default_rng(args.seed)
    per_budget = {}
    for target, g in df.groupby("target"):
        per_budget[str(target)] = {
            "configs": len(g),
            "full_val_accuracy_range": [round(g["full"].min(), 2), round(g["full"].max(), 2)],
            "spearman_vs_full": {s: spearman_with_interval(g[s].to_numpy(), g["full"].to_numpy(), boot)
                                 for s in SCORES},
            # Against the mean of two fine-tunes (less noise in the target); full_b is part of it, so left out.
            "spearman_vs_mean_of_two_finetunes": {
                s: round(float(g[s].corr((g["full"] + g["full_b"]) / 2, method="spearman")), 3)
                for s in SCORES if s != "full_b"},
        }
    med = df.filter(like="seconds_").median()
    return {
        "what": "random channel configs (uniform preferences, repaired onto each MACs budget); Spearman of each "
                "cheap score with the 2-epoch fine-tuned val accuracy within a budget, 95% bootstrap interval; "
                "full_b = the same fine-tune with another data-order seed (the noise ceiling)",
        "budgets_macs_fraction": targets,
        "per_budget": per_budget,
        "seconds_median": {k.removeprefix("seconds_"): round(float(v), 2) for k, v in med.items()},
        "cost_vs_full_finetune": {k.removeprefix("seconds_"): round(float(v / med["seconds_full"]), 3)
                                  for k, v in med.items()},
    }


def neighbour_configs(args, dense, dense_logits, data, config) -> dict:
    """What a screen compares: a proposal and perturbations of it (SearchSpace.perturb), on one budget."""
    from autoprune.space import SearchSpace

    target = float(args.targets.split(",")[0])
    space = SearchSpace.build("channel", dense.channels, {n: 0.85 for n in CHANNEL_LAYERS}, max_size_fraction=1.0,
                              max_macs_fraction=target)
    rng = random.Random(args.seed)
    rows = []
    scores = ["no_recal", "bn4", "ft0.25"]
    for g in range(args.proposals):
        proposal = space.repair({n: rng.random() for n in CHANNEL_LAYERS})[0]
        noise = np.random.default_rng([args.seed, g])
        group = [proposal] + [space.repair(space.perturb(proposal, noise, args.spread))[0]
                              for _ in range(args.candidates - 1)]
        for i, ratios in enumerate(group):
            plan = space.plan(ratios)
            rows.append({"group": g, "candidate": i, **score_config(plan, dense, dense_logits, data, config,
                                                                    args.seed, scores), **ratio_columns(plan)})
            report(f"group {g + 1}/{args.proposals} candidate {i + 1}/{args.candidates}", rows[-1])
    df = pd.DataFrame(rows)
    df.to_csv(RESULTS / "cheap-scores-channel-neighbours.csv", index=False)
    picks = {}
    for s in scores + ["full_b"]:
        # Per group: the full accuracy of the candidate this score would fine-tune, minus the proposal's.
        gains = [float(g["full"].iloc[int(np.argmax(g[s].to_numpy()))] - g["full"].iloc[0])
                 for _, g in df.groupby("group")]
        picks[s] = {"mean_gain_over_proposal": round(float(np.mean(gains)), 2), "gains": [round(x, 2) for x in gains]}
    best = [float(g["full"].max() - g["full"].iloc[0]) for _, g in df.groupby("group")]
    return {
        "what": f"{args.proposals} random proposals, each with {args.candidates - 1} perturbations "
                f"(SearchSpace.perturb, spread {args.spread}) repaired onto MACs {target}: what a screen of "
                f"{args.candidates} would pick by each score, and the fine-tuned val accuracy it gains over "
                f"the proposal (full_b: picking by a second fine-tune, i.e. the noise ceiling)",
        "spread": args.spread,
        "spearman_vs_full_within_group": {
            s: [round(float(g[s].corr(g["full"], method="spearman")), 3) for _, g in df.groupby("group")]
            for s in scores + ["full_b"]},
        "full_val_accuracy_range_within_group": [round(float(np.ptp(g["full"])), 2) for _, g in df.groupby("group")],
        "pick_by_score": picks,
        "best_possible_mean_gain": round(float(np.mean(best)), 2),
        "seconds_median": {k.removeprefix("seconds_"): round(float(v), 2)
                           for k, v in df.filter(like="seconds_").median().items()},
    }


def ratio_columns(plan) -> dict:
    return {f"ratio_{k}": v for k, v in plan.ratios.items()}


def report(label: str, row: dict) -> None:
    print(f"{label}: " + "  ".join(f"{k} {v:.2f}" for k, v in row.items() if k in SCORES + ["full"]),
          file=sys.stderr, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=Path("/work/cache/dense-w0.125.pt"))
    p.add_argument("--mode", choices=["random", "neighbours", "none"], default="random",
                   help="which channel measurement to (re)run; the others' sections in the JSON are kept")
    p.add_argument("--configs", type=int, default=12, help="random configs per budget")
    p.add_argument("--targets", default="0.4", help="MACs fractions of the budgets (neighbours: the first)")
    p.add_argument("--proposals", type=int, default=4, help="neighbours: proposals")
    p.add_argument("--candidates", type=int, default=4, help="neighbours: candidates per proposal, itself included")
    p.add_argument("--spread", type=float, default=0.25, help="neighbours: [fidelity] screen_spread")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--screen-cost", action="store_true", help="also time screening in a fine-grained study")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = RESULTS / "cheap-scores-channel.json"
    result = json.loads(out.read_text()) if out.is_file() else {}
    stamp = {"command": " ".join(["OMP_NUM_THREADS=1 python", "benchmarks/cheap_scores.py", *sys.argv[1:]]),
             "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
                        f"2 cores shared with other jobs",
             "torch": torch.__version__}
    if args.mode != "none":
        config = load_config(STUDY)
        data = config.load_data()
        dense = load_checkpoint(args.checkpoint)[0].eval()
        measure = random_configs if args.mode == "random" else neighbour_configs
        section = measure(args, dense, val_logits(dense, data.val), data, config)
        result["setup"] = {
            "recipe": {"epochs": config.finetune.epochs, "batch_size": config.finetune.batch_size,
                       "lr": config.finetune.lr, "criterion": "norm", "bn_recal_batch_size": 128},
            "dense_checkpoint": str(args.checkpoint), "dense_channels": list(dense.channels),
            "dense_val_accuracy": round(evaluate(dense, data.val), 2), "val_images": len(data.val),
            "train_images": len(data.train)}
        result[args.mode] = {**section, **stamp}
    if args.screen_cost:
        result["screen_cost"] = {**screen_cost(args.checkpoint, 8, 3), **stamp}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k in (args.mode, "screen_cost")}, indent=1))


if __name__ == "__main__":
    main()
