"""Issue 14's goal: autoprune's own overhead per trial on a graph model is <= 5% of the trial.

Runs ``studies/subset-resnet-channel.toml`` (He et al.'s CIFAR ResNet-20 at width 0.5 on the real CIFAR-10
subset; its defaults, fewer trials with ``--trials``) in this process, with a timer around each part of a
trial that is the pipeline's own work rather than the training and measuring a trial is for:

* ``repair``: the search space's budget repair (closed-form costs of the channel groups, bisection);
* ``prune``: the pruning plan applied: the dependency graph traced (Torch-Pruning), the channel importance,
  the surgery on a copy of the dense model;
* ``profile``: the pruned model's parameter and MAC counts;
* ``save``: the fine-tuned weights with their arch, saved and uploaded to the artifact store;
* ``rebuild``: (after the study) the last trial's pruned network saved as a checkpoint (weights + arch) and
  rebuilt from it: the dense model on the meta device, pruned to the widths, the weights checked and loaded
  (what export and ``autoprune.load`` do), once.

Beside them, per trial: its wall time (Optuna's start to complete), the fine-tune, and the latency
measurement (``[latency]``: a feature's cost, not overhead, shown apart). The overhead fraction is the sum
of the parts / the trial's wall time.

    python benchmarks/overhead.py --trials 4      # ~30 min on 2 cores the first time (the dense model
                                                  # and the scan; both cached in --work), then ~8 min

Writes ``benchmarks/results/overhead.json`` and ``overhead.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's autoprune, not an installed one

import autoprune.objective as objective  # noqa: E402
from autoprune import latency, space  # noqa: E402
from autoprune.config import load_config  # noqa: E402
from autoprune.files import atomic_write  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
STUDY_TOML = REPO / "studies" / "subset-resnet-channel.toml"
GOAL = 0.05
PARTS = ("repair", "prune", "profile", "save")

spent: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))  # trial -> part -> seconds
current = {"trial": -1}


def timed(owner, name: str, part: str) -> None:
    """Wrap ``owner.name`` so that its seconds add to the current trial's ``part``."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[current["trial"]][part] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def instrument() -> None:
    call = objective.Objective.__call__

    def trial_call(self, trial):
        current["trial"] = trial.number
        return call(self, trial)

    objective.Objective.__call__ = trial_call
    timed(space.SearchSpace, "repair", "repair")
    timed(objective, "prune", "prune")
    timed(objective.metrics, "pruned_figures", "profile")
    timed(objective.Objective, "save_weights", "save")
    timed(latency.Meter, "figures", "latency")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--work", type=Path, default=Path("/tmp/autoprune-overhead"),
                   help="the study's folder (a rerun resumes it; delete it for a fresh run)")
    p.add_argument("--out", type=Path, default=RESULTS / "overhead.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # one core for the study; the other stays free for the machine's other work

    from autoprune.plan import plan_for, prune
    from autoprune.prepare import load_dense_checkpoint
    from autoprune.search import run_search
    from autoprune.sources import load_checkpoint, save_checkpoint
    from autoprune.study import open_existing

    config = load_config(STUDY_TOML, trials=args.trials, out_dir=str(args.work / "study"))
    config.select.top_k = 0  # the leaders' re-scoring after the study is not a trial's work (minutes saved)
    instrument()
    started = time.perf_counter()
    run_search(config, device="cpu", progress=False)
    study, _ = open_existing(config.storage_url, config.study.name)
    last = [t for t in study.trials if "plan" in t.user_attrs][-1]
    dense = load_dense_checkpoint(config, study.user_attrs["checkpoint"])
    plan = plan_for(dense, config.study.kind, last.user_attrs["plan"], config.study.criterion, config.pruning.round_to)
    path = save_checkpoint(prune(dense, plan).model, args.work / "rebuild.pt")
    t0 = time.perf_counter()
    load_checkpoint(path, config.model.source)
    rebuild = time.perf_counter() - t0

    rows = []
    for t in study.trials:
        if t.number not in spent or t.datetime_complete is None:
            continue  # resumed from an earlier run: not timed here
        wall = (t.datetime_complete - t.datetime_start).total_seconds()
        parts = {k: spent[t.number].get(k, 0.0) for k in PARTS}
        rows.append({"trial": t.number, "wall_s": wall, "finetune_s": t.user_attrs.get("finetune_seconds", 0.0),
                     "latency_s": spent[t.number].get("latency", 0.0), **{f"{k}_s": v for k, v in parts.items()},
                     "overhead_s": sum(parts.values()), "overhead_fraction": sum(parts.values()) / wall})
    fractions = [r["overhead_fraction"] for r in rows]
    result = {
        "benchmark": "overhead", "command": "python benchmarks/overhead.py" + (
            f" --trials {args.trials}" if args.trials != 6 else ""),
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": latency.machine()["cpu"], "cpus": latency.machine()["cpus"],
                    "python": platform.python_version(), "torch": torch.__version__},
        "study": str(STUDY_TOML.relative_to(REPO)), "model": f"{config.model.source} width {config.model.width:g}",
        "trials_timed": len(rows), "run_seconds": time.perf_counter() - started,
        "rebuild_s": rebuild, "goal": GOAL,
        "overhead_fraction_median": statistics.median(fractions) if fractions else None,
        "overhead_fraction_max": max(fractions) if fractions else None,
        "goal_met": bool(fractions) and max(fractions) <= GOAL,
        "trials": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(result, indent=1) + "\n")
    atomic_write(args.out.with_suffix(".md"), table(result))
    print(table(result))
    return 0


def table(r: dict) -> str:
    lines = [f"# Pipeline overhead per trial: {r['model']} on the CIFAR-10 subset ({r['study']})", "",
             f"`{r['command']}` ({r['when']}, {r['machine']['cpu']}, 1 torch thread)", "",
             "| trial | wall s | fine-tune s | latency s | repair s | prune s | profile s | save s | overhead |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in r["trials"]:
        lines.append(f"| {row['trial']} | {row['wall_s']:.1f} | {row['finetune_s']:.1f} | {row['latency_s']:.2f} | "
                     f"{row['repair_s']:.3f} | {row['prune_s']:.3f} | {row['profile_s']:.3f} | {row['save_s']:.3f} | "
                     f"{100 * row['overhead_fraction']:.2f}% |")
    if r["overhead_fraction_median"] is not None:
        lines += ["", f"Overhead (repair + prune + profile + save) / trial wall time: median "
                      f"{100 * r['overhead_fraction_median']:.2f}%, max {100 * r['overhead_fraction_max']:.2f}% "
                      f"(goal <= {100 * r['goal']:.0f}%: {'met' if r['goal_met'] else 'not met'}); a trial's network rebuilt "
                      f"from its arch and loaded in {r['rebuild_s']:.3f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
