"""Does distillation from the dense model help the fine-tune of a pruned VGG?

A paired comparison on the real CIFAR-10 subset (validation split carved from
the training images; test images only for the table): one dense checkpoint,
one-shot fine-grained allocations (``autoprune.priors.one_shot_allocation``)
per rule and size target, each fine-tuned by ``autoprune.baseline.finetune``
with the study recipe (``[finetune]`` of studies/subset-fine-grained.toml)
with distillation off and on. The same seeds (data order and augmentation)
for off and on, so each seed gives one paired difference; the table reports
their mean with a 95% t interval (n - 1 degrees of freedom).

Writes ``benchmarks/results/distill.{json,md}`` after every fine-tune (a
stopped run keeps what it finished; ``--add`` adds runs to them).

    python benchmarks/distill.py --checkpoint /work/cache/dense-w0.125.pt
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autoprune import metrics  # noqa: E402
from autoprune.config import load_config  # noqa: E402
from autoprune.model import load_checkpoint  # noqa: E402
from autoprune.baseline import finetune  # noqa: E402
from autoprune.plan import PruningPlan, prune  # noqa: E402
from autoprune.priors import one_shot_allocation  # noqa: E402
from autoprune.train import evaluate  # noqa: E402

OUT = REPO / "benchmarks" / "results"


def run_one(dense, data, config, plan, seed: int, weight: float | None) -> dict:
    """One fine-tune of ``plan``; ``weight`` None: distillation off."""
    cfg = copy.deepcopy(config)
    cfg.finetune.distill = weight is not None
    if weight is not None:
        cfg.finetune.distill_weight = weight
    pruned = prune(dense, plan)
    start = time.perf_counter()
    history = finetune(pruned, dense, data, cfg, seed)
    return {"val_accuracy": history[-1]["val_accuracy"], "test_accuracy": evaluate(pruned.model, data.test),
            "seconds": time.perf_counter() - start}


def interval(diffs: list[float]) -> dict:
    """Mean paired difference and its 95% t half-width (None for a single pair)."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return {"n": n, "mean": mean, "half_width": None}
    t = float(stats.t.ppf(0.975, n - 1))  # 4.303 for n = 3
    return {"n": n, "mean": mean, "half_width": t * statistics.stdev(diffs) / math.sqrt(n)}


def summarize(rows: list[dict]) -> list[dict]:
    """Per (rule, target, weight): the paired differences on against off, by seed."""
    off = {(r["rule"], r["target"], r["seed"]): r for r in rows if r["distill_weight"] is None}
    cells = {}
    for r in rows:
        if r["distill_weight"] is None or (r["rule"], r["target"], r["seed"]) not in off:
            continue
        cells.setdefault((r["rule"], r["target"], r["distill_weight"]), []).append(
            (off[(r["rule"], r["target"], r["seed"])], r))
    out = []
    for (rule, target, weight), pairs in cells.items():
        row = {"rule": rule, "target": target, "distill_weight": weight,
               "size_fraction": pairs[0][1]["size_fraction"], "seeds": [p[1]["seed"] for p in pairs]}
        for split in ("val", "test"):
            key = f"{split}_accuracy"
            row[f"{split}_off"] = statistics.fmean(a[key] for a, _ in pairs)
            row[f"{split}_on"] = statistics.fmean(b[key] for _, b in pairs)
            row[f"{split}_diff"] = interval([b[key] - a[key] for a, b in pairs])
        out.append(row)
    return out


def pooled(rows: list[dict]) -> dict:
    """Every (rule, target) pair of a weight together: a summary, not independent (the cells share seeds)."""
    off = {(r["rule"], r["target"], r["seed"]): r for r in rows if r["distill_weight"] is None}
    out = {}
    for weight in sorted({r["distill_weight"] for r in rows if r["distill_weight"] is not None}):
        pairs = [(off[(r["rule"], r["target"], r["seed"])], r) for r in rows
                 if r["distill_weight"] == weight and (r["rule"], r["target"], r["seed"]) in off]
        out[str(weight)] = {f"{split}_diff": interval([b[f"{split}_accuracy"] - a[f"{split}_accuracy"]
                                                       for a, b in pairs]) for split in ("val", "test")}
        for split in ("val", "test"):
            out[str(weight)][f"{split}_pairs_better"] = sum(b[f"{split}_accuracy"] > a[f"{split}_accuracy"]
                                                            for a, b in pairs)
    return out


def fmt(d: dict) -> str:
    hw = "" if d["half_width"] is None else f" ± {d['half_width']:.2f}"
    return f"{d['mean']:+.2f}{hw}"


