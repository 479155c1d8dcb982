"""Does the search beat the hand-made and one-shot baselines at the same fine-tune budget?

On the real CIFAR-10 subset (train split for training and fine-tuning, the
validation split carved from it for every choice, test images only for the
final table) with one narrow dense VGG trained by autoprune:

* fine-grained, at nonzero size fractions 0.25, 0.15 and 0.10: uniform
  magnitude, global magnitude, LAMP, the lab's by-hand rule (each layer's
  largest sensitivity-scan sparsity within a 2-point drop, scaled to the
  target), and autoprune studies: TPE with sensitivity priors, TPE without
  priors ("cold") and random sampling;
* channel, at 2x and 3x fewer MACs: uniform ratios against the same three
  searches, with CPU latency at batch 1 and 64 of each chosen config.

Every config gets the same fine-tune (the study recipe). Baselines are also
swept over more sizes to find the smallest size each reaches at the accuracy
floor (dense validation accuracy minus ``--max-drop`` points). A search's
figures after 10 and 20 trials are those of the first 10 and 20 trials of its
longest study (an anytime curve: the same sampler seed gives the same first
trials). The seeds change the fine-tune's data order and the sampler; the
dense model is the same.

Writes ``benchmarks/results/search-vs-baselines.{json,md,png}`` and the
per-config rows ``search-vs-baselines-rows.csv``, and rewrites the table in
README.md between its ``search-vs-baselines`` markers. Resumable: finished
jobs are kept in ``reports/bench-search/`` and a rerun picks up where it
stopped.

    python benchmarks/search_vs_baselines.py              # ~75 min on 2 CPU cores
    python benchmarks/search_vs_baselines.py --summarize  # tables/figure from the kept jobs only
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autoprune import budget, metrics  # noqa: E402
from autoprune.config import StudyConfig, load_config  # noqa: E402
from autoprune.model import build_model  # noqa: E402
from autoprune.objective import finetune  # noqa: E402
from autoprune.plan import PruningPlan, prune  # noqa: E402
from autoprune.search import dense_model  # noqa: E402
from autoprune.train import evaluate, resolve_device  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
BASE_TOML = {"fine_grained": "subset-fine-grained.toml", "channel": "subset-channel.toml"}
GRID = {"fine_grained": [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98], "channel": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]}
SEARCHES = {  # method -> (sampler, priors enabled)
    "tpe_priors": ("tpe", True),
    "tpe_cold": ("tpe", False),
    "random": ("random", False),
}
BASELINES = {"fine_grained": ["uniform", "global", "lamp", "by_hand"], "channel": ["uniform"]}
LABEL = {"uniform": "uniform", "global": "global magnitude", "lamp": "LAMP", "by_hand": "by hand (lab rule)",
         "tpe_priors": "TPE + priors", "tpe_cold": "TPE, no priors", "random": "random search"}
COLOR = {"uniform": "tab:blue", "global": "tab:orange", "lamp": "tab:green", "by_hand": "tab:red",
         "tpe_priors": "tab:purple", "tpe_cold": "tab:brown", "random": "tab:pink"}
MARK_START, MARK_END = "<!-- search-vs-baselines:start -->", "<!-- search-vs-baselines:end -->"


@dataclass(frozen=True)
class Job:
    kind: str  # fine_grained | channel
    method: str
    target: float  # size fraction (fine) or MACs fraction (channel)
    seed: int
    trials: int = 0  # searches only
    budget_low: float | None = None  # searches: lowest sampled budget (fraction of the cap); None: the default
    early_stop: bool = False  # searches: the study's early stop of hopeless trials

    @property
    def study_name(self) -> str:
        """The study (and its SQLite file): asking for more trials later extends it."""
        low = f"-low{self.budget_low:g}" if self.budget_low else ""
        full = "-full" if self.trials and not self.early_stop else ""  # every trial fully fine-tuned
        return f"{self.kind}-{self.method}-{self.target:.4f}-s{self.seed}{low}{full}"

    @property
    def name(self) -> str:
        return self.study_name + (f"-n{self.trials}" if self.trials else "")


def base_config(args, kind: str) -> StudyConfig:
    config = load_config(REPO / "studies" / BASE_TOML[kind], name=f"bench-{kind}")
    config.model.width = args.width
    config.model.train_epochs = args.dense_epochs
    config.finetune.epochs = args.finetune_epochs
    config.constraints.max_accuracy_drop = args.max_drop
    config.priors.grid = list(GRID[kind])
    config.fidelity.ladder = False  # every config gets the whole fine-tune: a fair comparison
    config.study.out_dir = str(args.work / kind)  # shared: one sensitivity scan per kind
    if args.data:
        config.data.spec = args.data
    if args.val_size:
        config.data.val_size = args.val_size
    return config


def job_config(args, job: Job, checkpoint: str) -> StudyConfig:
    config = base_config(args, job.kind)
    sampler, priors = SEARCHES[job.method]
    config.study.name = job.study_name
    config.study.trials = job.trials
    config.study.sampler = sampler
    config.study.seed = job.seed
    config.study.storage = f"sqlite:///{args.work / job.kind / (job.study_name + '.db')}"
    config.priors.enabled = priors
    config.model.checkpoint = checkpoint
    if job.budget_low:
        config.study.budget_low = job.budget_low
    # Off by default: every config gets the same fine-tune, or a trial stopped after one epoch
    # (val < floor - 6 points) could never be chosen and a study could end with nothing to show.
    config.finetune.early_stop = job.early_stop
    c = config.constraints
    if job.kind == "fine_grained":
        c.max_size_fraction = job.target
    else:
        c.max_size_fraction, c.max_macs_fraction = 1.0, job.target
    return config.validate()


# --- one job: a fine-tuned baseline config, or a whole study --------------------------


def baseline_ratios(job: Job, dense, scan) -> dict[str, float]:
    from autoprune.priors import by_hand_rule, one_shot_allocation

    if job.method == "by_hand":
        df, dense_acc = scan
        return by_hand_rule(df, dense_acc, dense.channels, "fine_grained", job.target, drop=2.0)
    return one_shot_allocation(job.method, dense, job.kind, job.target, "macs")


def run_baseline(args, job: Job, checkpoint: str, scan) -> list[dict]:
    from autoprune.model import load_checkpoint

    config = base_config(args, job.kind)
    config.study.seed = job.seed
    device = resolve_device(args.device)
    data = config.load_data().to(device)
    dense = load_checkpoint(checkpoint)[0].to(device).eval()
    ratios = baseline_ratios(job, dense, scan)
    pruned = prune(dense, PruningPlan(job.kind, ratios, "", tuple(dense.channels)))
    history = finetune(pruned, dense, data, config, job.seed)  # the trials' own fine-tune
    model = pruned.model.eval()
    figures = metrics.profile(model, latency=False)
    return [{"trial": 0, "val_accuracy": history[-1]["val_accuracy"], "test_accuracy": evaluate(model, data.test),
             "size_fraction": figures["nonzero_params"] / metrics.count_params(dense),
             "macs_fraction": figures["macs"] / metrics.count_macs(dense), "complete": True,
             "channels": list(model.channels) if job.kind == "channel" else None,
             "plan": json.dumps({k: round(v, 5) for k, v in ratios.items()})}]


def run_study(args, job: Job, checkpoint: str) -> list[dict]:
    import optuna
    from optuna.trial import TrialState

    from autoprune.pick import is_deployable
    from autoprune.search import run_search

    config = job_config(args, job, checkpoint)
    run_search(config, device=args.device, progress=False)
    study = optuna.load_study(study_name=config.study.name, storage=config.storage_url)
    rows = []
    for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number):
        a = t.user_attrs
        rows.append({"trial": t.number, "val_accuracy": a["val_accuracy"], "test_accuracy": a["test_accuracy"],
                     "size_fraction": a["size_fraction"], "macs_fraction": a["macs_fraction"],
                     "complete": is_deployable(t, config), "channels": a.get("channels") if job.kind == "channel"
                     else None, "plan": json.dumps({k: round(v, 5) for k, v in a["plan"].items()})})
    return rows[: job.trials]


def run_job(args, job: Job, checkpoint: str, scans: dict) -> tuple[Job, list[dict], float]:
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    start = time.perf_counter()
    if job.trials:
        rows = run_study(args, job, checkpoint)
    else:
        rows = run_baseline(args, job, checkpoint, scans.get(job.kind))
    for r in rows:
        r.update(kind=job.kind, method=job.method, target=job.target, seed=job.seed, floor_study=bool(job.budget_low))
    out = args.work / "jobs" / f"{job.name}.json"
    out.write_text(json.dumps(rows))
    return job, rows, time.perf_counter() - start


def priority(args, job: Job) -> tuple:
    """Run order: what the goals need first (the first fine-grained target, its baselines), then
    the first channel target, then the rest; long studies before short jobs within a group."""
    if job.budget_low:
        return 5, -job.trials, job.target
    if job.kind == "fine_grained":
        group = 0 if job.trials and np.isclose(job.target, args.fine_targets[0]) else (1 if not job.trials else 3)
    else:
        group = 2 if not job.trials or np.isclose(job.target, args.channel_targets[0]) else 4
    return group, -job.trials, job.target


def plan_jobs(args) -> list[Job]:
    jobs = []
    for seed in args.seeds:
        for kind, targets, sweep in (("fine_grained", args.fine_targets, args.fine_sweep),
                                     ("channel", args.channel_targets, args.channel_sweep)):
            if kind not in args.kinds:
                continue
            for method in BASELINES[kind]:
                for target in sorted(set(targets) | set(sweep)):
                    jobs.append(Job(kind, method, target, seed))
            for i, target in enumerate(targets):
                trials = args.trials if (kind, i) == ("fine_grained", 0) or args.trials_everywhere else args.trials_other
                for method in args.methods:
                    early = (kind, target) in args.early_stop_at
                    jobs.append(Job(kind, method, target, seed, trials, early_stop=early))
        if "fine_grained" in args.kinds and args.floor_trials:
            # How far each search gets at the floor: a study capped at --floor-cap (above where the
            # baselines reach the floor) sampling budgets down to --floor-budget-low x the cap.
            for method in args.methods:
                jobs.append(Job("fine_grained", method, args.floor_cap, seed, args.floor_trials,
                                args.floor_budget_low))
    return jobs


# --- summary --------------------------------------------------------------------------


def cost_col(kind: str) -> str:
    return "size_fraction" if kind == "fine_grained" else "macs_fraction"


def per_run(rows: pd.DataFrame, floor: float, budgets: list[int]) -> pd.DataFrame:
    """One line per (kind, method, target, seed, trial budget): the config chosen on validation."""
    out = []
    for (kind, method, target, seed), g in rows.groupby(["kind", "method", "target", "seed"]):
        g = g.sort_values("trial")
        search = method in SEARCHES
        for n in (budgets if search else [1]):
            head = g[g["trial"] < n] if search else g
            if search and g["trial"].max() + 1 < n:
                continue  # this target ran fewer trials
            ok = head[head["complete"]]
            best = ok.loc[ok["val_accuracy"].idxmax()] if len(ok) else None
            cost = cost_col(kind)
            feasible = ok[(ok["val_accuracy"] >= floor) & (ok[cost] <= target + 1e-9)]
            out.append({"kind": kind, "method": method, "target": target, "seed": seed, "trials": n if search else 0,
                        "val_accuracy": None if best is None else best["val_accuracy"],
                        "test_accuracy": None if best is None else best["test_accuracy"],
                        "cost": None if best is None else best[cost],
                        "channels": None if best is None else best["channels"],
                        "plan": None if best is None else best["plan"],
                        "smallest_feasible": feasible[cost].min() if len(feasible) else None,
                        "first_feasible_trial": int(feasible["trial"].min()) + 1 if len(feasible) else None})
    return pd.DataFrame(out)


def smallest_at_floors(rows: pd.DataFrame, dense_val: float, drops: list[float]) -> pd.DataFrame:
    """Per (kind, method, seed, drop): the smallest cost of any fully fine-tuned config of the
    method (every study's trials; every swept size of a baseline) whose validation accuracy is at
    least ``dense_val - drop``; NaN where none is."""
    out = []
    for (kind, method, seed), g in rows[rows["complete"].astype(bool)].groupby(["kind", "method", "seed"]):
        cost = cost_col(kind)
        for drop in drops:
            ok = g[g["val_accuracy"] >= dense_val - drop]
            out.append({"kind": kind, "method": method, "seed": seed, "drop": drop,
                        "smallest": ok[cost].min() if len(ok) else np.nan})
    return pd.DataFrame(out)


def at_longest(runs: pd.DataFrame) -> pd.DataFrame:
    """Each study's line at its largest trial budget (baselines: their one line)."""
    return runs[runs["trials"] == runs.groupby(["kind", "method", "target", "seed"])["trials"].transform("max")]


def latencies(runs: pd.DataFrame, dense_channels, repeats: int) -> dict:
    """CPU latency (ms) at batch 1 and 64 of the dense model and each chosen channel config.

    Measured here, one model after another in one process with nothing else
    training, at the benchmark's width and with the same kept fractions on the
    full-width VGG.
    """
    chosen = at_longest(runs)
    chosen = chosen[(chosen["kind"] == "channel") & chosen["channels"].notna()]
    out = {"rows": []}
    full = build_model("vgg", width=1.0).channels

    def measure(channels, batch):
        model = build_model("vgg", channels=list(channels)).eval()
        return metrics.measure_latency_ms(model, batch, warmup=3, repeats=repeats if batch == 1 else
                                          max(5, repeats // 5))

    def dense_pair(channels):  # the dense model twice, around the pruned ones' turn: a drift shows
        return {b: measure(channels, b) for b in (1, 64)}

    scale = [f / d for f, d in zip(full, dense_channels)]
    dense_lat, dense_full = dense_pair(dense_channels), dense_pair(full)
    out["dense"] = {"batch1_ms": dense_lat[1], "batch64_ms": dense_lat[64],
                    "full_width_batch1_ms": dense_full[1], "full_width_batch64_ms": dense_full[64]}
    dense_macs = budget.vgg_cost(dense_channels)["macs"]
    full_macs = budget.vgg_cost(full)["macs"]
    for _, r in chosen.iterrows():
        ch = list(r["channels"])
        ch_full = [max(1, round(c * s)) for c, s in zip(ch, scale)]
        row = {"method": r["method"], "target": r["target"], "seed": r["seed"], "trials": r["trials"],
               "channels": ch, "macs_reduction": dense_macs / budget.vgg_cost(ch)["macs"],
               "full_width_macs_reduction": full_macs / budget.vgg_cost(ch_full)["macs"]}
        for b in (1, 64):
            row[f"batch{b}_ms"] = measure(ch, b)
            row[f"latency_reduction_batch{b}"] = dense_lat[b] / row[f"batch{b}_ms"]
            row[f"full_width_batch{b}_ms"] = measure(ch_full, b)
            row[f"full_width_latency_reduction_batch{b}"] = dense_full[b] / row[f"full_width_batch{b}_ms"]
        out["rows"].append(row)
        print(f"latency {r['method']} {r['target']:.3f} seed {r['seed']}: batch 1 {row['batch1_ms']:.2f} ms, "
              f"batch 64 {row['batch64_ms']:.1f} ms (full width {row['full_width_batch64_ms']:.0f} ms)",
              file=sys.stderr, flush=True)
    again, again_full = dense_pair(dense_channels), dense_pair(full)
    out["dense_again"] = {"batch1_ms": again[1], "batch64_ms": again[64], "full_width_batch1_ms": again_full[1],
                          "full_width_batch64_ms": again_full[64]}
    return out


def mean_sd(x) -> str:
    x = pd.Series(x).dropna().astype(float)
    if x.empty:
        return "none"
    return f"{x.mean():.2f} ± {x.std(ddof=1):.2f}" if len(x) > 1 else f"{x.mean():.2f}"


def summarize(args, dense: dict, rows: pd.DataFrame, runs: pd.DataFrame, lat: dict | None) -> dict:
    table = []
    for kind, targets in (("fine_grained", args.fine_targets), ("channel", args.channel_targets)):
        for target in targets:
            for method in BASELINES[kind] + args.methods:
                g = runs[(runs["kind"] == kind) & (runs["method"] == method) & np.isclose(runs["target"], target)]
                for n, h in g.groupby("trials"):
                    table.append({
                        "kind": kind, "target": target, "method": method, "trials": int(n), "seeds": len(h),
                        "val_mean": h["val_accuracy"].mean(), "val_sd": h["val_accuracy"].std(ddof=1),
                        "test_mean": h["test_accuracy"].mean(), "test_sd": h["test_accuracy"].std(ddof=1),
                        "cost_mean": h["cost"].mean(),
                        "first_feasible_trials": [None if pd.isna(v) else int(v) for v in h["first_feasible_trial"]],
                    })
    smallest = smallest_at_floors(rows, dense["val_accuracy"], sorted({args.max_drop, *args.floors}))
    return {"dense": dense, "accuracy_floor": dense["val_accuracy"] - args.max_drop, "runs": runs,
            "table": pd.DataFrame(table),
            "smallest": smallest, "latency": lat}


def _first_feasible(s: dict, method: str, target: float) -> list:
    r = s["runs"]
    g = at_longest(r[(r["kind"] == "fine_grained") & (r["method"] == method) & np.isclose(r["target"], target)])
    g = g.sort_values("seed")
    return [None if pd.isna(v) else int(v) for v in g["first_feasible_trial"]]


def goals(s: dict, args) -> list[dict]:
    t, target = s["table"], args.fine_targets[0]
    fine = t[(t["kind"] == "fine_grained") & np.isclose(t["target"], target)]
    if not {"uniform", "tpe_priors", "tpe_cold"} <= set(fine["method"]):
        return []  # a partial run: the goals need all three
    uni = fine[fine["method"] == "uniform"].iloc[0]
    pri = fine[fine["method"] == "tpe_priors"].sort_values("trials").iloc[-1]
    sm = s["smallest"]
    sm = sm[(sm["kind"] == "fine_grained") & np.isclose(sm["drop"], args.max_drop)]
    pri_small = sm[sm["method"] == "tpe_priors"]["smallest"]
    uni_small = sm[sm["method"] == "uniform"]["smallest"]
    ratio = float(pri_small.mean() / uni_small.mean()) if pri_small.notna().any() and uni_small.notna().any() else None
    out = [
        {"goal": f"test accuracy at size {target:g}: TPE + priors - uniform >= 1 point",
         "measured": float(pri["test_mean"] - uni["test_mean"]), "holds": bool(pri["test_mean"] - uni["test_mean"] >= 1.0)},
        {"goal": f"smallest size at the floor (dense - {args.max_drop:g}): TPE + priors <= 0.6 x uniform's",
         "measured": "none found" if ratio is None else ratio,
         "holds": bool(ratio is not None and ratio <= 0.6 and pri_small.notna().all())},
    ]
    studies = [(target, f"size <= {target:g}")]
    if args.floor_trials:
        studies.append((args.floor_cap, f"size <= {args.floor_cap:g} study"))
    for cap, what in studies:
        pri_first, cold_first = _first_feasible(s, "tpe_priors", cap), _first_feasible(s, "tpe_cold", cap)
        if not pri_first:
            continue
        later = [c is None or (p is not None and c > p) for p, c in zip(pri_first, cold_first)]
        out.append({"goal": f"first feasible trial ({what}): TPE + priors within 5, cold TPE later",
                    "measured": f"{_trials_text(pri_first)} vs {_trials_text(cold_first)}",
                    "holds": bool(all(v is not None and v <= 5 for v in pri_first) and all(later))})
    if s["latency"] and s["latency"]["rows"]:
        lr = pd.DataFrame(s["latency"]["rows"])
        for b in (1, 64):
            for pre in ("", "full_width_"):
                ratio = float((lr[f"{pre}latency_reduction_batch{b}"] / lr[f"{pre}macs_reduction"]).mean())
                where = "full-width VGG" if pre else f"width {args.width:g} VGG"
                out.append({"goal": f"channel: latency reduction / MACs reduction >= 0.9 (batch {b}, {where})",
                            "measured": ratio, "holds": bool(ratio >= 0.9)})
    return out


def _trials_text(values: list) -> str:
    return "[" + ", ".join("none" if v is None else str(v) for v in values) + "]"


def markdown(s: dict, args, goal_rows: list[dict]) -> str:
    d = s["dense"]
    t = s["table"]
    n_seeds = len(args.seeds)
    lines = [f"Dense VGG (width {args.width:g}, {args.dense_epochs} epochs): validation {d['val_accuracy']:.2f}%, "
             f"test {d['test_accuracy']:.2f}%; accuracy floor {s['accuracy_floor']:.2f}% (dense validation - "
             f"{args.max_drop:g}). Every config: {args.finetune_epochs}-epoch fine-tune; mean ± sd over "
             f"{n_seeds} seeds. First feasible trial: per seed, counted from 1 (none: no trial reached the floor).", ""]
    lines += ["| pruning | target | method | trials | val % | test % | first feasible trial |",
              "|---|---|---|---|---|---|---|"]
    for _, r in t.iterrows():
        what = "size" if r["kind"] == "fine_grained" else "MACs"
        g = s["runs"][(s["runs"]["kind"] == r["kind"]) & (s["runs"]["method"] == r["method"])
                      & np.isclose(s["runs"]["target"], r["target"]) & (s["runs"]["trials"] == r["trials"])]
        first = _trials_text(r["first_feasible_trials"]) if r["method"] in SEARCHES else ""
        lines.append(f"| {r['kind'].replace('_', '-')} | {what} {r['target']:.2f} | {LABEL[r['method']]} | "
                     f"{r['trials'] or ''} | {mean_sd(g['val_accuracy'])} | {mean_sd(g['test_accuracy'])} | {first} |")
    sm = s["smallest"]
    drops = sorted(sm["drop"].unique())
    lines += ["", "Smallest fine-grained size fraction whose fine-tuned validation accuracy reaches dense minus "
              "0.5, 1 or 2 points: over every config a method produced (all its studies, including a "
              f"size <= {args.floor_cap:g} study sampling down to {args.floor_budget_low * args.floor_cap:g}; "
              "every swept size of a baseline). Mean ± sd over the seeds that reached it.", "",
              "| method | " + " | ".join(f"dense - {x:g}" for x in drops) + " |",
              "|---|" + "---|" * len(drops)]
    fine = sm[sm["kind"] == "fine_grained"]
    for method in BASELINES["fine_grained"] + args.methods:
        cells = []
        for x in drops:
            v = fine[(fine["method"] == method) & np.isclose(fine["drop"], x)]["smallest"]
            cell = mean_sd(v)
            if 0 < v.notna().sum() < n_seeds:
                cell += f" ({v.notna().sum()}/{n_seeds} seeds)"
            cells.append(cell)
        if (fine["method"] == method).any():
            lines.append(f"| {LABEL[method]} | " + " | ".join(cells) + " |")
    if s["latency"] and s["latency"]["rows"]:
        lat = pd.DataFrame(s["latency"]["rows"]).groupby(["target", "method"], sort=False).mean(numeric_only=True)
        dl, da = s["latency"]["dense"], s["latency"]["dense_again"]
        lines += ["", f"Channel configs chosen on validation: CPU latency (ms, median; mean over seeds) at batch 1 "
                  f"and 64, as measured at width {args.width:g} and with the same kept fractions on the full-width "
                  f"VGG. Dense: {dl['batch1_ms']:.2f} / {dl['batch64_ms']:.1f} ms; full width "
                  f"{dl['full_width_batch1_ms']:.1f} / {dl['full_width_batch64_ms']:.0f} ms (measured again after "
                  f"the pruned ones: {da['batch1_ms']:.2f} / {da['batch64_ms']:.1f} ms; "
                  f"{da['full_width_batch1_ms']:.1f} / {da['full_width_batch64_ms']:.0f} ms).", "",
                  "| MACs target | method | MACs reduction | batch 1 ms | batch 64 ms | latency reduction b1 / b64 | "
                  "full width: MACs reduction | latency reduction b1 / b64 |", "|---|---|---|---|---|---|---|---|"]
        for (target, method), r in lat.iterrows():
            lines.append(f"| {target:.2f} | {LABEL[method]} | {r['macs_reduction']:.2f}x | {r['batch1_ms']:.2f} | "
                         f"{r['batch64_ms']:.1f} | {r['latency_reduction_batch1']:.2f}x / "
                         f"{r['latency_reduction_batch64']:.2f}x | {r['full_width_macs_reduction']:.2f}x | "
                         f"{r['full_width_latency_reduction_batch1']:.2f}x / "
                         f"{r['full_width_latency_reduction_batch64']:.2f}x |")
    lines += ["", "| goal | measured | holds |", "|---|---|---|"]
    for g in goal_rows:
        m = g["measured"]
        m = f"{m:.2f}" if isinstance(m, float) else m
        lines.append(f"| {g['goal']} | {m} | {'yes' if g['holds'] else 'no'} |")
    return "\n".join(lines) + "\n"


def figure(s: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = s["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    longest = at_longest(runs)
    for ax, kind, targets in ((axes[0], "fine_grained", args.fine_targets), (axes[2], "channel", args.channel_targets)):
        g = longest[longest["kind"] == kind]
        for i, method in enumerate(BASELINES[kind] + args.methods):
            h = g[g["method"] == method]
            if method in SEARCHES:  # not the smallest-size-at-the-floor studies
                h = h[np.isclose(h["target"].to_numpy()[:, None], np.array(targets)[None, :]).any(1)]
            h = h.groupby("target")["test_accuracy"].agg(["mean", "std"]).reset_index()
            if h.empty:
                continue
            dx = (i - 3) * 0.002
            ax.errorbar(h["target"] + dx, h["mean"], yerr=h["std"].fillna(0), marker="o", capsize=3,
                        label=LABEL[method], ls="--" if method in SEARCHES else "-", color=COLOR[method])
        ax.axhline(s["dense"]["test_accuracy"], color="gray", lw=0.8, ls=":", label="dense (test)")
        ax.set_xlabel("nonzero size fraction of dense" if kind == "fine_grained" else "MACs fraction of dense")
        ax.set_ylabel("test accuracy after fine-tune (%)")
        ax.set_title(f"{kind.replace('_', '-')}: test accuracy of the validation-chosen config")
        ax.legend(fontsize=7)
    ax = axes[1]
    target = args.fine_targets[0]
    rows = s["rows"]
    for method in args.methods:
        g = rows[(rows["kind"] == "fine_grained") & (rows["method"] == method) & np.isclose(rows["target"], target)]
        curves = []
        for _, h in g.groupby("seed"):
            h = h.sort_values("trial")
            curves.append(h["val_accuracy"].where(h["complete"].astype(bool)).cummax().ffill().to_numpy())  # NaN: none yet
        if not curves:
            continue
        n = min(len(c) for c in curves)
        c = np.array([c[:n] for c in curves], dtype=float)
        x = np.arange(1, n + 1)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: no seed has a config yet
            ax.plot(x, np.nanmean(c, 0), label=LABEL[method] + " (mean of the seeds with a config)",
                    color=COLOR[method])
            ax.fill_between(x, np.nanmin(c, 0), np.nanmax(c, 0), alpha=0.2, color=COLOR[method])
    uni = runs[(runs["kind"] == "fine_grained") & (runs["method"] == "uniform") & np.isclose(runs["target"], target)]
    ax.axhline(uni["val_accuracy"].mean(), color="k", lw=0.8, label="uniform (val)")
    ax.axhline(s["accuracy_floor"], color="r", lw=0.8, ls=":", label="accuracy floor")
    ax.set_ylim(bottom=uni["val_accuracy"].mean() - 6)
    ax.set_xlabel("trials")
    ax.set_ylabel("best validation accuracy so far (%)")
    ax.set_title(f"fine-grained, size <= {target:g}: best so far (mean, min-max of seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_readme(table_md: str) -> bool:
    readme = REPO / "README.md"
    text = readme.read_text()
    if MARK_START not in text or MARK_END not in text:
        return False
    head, rest = text.split(MARK_START, 1)
    _, tail = rest.split(MARK_END, 1)
    readme.write_text(head + MARK_START + "\n" + table_md + MARK_END + tail)
    return True


# --- main -----------------------------------------------------------------------------


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def kind_targets(text: str) -> set[tuple[str, float]]:
    return {(k, float(t)) for k, t in (item.split(":") for item in text.split(",") if item)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--kinds", default="fine_grained,channel", type=lambda s: s.split(","))
    p.add_argument("--methods", default="tpe_priors,tpe_cold,random", type=lambda s: s.split(","))
    p.add_argument("--fine-targets", default="0.25,0.15,0.10", type=floats)
    p.add_argument("--fine-sweep", default="0.5,0.4,0.3,0.2", type=floats,
                   help="extra sizes for the baselines' smallest size at the floor")
    p.add_argument("--channel-targets", default="0.5,0.3333", type=floats, help="MACs fractions (2x, 3x fewer)")
    p.add_argument("--channel-sweep", default="0.7,0.6,0.4", type=floats)
    p.add_argument("--trials", type=int, default=40, help="trials of the studies at the first fine-grained target")
    p.add_argument("--trials-other", type=int, default=20, help="trials of the other studies")
    p.add_argument("--trials-everywhere", action="store_true", help="--trials at every target")
    p.add_argument("--floor-cap", type=float, default=0.5, help="size cap of the smallest-size-at-the-floor studies")
    p.add_argument("--floor-budget-low", type=float, default=0.2, help="their lowest budget, fraction of the cap")
    p.add_argument("--floor-trials", type=int, default=20, help="their trials (0: skip them)")
    p.add_argument("--early-stop-at", default="fine_grained:0.25", type=kind_targets,
                   help="KIND:TARGET,... whose studies keep the early stop of hopeless trials (the product's "
                        "default; these figures were measured so); elsewhere every trial is fully fine-tuned")
    p.add_argument("--floors", default="0.5,1,2", type=floats,
                   help="points below dense validation at which the smallest sizes are reported")
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--dense-epochs", type=int, default=20)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--max-drop", type=float, default=0.5, help="accuracy floor: dense validation minus this")
    p.add_argument("--data", default="", help="data spec (default: the subset studies' npz), e.g. cifar10")
    p.add_argument("--val-size", type=int, default=0, help="validation images (default: the subset studies')")
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto (latency is always measured on the CPU)")
    p.add_argument("--workers", type=int, default=2, help="jobs in parallel (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job")
    p.add_argument("--latency-repeats", type=int, default=50)
    p.add_argument("--work", type=Path, default=REPO / "reports" / "bench-search")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--summarize", action="store_true", help="only rebuild the summary from kept jobs")
    p.add_argument("--no-readme", action="store_true")
    args = p.parse_args()
    args.work = args.work.resolve()
    (args.work / "jobs").mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    # The dense model (trained once, cached) and the sensitivity scans, before any job forks off.
    from autoprune.sensitivity import scan_cached

    config = base_config(args, "fine_grained")
    data = config.load_data()
    device = resolve_device(args.device)
    data = data.to(device)
    dense, checkpoint = dense_model(config, data, device, progress=False)
    dense.to(device).eval()
    figures = {"val_accuracy": evaluate(dense, data.val), "test_accuracy": evaluate(dense, data.test),
               "params": metrics.count_params(dense), "macs": metrics.count_macs(dense),
               "checkpoint": Path(checkpoint).name, "width": args.width, "val_images": len(data.val),
               "train_images": len(data.train), "test_images": len(data.test)}
    print(f"dense: val {figures['val_accuracy']:.2f}% test {figures['test_accuracy']:.2f}% ({checkpoint})",
          file=sys.stderr, flush=True)
    scans = {}
    for kind in args.kinds:
        cfg = base_config(args, kind)
        df, dense_acc, _ = scan_cached(checkpoint, data, kind, cfg.priors.grid, "", cfg.out_dir, progress=False)
        scans[kind] = (df, dense_acc)

    jobs = plan_jobs(args)
    done = {j.name for j in jobs if (args.work / "jobs" / f"{j.name}.json").is_file()}
    todo = [j for j in jobs if j.name not in done]
    todo.sort(key=lambda j: priority(args, j))
    if not args.summarize and todo:
        print(f"{len(todo)} of {len(jobs)} jobs to run ({len(done)} kept from earlier runs) on {args.workers} "
              f"processes x {args.threads} threads", file=sys.stderr, flush=True)
        start = time.perf_counter()
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(run_job, args, j, checkpoint, scans) for j in todo]
            for i, f in enumerate(as_completed(futures), 1):
                job, rows, seconds = f.result()
                best = max((r["val_accuracy"] for r in rows if r["complete"]), default=float("nan"))
                print(f"[{i}/{len(todo)}] {job.name}: {len(rows)} configs, best val {best:.2f}% ({seconds:.0f}s; "
                      f"{time.perf_counter() - start:.0f}s elapsed)", file=sys.stderr, flush=True)
    kept = [args.work / "jobs" / f"{j.name}.json" for j in jobs if (args.work / "jobs" / f"{j.name}.json").is_file()]
    if not kept:
        sys.exit(f"search_vs_baselines: no finished jobs in {args.work / 'jobs'}; run without --summarize first")
    rows = pd.concat([pd.DataFrame(json.loads(path.read_text())) for path in kept], ignore_index=True)
    # The config each method chose per study, at 10, 20 and the study's own number of trials.
    runs = per_run(rows, figures["val_accuracy"] - args.max_drop, sorted({10, 20, args.trials, args.trials_other} - {0}))
    lat = None
    if "channel" in args.kinds:
        lat = latencies(runs[runs["target"].isin(args.channel_targets)], list(dense.channels), args.latency_repeats)
    s = summarize(args, figures, rows, runs, lat)
    s["rows"] = rows
    goal_rows = goals(s, args)
    table_md = markdown(s, args, goal_rows)
    args.out.mkdir(parents=True, exist_ok=True)
    rows.to_csv(args.out / "search-vs-baselines-rows.csv", index=False)
    figure(s, args, args.out / "search-vs-baselines.png")
    (args.out / "search-vs-baselines.md").write_text(table_md)
    command = " ".join(["python", "benchmarks/search_vs_baselines.py", *sys.argv[1:]])
    result = {
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {args.workers} jobs x {args.threads} torch threads",
        "torch": torch.__version__,
        "dense": figures,
        "accuracy_floor": s["accuracy_floor"],
        "finetune_epochs": args.finetune_epochs,
        "seeds": args.seeds,
        "table": json.loads(s["table"].to_json(orient="records")),
        "smallest_at_floors": json.loads(s["smallest"].to_json(orient="records")),
        "latency": lat,
        "goals": goal_rows,
    }
    (args.out / "search-vs-baselines.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    if not args.no_readme and update_readme(table_md):
        print("README.md table updated", file=sys.stderr)
    print(table_md)


if __name__ == "__main__":
    main()
