"""Does a cheap score rank pruned configs like the full fine-tune does?

For fine-grained and channel pruning of a narrow VGG on the real CIFAR-10
subset: N random configs, all repaired onto the same budget (as the search
does), each scored three ways on the validation split:

* ``no_recal``: accuracy right after pruning (the lab's sensitivity proxy);
* ``bn_recal``: after recomputing BatchNorm statistics on a few training
  batches (EagleEye's adaptive BN; ``autoprune.train.recalibrate_bn``);
* ``full``: after the study's full fine-tune (what the search optimises).

Writes the Spearman rank correlations of both cheap scores with ``full`` and
the cost of the BN-recalibrated score relative to one fine-tune epoch to
``benchmarks/results/fidelity-<kind>.json`` (and the per-config rows as CSV).

    python benchmarks/fidelity.py --configs 30
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autoprune import budget  # noqa: E402
from autoprune.config import load_config  # noqa: E402
from autoprune.plan import PruningPlan, layers_for, prune  # noqa: E402
from autoprune.prepare import dense_model  # noqa: E402
from autoprune.train import evaluate, fit, recalibrate_bn  # noqa: E402

STUDIES = {"fine_grained": "subset-fine-grained", "channel": "subset-channel"}


def random_plan(kind: str, channels, rng: random.Random, target: float) -> PruningPlan:
    prefs = {n: rng.random() for n in layers_for(kind)}
    if kind == "fine_grained":
        ratios = budget.fine_grained_budget(channels, target, prefs, upper={n: 0.98 for n in prefs})
    else:
        ratios = budget.channel_budget(channels, target, "macs", prefs, upper={n: 0.85 for n in prefs})
    return PruningPlan(kind, ratios, "", tuple(channels))


def run(kind: str, n_configs: int, seed: int, target: float, bn_batches: int) -> dict:
    config = load_config(REPO / "studies" / f"{STUDIES[kind]}.toml")
    data = config.load_data()
    dense, checkpoint = dense_model(config, data, torch.device("cpu"), progress=False)
    recipe = config.finetune_recipe()
    rng = random.Random(seed)
    rows = []
    for i in range(n_configs):
        plan = random_plan(kind, dense.channels, rng, target)
        pruned = prune(dense, plan)
        model = pruned.model
        no_recal = evaluate(model, data.val)
        start = time.perf_counter()
        recalibrate_bn(model, data.train, num_batches=bn_batches, seed=config.study.seed)
        recal_seconds = time.perf_counter() - start
        bn_recal = evaluate(model, data.val)
        history = fit(model, data, recipe, masks=pruned.masks, progress=False)
        epoch_seconds = sum(h["seconds"] for h in history) / len(history)
        rows.append({"config": i, "no_recal": no_recal, "bn_recal": bn_recal, "full": history[-1]["val_accuracy"],
                     "recal_seconds": recal_seconds, "epoch_seconds": epoch_seconds,
                     **{f"ratio_{k}": v for k, v in plan.ratios.items()}})
        print(f"{kind} {i + 1}/{n_configs}: no_recal {no_recal:.1f}  bn_recal {bn_recal:.1f}  "
              f"full {rows[-1]['full']:.1f}", file=sys.stderr, flush=True)
    df = pd.DataFrame(rows)
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / f"fidelity-{kind}.csv", index=False)
    result = {
        "kind": kind,
        "configs": n_configs,
        "budget": {"fine_grained": "size fraction", "channel": "MACs fraction"}[kind] + f" {target}",
        "spearman_bn_recal_vs_full": float(df["bn_recal"].corr(df["full"], method="spearman")),
        "spearman_no_recal_vs_full": float(df["no_recal"].corr(df["full"], method="spearman")),
        "bn_recal_cost_vs_one_epoch": float(df["recal_seconds"].median() / df["epoch_seconds"].median()),
        "bn_recal_batches": bn_batches,
        "full_finetune_epochs": recipe.epochs,
        "dense_checkpoint": str(Path(checkpoint).name),
        "val_images": len(data.val),
        "command": " ".join(["python", "benchmarks/fidelity.py", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
    }
    (out / f"fidelity-{kind}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def equal_compute(n_full: int, seed: int) -> dict:
    """Best feasible size at the floor: every trial fully fine-tuned vs the ladder, same epochs."""
    import optuna
    from optuna.trial import TrialState

    from autoprune.pick import is_deployable, is_feasible
    from autoprune.search import run_search

    def study(name: str, ladder: bool, trials: int):
        config = load_config(REPO / "studies" / "subset-fine-grained.toml", name=name, trials=trials, seed=seed)
        config.study.out_dir = str(REPO / "reports" / "bench-fidelity" / name)
        config.study.storage = f"sqlite:///{REPO / 'reports' / 'bench-fidelity' / name / 'study.db'}"
        config.fidelity.ladder = ladder
        run_search(config, progress=False)
        s = optuna.load_study(study_name=name, storage=config.study.storage)
        done = s.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        epochs = sum(t.user_attrs["finetune_epochs_done"] for t in done)
        seconds = sum(t.user_attrs["finetune_seconds"] + t.user_attrs.get("bn_recal_seconds", 0.0) for t in done)
        ok = [t for t in done if is_feasible(t) and is_deployable(t, config)]
        best = min((t.user_attrs["size_fraction"] for t in ok), default=None)
        return {"trials": len(done), "finetune_epochs": epochs, "seconds": seconds, "feasible": len(ok),
                "smallest_feasible_size_fraction": best}

    full = study(f"full-s{seed}", False, n_full)
    budget_epochs = full["finetune_epochs"]
    trials, ladder = n_full, None
    while True:  # grow the ladder study until it has spent the same fine-tune epochs
        ladder = study(f"ladder-s{seed}", True, trials)
        if ladder["finetune_epochs"] >= budget_epochs or trials >= 6 * n_full:
            break
        trials += max(1, int((budget_epochs - ladder["finetune_epochs"]) / 2) or 1)
    return {"full": full, "ladder": ladder, "seed": seed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", type=int, default=30)
    p.add_argument("--kinds", default="fine_grained,channel")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bn-batches", type=int, default=4)
    p.add_argument("--fine-target", type=float, default=0.25, help="size fraction of fine-grained configs")
    p.add_argument("--channel-target", type=float, default=0.5, help="MACs fraction of channel configs")
    p.add_argument("--equal-compute-trials", type=int, default=10,
                   help="trials of the fully fine-tuned study in the equal-compute comparison (0: skip)")
    args = p.parse_args()
    if args.equal_compute_trials:
        r = equal_compute(args.equal_compute_trials, args.seed)
        r.update(command=" ".join(["python", "benchmarks/fidelity.py", *sys.argv[1:]]),
                 date=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        out = REPO / "benchmarks" / "results" / "fidelity-equal-compute.json"
        out.write_text(json.dumps(r, indent=2) + "\n")
        for side in ("full", "ladder"):
            x = r[side]
            print(f"{side}: {x['trials']} trials, {x['finetune_epochs']} fine-tune epochs, {x['seconds']:.0f}s, "
                  f"smallest feasible size {x['smallest_feasible_size_fraction']}")
    for kind in filter(None, args.kinds.split(",")):
        target = args.fine_target if kind == "fine_grained" else args.channel_target
        r = run(kind, args.configs, args.seed, target, args.bn_batches)
        print(f"{kind}: Spearman(bn_recal, full) {r['spearman_bn_recal_vs_full']:.3f}, "
              f"Spearman(no_recal, full) {r['spearman_no_recal_vs_full']:.3f}, "
              f"BN recal costs {100 * r['bn_recal_cost_vs_one_epoch']:.1f}% of a fine-tune epoch")


if __name__ == "__main__":
    main()