def markdown(result: dict) -> str:
    s = result["setup"]
    lines = [
        "# Distillation in the fine-tune: paired differences (on - off)",
        "",
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}; machine: {result['machine']}; torch {result['torch']}.  ",
        f"Dense teacher {s['checkpoint']} (val {s['dense_val_accuracy']:.2f}%, test {s['dense_test_accuracy']:.2f}%); "
        f"data {s['data']}.  ",
        f"Fine-tune: {s['recipe']}; distillation T {s['temperature']:g}. Seeds {s['seeds']} (the same for off and "
        f"on). Differences in accuracy points: mean ± 95% t half-width over the seeds.",
        "",
        "| rule | size target | size | w | val off | val on | Δ val | test off | test on | Δ test |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["summary"]:
        lines.append(f"| {r['rule']} | {r['target']:g} | {r['size_fraction']:.4f} | {r['distill_weight']:g} | "
                     f"{r['val_off']:.2f} | {r['val_on']:.2f} | {fmt(r['val_diff'])} | {r['test_off']:.2f} | "
                     f"{r['test_on']:.2f} | {fmt(r['test_diff'])} |")
    for weight, d in result.get("pooled", {}).items():
        lines += ["", f"All cells together, w {weight}: Δ val {fmt(d['val_diff'])} ({d['val_pairs_better']} of "
                      f"{d['val_diff']['n']} pairs better), Δ test {fmt(d['test_diff'])} ({d['test_pairs_better']} of "
                      f"{d['test_diff']['n']}); the pairs share seeds and the dense model, so this interval is "
                      f"optimistic."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="/work/cache/dense-w0.125.pt", help="the dense model (the teacher)")
    p.add_argument("--study", default=str(REPO / "studies" / "subset-fine-grained.toml"),
                   help="its [finetune] and [data] are the recipe and the splits")
    p.add_argument("--rules", nargs="+", default=["global", "lamp"])
    p.add_argument("--targets", nargs="+", type=float, default=[0.10, 0.05], help="nonzero size fractions")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--weights", nargs="+", type=float, default=[0.5], help="distillation weights tried (on)")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--out", default=str(OUT / "distill"), help="writes OUT.json and OUT.md")
    p.add_argument("--add", action="store_true", help="keep OUT.json's rows and add the runs it lacks")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    config = load_config(args.study)
    config.finetune.distill_temperature = args.temperature
    data = config.load_data()
    dense = load_checkpoint(args.checkpoint)[0].eval()
    dense_params = metrics.count_params(dense)
    result = {
        "command": " ".join(["python", "benchmarks/distill.py", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), CPU",
        "torch": torch.__version__,
        "setup": {"checkpoint": args.checkpoint, "dense_val_accuracy": evaluate(dense, data.val),
                  "dense_test_accuracy": evaluate(dense, data.test), "data": data.describe(),
                  "val_images": len(data.val), "test_images": len(data.test), "seeds": args.seeds,
                  "recipe": config.finetune_recipe().to_dict() | {"seed": "per run"},
                  "temperature": args.temperature},
        "rows": [], "summary": [],
    }
    out = Path(args.out)
    kept = {}
    if args.add and out.with_suffix(".json").is_file():
        kept = json.loads(out.with_suffix(".json").read_text())
        result["rows"] = kept["rows"]
    done = {(r["rule"], r["target"], r["seed"], r["distill_weight"]) for r in result["rows"]}
    for rule in args.rules:
        for target in args.targets:
            ratios = one_shot_allocation(rule, dense, "fine_grained", target)
            plan = PruningPlan("fine_grained", ratios, "", tuple(dense.channels))
            for seed in args.seeds:
                for weight in [None, *args.weights]:
                    if (rule, target, seed, weight) in done:
                        continue
                    if kept and len(result["rows"]) == len(kept["rows"]):  # the first run added to kept rows
                        result["command"] = f"{kept['command']}; then {result['command']}"
                    row = {"rule": rule, "target": target, "seed": seed, "distill_weight": weight,
                           **run_one(dense, data, config, plan, seed, weight)}
                    row["size_fraction"] = metrics.count_nonzero_params(prune(dense, plan).model) / dense_params
                    result["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    write(result, out)
    if kept and len(result["rows"]) == len(kept["rows"]):  # nothing to add: the tables again, as they were run
        result.update(command=kept["command"], date=kept["date"])
    write(result, out)
    print(markdown(result))


def write(result: dict, out: Path) -> None:
    result["summary"], result["pooled"] = summarize(result["rows"]), pooled(result["rows"])
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))


if __name__ == "__main__":
    main()
