"""The verdict: does the shipped search beat the best one-shot rule, paired over seeds?

Every method prunes the same dense VGG (trained once by autoprune's own dense
training and cached) and is fine-tuned by ``autoprune.baseline.finetune``,
the one fine-tune every config gets. Per (kind, target, seed):

* every one-shot rule (``autoprune.priors.ONE_SHOT_RULES``; fine-grained also
  the lab's by-hand rule) is fine-tuned once with that seed, and the best rule
  is chosen on the validation split;
* the shipped search is ``autoprune search`` on ``studies/subset-*.toml`` with
  only the target, seed, width, trials, storage, out_dir and the dense
  checkpoint overridden, plus the accuracy floor lifted (``--max-drop``: at
  the small targets no config reaches the studies' floor, so nothing would be
  feasible, re-scored or picked). It runs to ``--anytime`` trials (pick
  recorded), then resumes to ``--trials`` (pick recorded); its pick is
  ``autoprune.pick.pick`` (by the re-scored mean) and its test accuracy that of
  the kept weights (what export ships);
* per seed: pick test - best rule test, then the mean with a 95% t interval
  over seeds (and pick - each rule; pick - the pick at ``--anytime`` trials;
  pick - the first-score pick, which is what re-scoring buys);
* selection gap: the reported gap (first validation score - re-scored mean)
  against the gap seen on test, (first val - test) minus the rules' mean
  (val - test) at that seed (unselected configs give the split's offset);
  and its seed part, first test - the re-scores' mean test: re-scoring on the
  same validation images sees the fine-tune seeds' luck, not the images';
* equal compute (fine-grained, ``--screen-target``): the same study with
  ``[fidelity] screen`` and as many trials as fit in the shipped study's trial
  seconds.

Writes ``benchmarks/results/search-vs-baselines.{json,md,png}`` and the
per-config rows ``search-vs-baselines-rows.csv``, and rewrites README.md
between its ``search-vs-baselines`` markers. Resumable: each finished job is
one JSON file in ``reports/bench-verdict/jobs/`` (written atomically) and a
rerun skips it; a study resumes from its SQLite file.

    python benchmarks/search_vs_baselines.py --plan                # the job plan and its estimated time only
    python benchmarks/search_vs_baselines.py                       # ~2.9 h on 2 CPU cores
    python benchmarks/search_vs_baselines.py --only fine_grained:0.10   # one part first
    python benchmarks/search_vs_baselines.py --summarize           # tables/figure from the kept jobs only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autoprune import metrics  # noqa: E402
from autoprune.config import StudyConfig, load_config  # noqa: E402
from autoprune.files import atomic_write, replace_marked  # noqa: E402
from autoprune.priors import ONE_SHOT_RULES  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
STUDY_TOML = {"fine_grained": "subset-fine-grained.toml", "channel": "subset-channel.toml"}
# The by-hand rule's own scan: to 0.98, or no layer could go past 0.9 and size 0.05 were out of reach.
BY_HAND_GRID = [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98]
LABEL = {"uniform": "uniform", "global": "global magnitude", "lamp": "LAMP", "by_hand": "by hand (lab rule)",
         "tp_magnitude": "Torch-Pruning magnitude", "tp_lamp": "Torch-Pruning LAMP",
         "tp_bn_scale": "Torch-Pruning BN scale"}
# (kind, target) -> (least mean of pick - best rule, whether the 95% interval must lie above 0)
GOALS = {("fine_grained", 0.10): (1.0, True), ("fine_grained", 0.05): (1.0, True),
         ("fine_grained", 0.25): (-0.2, False), ("channel", 0.3333): (1.0, False)}
MARK_START, MARK_END = "<!-- search-vs-baselines:start -->", "<!-- search-vs-baselines:end -->"
# t quantile 0.975 for 1..30 degrees of freedom (beyond 30 the Cornish-Fisher series below is within 0.002)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


def rules(kind: str) -> list[str]:
    return list(ONE_SHOT_RULES[kind]) + (["by_hand"] if kind == "fine_grained" else [])


@dataclass(frozen=True)
class Job:
    kind: str  # fine_grained | channel
    target: float  # size fraction (fine-grained) or MACs fraction (channel)
    seed: int
    method: str  # a rule, "search" (the shipped study) or "screen" (the same with [fidelity] screen)

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.target:.4f}-s{self.seed}-{self.method}"

    @property
    def is_study(self) -> bool:
        return self.method in ("search", "screen")


def study_config(args, kind: str, target: float, seed: int, name: str, trials: int, checkpoint: str) -> StudyConfig:
    """The shipped study TOML with only what the comparison must fix overridden (see the module doc)."""
    config = load_config(REPO / "studies" / STUDY_TOML[kind], name=name, trials=trials, seed=seed)
    config.model.width = args.width
    config.model.checkpoint = checkpoint  # every method prunes the same dense model
    config.study.out_dir = str(args.work / kind)  # shared: each sensitivity scan is cached once
    config.study.storage = f"sqlite:///{args.work / kind / (name + '.db')}"
    c = config.constraints
    if kind == "fine_grained":
        c.max_size_fraction = target
    else:  # MACs alone, as the rules are held to
        c.max_size_fraction, c.max_macs_fraction = 1.0, target
    c.min_accuracy, c.max_accuracy_drop = None, args.max_drop
    if args.finetune_epochs:
        config.finetune.epochs = args.finetune_epochs
    if args.data:
        config.data.spec = args.data
    if args.val_size:
        config.data.val_size = args.val_size
    return config.validate()


# --- jobs (run in worker processes) ---------------------------------------------------


def run_rule(args, job: Job, checkpoint: str, scan) -> dict:
    """One rule's config at the target, fine-tuned once with the job's seed."""
    from autoprune.baseline import fine_tuned
    from autoprune.model import load_checkpoint
    from autoprune.plan import PruningPlan, prune
    from autoprune.priors import by_hand_rule, one_shot_pruned

    config = study_config(args, job.kind, job.target, job.seed, job.name, 1, checkpoint)
    data = config.load_data()
    dense = load_checkpoint(checkpoint)[0].eval()
    if job.method == "by_hand":
        df, dense_acc = scan
        ratios = by_hand_rule(df, dense_acc, dense.channels, job.kind, job.target, drop=2.0)
        pruned = prune(dense, PruningPlan(job.kind, ratios, "", tuple(dense.channels)))
    else:
        pruned, ratios = one_shot_pruned(job.method, dense, job.kind, job.target,
                                         metric="params" if job.kind == "fine_grained" else "macs")
    # the report's baseline path: the studies' fine-tune, then measured as a trial is
    figures = fine_tuned(pruned, dense, data, config, job.seed, desc=job.name)
    pruned.model.eval()
    return {**{k: figures[k] for k in ("val_accuracy", "test_accuracy", "size_fraction", "macs_fraction")},
            "plan": {k: round(float(v), 5) for k, v in ratios.items()}}


def study_record(config: StudyConfig, wall_seconds: float) -> dict:
    """What one stage of a study shows: its pick, the first-score pick, its costs."""
    import optuna
    from optuna.trial import TrialState

    from autoprune.errors import NothingQualifies
    from autoprune.pick import is_deployable, is_feasible, pick, qualified
    from autoprune.rescore import rescores

    study = optuna.load_study(study_name=config.study.name, storage=config.storage_url)
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    scores = rescores(study)
    try:
        picked = pick(study, config)[0]
    except NothingQualifies:
        picked = None
    # Picking by the first score alone, as before re-scoring: what re-scoring is measured against.
    first = max(qualified(study, config), key=lambda t: (t.user_attrs["val_accuracy"], -t.user_attrs[config.cost_attr]), default=None)

    def brief(t):
        if t is None:
            return None
        a, r = t.user_attrs, scores.get(t.number, {})
        return {"trial": t.number, "val_accuracy": r.get("first", a["val_accuracy"]),
                "test_accuracy": a["test_accuracy"], "rescore_n": r.get("n", 0), "rescore_mean": r.get("mean"),
                "gap": r.get("gap"), "rescore_test_mean": r.get("test_mean"), "size_fraction": a["size_fraction"],
                "macs_fraction": a["macs_fraction"]}

    return {"trials": len(trials), "pick": brief(picked), "first_score_pick": brief(first),
            "trial_seconds": sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials),
            "wall_seconds": wall_seconds,
            "rows": [{"trial": t.number, "val_accuracy": t.user_attrs["val_accuracy"],
                      "test_accuracy": t.user_attrs["test_accuracy"], "size_fraction": t.user_attrs["size_fraction"],
                      "macs_fraction": t.user_attrs["macs_fraction"], "deployable": is_deployable(t, config),
                      "feasible": is_feasible(t), "rescore_n": scores.get(t.number, {}).get("n", 0),
                      "rescore_mean": scores.get(t.number, {}).get("mean")} for t in trials]}


def with_rescore_test(args, result: dict) -> dict:
    """A job kept before its final pick recorded the re-scores' mean test: read it from the study file."""
    if "stages" not in result:
        return result
    pick = result["stages"][max(result["stages"], key=int)]["pick"]
    if not pick or "rescore_test_mean" in pick:
        return result
    import optuna

    j = result["job"]
    storage = f"sqlite:///{args.work / j['kind'] / (Job(**j).name + '.db')}"
    attrs = optuna.load_study(study_name=Job(**j).name, storage=storage).user_attrs
    pick["rescore_test_mean"] = attrs.get(f"rescore:{pick['trial']}", {}).get("test_mean")
    return result


def screen_trials(ship: dict, screen: int, candidate_seconds: float) -> int:
    """Trials of the screened study that cost the shipped study's trial seconds.

    A screened trial costs a shipped one plus ``screen`` cheap scores.
    """
    per_trial = ship["trial_seconds"] / ship["trials"]
    return max(1, round(ship["trial_seconds"] / (per_trial + screen * candidate_seconds)))


def cheap_score_seconds(config: StudyConfig, checkpoint: str) -> float:
    """One candidate's cheap score as the studies compute it: BatchNorm recalibration + validation pass."""
    from autoprune.model import load_checkpoint
    from autoprune.train import evaluate, recalibrate_bn

    data, model = config.load_data(), load_checkpoint(checkpoint)[0]
    start = time.perf_counter()
    recalibrate_bn(model, data.train, config.fidelity.bn_recal_batches, config.fidelity.bn_recal_batch_size, 0)
    evaluate(model, data.val)
    return time.perf_counter() - start


def run_study(args, job: Job, checkpoint: str, ship: dict | None) -> dict:
    """The shipped study to --anytime trials, then --trials (or the screened one, sized to equal seconds).

    Each stage's record is kept in a partial file, so a rerun after a crash resumes the study
    without recomputing (or contaminating) an earlier stage's pick.
    """
    from autoprune.search import run_search

    partial = args.work / "jobs" / f"{job.name}.partial.json"
    done = json.loads(partial.read_text()) if partial.is_file() else {"stages": {}}
    config = study_config(args, job.kind, job.target, job.seed, job.name, args.trials, checkpoint)
    if job.method == "screen":
        config.fidelity.screen = args.screen
        # sized once and kept: a rerun after a crash resumes the same study
        done.setdefault("size", screen_trials(ship, args.screen, cheap_score_seconds(config, checkpoint)))
        stages = [done["size"]]
    else:
        stages = [args.anytime, args.trials] if 0 < args.anytime < args.trials else [args.trials]
    for n in stages:
        if str(n) in done["stages"]:
            continue
        config.study.trials = n
        start = time.perf_counter()
        run_search(config, device=args.device, progress=False)
        done["stages"][str(n)] = study_record(config, time.perf_counter() - start)
        atomic_write(partial, json.dumps(done))
    return {"stages": done["stages"]}


def run_job(args, job: Job, checkpoint: str, scan, ship: dict | None) -> tuple[Job, dict | None, str]:
    """Run one job and keep its result (atomically); (job, result, error)."""
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    # The studies' trial lines go to the job's log, not between the progress lines of two processes.
    (args.work / "logs").mkdir(exist_ok=True)
    with open(args.work / "logs" / f"{job.name}.log", "a") as log, contextlib.redirect_stderr(log):
        try:
            if job.is_study:
                result = run_study(args, job, checkpoint, ship)
            else:
                result = {"rule": run_rule(args, job, checkpoint, scan)}
        except Exception as exc:  # one failed job must not end a 3-hour run; it is reported and rerun next time
            traceback.print_exc()
            return job, None, f"{type(exc).__name__}: {exc} (log: {log.name})"
    result.update(job=asdict(job), seconds=time.perf_counter() - start)
    atomic_write(args.work / "jobs" / f"{job.name}.json", json.dumps(result))
    (args.work / "jobs" / f"{job.name}.partial.json").unlink(missing_ok=True)
    return job, result, ""


# --- the plan -----------------------------------------------------------------------


def parts(args) -> list[tuple[str, float]]:
    """(kind, target) pairs in run order (goal targets first, as given), filtered by --only."""
    out = [("fine_grained", t) for t in args.fine_targets] + [("channel", t) for t in args.channel_targets]
    if args.only:
        out = [(k, t) for k, t in out if any(k == ok and (ot is None or np.isclose(t, ot)) for ok, ot in args.only)]
    return out


def plan_jobs(args) -> list[Job]:
    """Every job, longest first (studies, then screens, then rules): the shortest tail on 2 processes."""
    todo = parts(args)
    jobs = [Job(k, t, s, "search") for k, t in todo for s in args.seeds]
    if args.screen and any(k == "fine_grained" and np.isclose(t, args.screen_target) for k, t in todo):
        jobs += [Job("fine_grained", args.screen_target, s, "screen") for s in args.seeds]
    return jobs + [Job(k, t, s, r) for k, t in todo for s in args.seeds for r in rules(k)]


def finetune_seconds(args, dense, data, config: StudyConfig) -> dict:
    """Measured now: seconds of one fine-tune per (kind, target) and of one evaluation (for the plan)."""
    from autoprune.data import batches
    from autoprune.plan import PruningPlan, prune
    from autoprune.priors import one_shot_allocation
    from autoprune.train import evaluate

    torch.set_num_threads(args.threads)
    ft = config.finetune
    steps = math.ceil(len(data.train) / ft.batch_size)
    start = time.perf_counter()
    evaluate(dense, data.val)
    evals = time.perf_counter() - start
    out = {"eval": evals}
    for kind, target in parts(args):
        model = dense
        if kind == "channel":  # fine-grained masks leave the dense compute; channel pruning shrinks it
            ratios = one_shot_allocation("uniform", dense, kind, target, "macs")
            model = prune(dense, PruningPlan(kind, ratios, "", tuple(dense.channels))).model
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        times = []
        for i, (x, y) in enumerate(batches(data.train, ft.batch_size, shuffle=True, generator=torch.Generator())):
            t0 = time.perf_counter()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            if i == 4:
                break
        out[(kind, target)] = ft.epochs * (float(np.median(times[1:] or times)) * steps + evals)
        model.eval()
    return out


def estimate(job: Job, args, cost: dict, select) -> float:
    """Seconds of one job by the measured costs: a trial is a fine-tune and three evaluations."""
    ft, ev = cost[(job.kind, job.target)], cost["eval"]
    if not job.is_study:
        return ft + ev
    rescored = select.top_k * select.seeds  # fine-tunes of one re-score phase
    if job.method == "screen":
        return args.trials * (ft + 3 * ev) + rescored * ft
    stages = 0 < args.anytime < args.trials
    # a second phase re-scores only the newcomers among the top trials
    phases = 1 + (args.trials - args.anytime) / args.trials if stages else 1
    return args.trials * (ft + 3 * ev) + phases * rescored * ft


def hms(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


# --- statistics ---------------------------------------------------------------------


def t975(df: int) -> float:
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired(diffs) -> dict:
    """Mean of per-seed differences, its standard error and 95% t interval."""
    d = pd.Series(diffs, dtype=float).dropna()
    n = len(d)
    out = {"n": n, "mean": float(d.mean()) if n else math.nan, "sd": math.nan, "se": math.nan,
           "lo": math.nan, "hi": math.nan}
    if n >= 2:
        sd = float(d.std(ddof=1))
        se = sd / math.sqrt(n)
        out.update(sd=sd, se=se, lo=out["mean"] - t975(n - 1) * se, hi=out["mean"] + t975(n - 1) * se)
    return out


def best_rule(rule_rows: pd.DataFrame) -> pd.DataFrame:
    """Per (kind, target, seed): the rule with the highest validation accuracy (test is only reported)."""
    r = rule_rows.sort_values(["kind", "target", "seed", "val_accuracy"], ascending=[True, True, True, False])
    return r.groupby(["kind", "target", "seed"], as_index=False).first()


def tables(results: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(rules, stages, configs): one row per rule fine-tune, per study stage, per fine-tuned config."""
    rule_rows, stage_rows, configs = [], [], []
    for res in results:
        key = {k: res["job"][k] for k in ("kind", "target", "seed", "method")}
        if "rule" in res:
            r = res["rule"]
            rule_rows.append({**key, "val_accuracy": r["val_accuracy"], "test_accuracy": r["test_accuracy"],
                              "seconds": res["seconds"]})
            configs.append({**key, "trials": None, "trial": None, **{k: v for k, v in r.items() if k != "plan"},
                            "deployable": True, "feasible": True, "plan": json.dumps(r["plan"])})
            continue
        last = max(res["stages"], key=int)
        for n, st in res["stages"].items():
            p, f = st["pick"] or {}, st["first_score_pick"] or {}
            stage_rows.append({**key, "trials": int(n), "pick_trial": p.get("trial"),
                               "pick_val": p.get("val_accuracy"), "pick_test": p.get("test_accuracy"),
                               "rescore_mean": p.get("rescore_mean"), "rescore_n": p.get("rescore_n"),
                               "gap": p.get("gap"), "rescore_test": p.get("rescore_test_mean"),
                               "first_test": f.get("test_accuracy"),
                               "trial_seconds": st["trial_seconds"], "wall_seconds": st["wall_seconds"],
                               "final": n == last})
        picked = (res["stages"][last]["pick"] or {}).get("trial")
        configs += [{**key, "trials": int(last), "picked": row["trial"] == picked, **row}
                    for row in res["stages"][last]["rows"]]
    cols = ["kind", "target", "seed", "method"]
    return (pd.DataFrame(rule_rows, columns=cols + ["val_accuracy", "test_accuracy", "seconds"]),
            pd.DataFrame(stage_rows, columns=cols + ["trials", "pick_trial", "pick_val", "pick_test", "rescore_mean",
                                                     "rescore_n", "gap", "rescore_test", "first_test", "trial_seconds",
                                                     "wall_seconds", "final"]),
            pd.DataFrame(configs).convert_dtypes())


def order(key: tuple[str, float]) -> tuple:
    """Tables read fine-grained first, then channel; larger targets first."""
    return key[0] != "fine_grained", -key[1]


def at(df: pd.DataFrame, kind: str, target: float) -> pd.DataFrame:
    return df[(df["kind"] == kind) & np.isclose(df["target"], target)]


def by_seed(df: pd.DataFrame, col: str) -> pd.Series:
    return df.set_index("seed")[col].astype(float)


def verdict(rule_rows: pd.DataFrame, stages: pd.DataFrame, configs: pd.DataFrame) -> list[dict]:
    """Per (kind, target), one line per method: mean test and the paired difference pick - method.

    Also the headroom: the study's best feasible trial chosen on *test*, an upper bound that no
    selection among those trials can pass (not a method).
    """
    out = []
    best = best_rule(rule_rows) if len(rule_rows) else rule_rows
    search = stages[stages["method"] == "search"]
    for (kind, target), g in sorted(search.groupby(["kind", "target"]), key=lambda x: order(x[0])):
        final = g[g["final"]]
        pick = by_seed(final, "pick_test")
        n_final = int(final["trials"].max())
        lines = [(LABEL.get(m, m), by_seed(h, "test_accuracy"), h["seconds"].mean())
                 for m, h in at(rule_rows, kind, target).groupby("method", sort=False)]
        b = at(best, kind, target)
        chosen = ", ".join(f"{LABEL.get(m, m)} x{c}" for m, c in b["method"].value_counts().items())
        lines.append((f"best rule, chosen on validation ({chosen})", by_seed(b, "test_accuracy"), math.nan))
        walls = g.groupby("seed")["wall_seconds"].sum()
        for n, h in g[~g["final"]].groupby("trials"):
            lines.append((f"search, pick after {n} trials", by_seed(h, "pick_test"), h["wall_seconds"].mean()))
        lines.append((f"search, first score alone after {n_final} trials (no re-score)", by_seed(final, "first_test"),
                      math.nan))
        trials = at(configs[(configs["method"] == "search") & configs["feasible"].astype(bool)], kind, target)
        lines.append(("headroom: the study's best trial chosen on test (an upper bound, not a method)",
                      trials.groupby("seed")["test_accuracy"].max().astype(float), math.nan))
        for label, test, seconds in lines:
            out.append({"kind": kind, "target": target, "method": label, "seeds": int(test.notna().sum()),
                        "test_mean": float(test.mean()), "test_sd": float(test.std(ddof=1)), "seconds": seconds,
                        "pick_minus": paired(pick - test)})
        out.append({"kind": kind, "target": target, "method": f"search, the pick after {n_final} trials",
                    "seeds": int(pick.notna().sum()), "test_mean": float(pick.mean()),
                    "test_sd": float(pick.std(ddof=1)), "seconds": float(walls.mean()), "pick_minus": None})
    return out


def selection_gaps(rule_rows: pd.DataFrame, stages: pd.DataFrame) -> pd.DataFrame:
    """Per (kind, target, seed): the pick's reported gap and the gap seen on test (see the module doc)."""
    final = stages[(stages["method"] == "search") & stages["final"]]
    offset = (rule_rows.assign(o=rule_rows["val_accuracy"] - rule_rows["test_accuracy"])
              .groupby(["kind", "target", "seed"], as_index=False)["o"].mean())
    g = final.merge(offset, on=["kind", "target", "seed"])
    g["reported_gap"] = g["gap"].astype(float)
    g["test_gap"] = g["pick_val"] - g["pick_test"] - g["o"]
    g["difference"] = g["reported_gap"] - g["test_gap"]
    g["seed_gap"] = g["pick_test"] - g["rescore_test"].astype(float)
    g["seed_difference"] = g["reported_gap"] - g["seed_gap"]
    return g[["kind", "target", "seed", "reported_gap", "test_gap", "difference", "seed_gap", "seed_difference"]]


def equal_compute(stages: pd.DataFrame) -> list[dict]:
    """Screened vs shipped study per target: trials, seconds, the pick's test and the paired difference."""
    out = []
    for (kind, target), g in stages[stages["method"] == "screen"].groupby(["kind", "target"]):
        ship = at(stages[(stages["method"] == "search") & stages["final"]], kind, target)
        screen = g[g["final"]]
        out.append({"kind": kind, "target": target,
                    "arms": {name: {"trials": float(h["trials"].mean()),
                                    "trial_seconds": float(h["trial_seconds"].mean()),
                                    "test_mean": float(h["pick_test"].mean())}
                             for name, h in (("full", ship), ("screen", screen))},
                    "screen_minus_full": paired(by_seed(screen, "pick_test") - by_seed(ship, "pick_test"))})
    return out


def decided(d: dict, holds) -> bool | None:
    """A goal's verdict; None (undecided) with fewer than 2 seeds: no interval."""
    return bool(holds) if d["n"] >= 2 else None


def goals(lines: list[dict], gaps: pd.DataFrame, stages: pd.DataFrame, compute: list[dict]) -> list[dict]:
    out = []
    for (kind, target), (least, above_zero) in GOALS.items():
        line = next((x for x in lines if x["kind"] == kind and np.isclose(x["target"], target)
                     and x["method"].startswith("best rule")), None)
        if line is None:
            continue
        d = line["pick_minus"]
        what = "size" if kind == "fine_grained" else "MACs"
        rule = f"mean >= {least:+.1f}" + (", 95% interval above 0" if above_zero else "")
        out.append({"goal": f"{kind.replace('_', '-')} {what} {target:g}: pick - best rule on test, {rule}",
                    "measured": ci_text(d), "met": decided(d, d["mean"] >= least and (not above_zero or d["lo"] > 0)),
                    "kind": kind, "target": target, "rule": rule})
    search = stages[stages["method"] == "search"]
    early = search[~search["final"]].set_index(["kind", "target", "seed"])["pick_test"]
    late = search[search["final"]].set_index(["kind", "target", "seed"])["pick_test"]
    if len(early):
        d = paired((late - early).to_numpy())
        out.append({"goal": "anytime: the pick's test accuracy does not fall from the first to the last stage "
                            "(all targets pooled; met unless the 95% interval lies below 0)",
                    "measured": ci_text(d), "met": decided(d, d["hi"] >= 0)})
    if len(gaps):
        d = paired(gaps["difference"])
        out.append({"goal": "selection gap: reported (first - re-scored) minus seen on test, all targets pooled; "
                            "met when the 95% interval holds 0", "measured": ci_text(d),
                    "met": decided(d, d["lo"] <= 0 <= d["hi"])})
        d = paired(gaps["seed_difference"])
        out.append({"goal": "selection gap, seed part: reported minus (first test - the re-scores' mean test), "
                            "all targets pooled (explains the above; met when the 95% interval holds 0)",
                    "measured": ci_text(d), "met": decided(d, d["lo"] <= 0 <= d["hi"])})
    for c in compute:
        d = c["screen_minus_full"]
        out.append({"goal": f"equal compute at size {c['target']:g}: screened - fully fine-tuned study (reported)",
                    "measured": ci_text(d), "met": None})
    return out


# --- outputs ------------------------------------------------------------------------


def ci_text(d: dict | None) -> str:
    if not d or not d["n"]:
        return "none"
    if d["n"] < 2:
        return f"{d['mean']:+.2f} (1 seed)"
    return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] (se {d['se']:.2f})"


def yes_no(met: bool | None) -> str:
    return "-" if met is None else "yes" if met else "no"


def markdown(s: dict) -> str:
    d, st = s["dense"], s["settings"]
    se_one = 100 * math.sqrt(d["test_accuracy"] / 100 * (1 - d["test_accuracy"] / 100) / d["test_images"])
    lines = [f"Dense VGG width {d['width']:g} ({d['params']:,} parameters): validation {d['val_accuracy']:.2f}%, "
             f"test {d['test_accuracy']:.2f}% ({d['val_images']:,} validation, {d['test_images']:,} test images; one "
             f"test accuracy has a standard error of ~{se_one:.1f} points). Every config: the studies' "
             f"{st['finetune_epochs']}-epoch fine-tune; the search: {st['trials']} trials (pick also recorded after "
             f"{st['anytime']}), re-scored and picked as shipped; accuracy floor lifted (dense - {st['max_drop']:g}). "
             f"Seeds {', '.join(map(str, st['seeds']))}; **pick - method**: mean of the per-seed differences on "
             f"test, [95% t interval], (standard error). Cost: mean seconds per seed (1 process, "
             f"{st['threads']} torch thread).", "",
             "| pruning | target | method | seeds | test % (mean ± sd) | pick - method | cost s | goal | met |",
             "|---|---|---|---|---|---|---|---|---|"]
    for x in s["verdict"]:
        what = "size" if x["kind"] == "fine_grained" else "MACs"
        g = next((g for g in s["goals"] if g.get("kind") == x["kind"] and np.isclose(g["target"], x["target"])
                  and x["method"].startswith("best rule")), None)
        sd = f" ± {x['test_sd']:.2f}" if x["seeds"] > 1 else ""
        cost = "" if math.isnan(x["seconds"]) else f"{x['seconds']:.0f}"
        lines.append(f"| {x['kind'].replace('_', '-')} | {what} {x['target']:g} | {x['method']} | {x['seeds']} | "
                     f"{x['test_mean']:.2f}{sd} | {ci_text(x['pick_minus']) if x['pick_minus'] else ''} | {cost} | "
                     f"{g['rule'] if g else ''} | {yes_no(g['met']) if g else ''} |")
    gaps = s["gaps"]
    if len(gaps):
        lines += ["", "Selection gap of the pick (points): reported = first validation score - re-scored mean; on "
                  "test = (first validation score - test) - the rules' mean (validation - test) at that seed; seed "
                  "part on test = first test - the re-scores' mean test (re-scoring on the same validation images "
                  "sees the fine-tune seeds' luck, not the luck of the images).", "",
                  "| pruning | target | reported gap | gap on test | reported - on test | seed part on test | "
                  "reported - seed part |", "|---|---|---|---|---|---|---|"]
        for (kind, target), g in sorted(gaps.groupby(["kind", "target"]), key=lambda x: order(x[0])):
            lines.append(f"| {kind.replace('_', '-')} | {target:g} | {g['reported_gap'].mean():+.2f} | "
                         f"{g['test_gap'].mean():+.2f} | {ci_text(paired(g['difference']))} | "
                         f"{g['seed_gap'].mean():+.2f} | {ci_text(paired(g['seed_difference']))} |")
        lines.append(f"| all | | {gaps['reported_gap'].mean():+.2f} | {gaps['test_gap'].mean():+.2f} | "
                     f"{ci_text(paired(gaps['difference']))} | {gaps['seed_gap'].mean():+.2f} | "
                     f"{ci_text(paired(gaps['seed_difference']))} |")
    for c in s["equal_compute"]:
        a = c["arms"]
        lines += ["", f"Equal compute, fine-grained size {c['target']:g}: the shipped study against the same with "
                  f"`[fidelity] screen = {st['screen']}`, given as many trials as fit in the shipped study's trial "
                  f"seconds (mean per seed: {a['full']['trial_seconds']:.0f} s in {a['full']['trials']:.1f} trials "
                  f"vs {a['screen']['trial_seconds']:.0f} s in {a['screen']['trials']:.1f}). Test accuracy of the "
                  f"pick: {a['full']['test_mean']:.2f}% vs {a['screen']['test_mean']:.2f}%; screened - full "
                  f"{ci_text(c['screen_minus_full'])}."]
    lines += ["", "| goal | measured | met |", "|---|---|---|"]
    for g in s["goals"]:
        lines.append(f"| {g['goal']} | {g['measured']} | {yes_no(g['met'])} |")
    runs = "; ".join(f"`{c}`" for c in s["commands"])
    lines += ["", f"Jobs run by {runs} (last run started {s['date']}; summarized {s['summarized']}); {s['machine']}; "
              f"torch {s['torch']}.", "",
              "![search vs baselines](benchmarks/results/search-vs-baselines.png)"]
    return "\n".join(lines) + "\n"


def figure(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rule_rows, stages = s["rules"], s["stages"]
    best = best_rule(rule_rows)
    final = stages[(stages["method"] == "search") & stages["final"]]
    keys = sorted({(k, t) for k, t in zip(final["kind"], final["target"])}, key=order)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(keys)), 4.2))
    for i, (kind, target) in enumerate(keys):
        diff = by_seed(at(final, kind, target), "pick_test") - by_seed(at(best, kind, target), "test_accuracy")
        diff = diff.dropna()
        d = paired(diff)
        ax.scatter(np.full(len(diff), i) + np.linspace(-0.15, 0.15, len(diff)), diff, color="tab:gray", s=14, zorder=2)
        if d["n"] >= 2:
            ax.errorbar(i + 0.25, d["mean"], yerr=[[d["mean"] - d["lo"]], [d["hi"] - d["mean"]]], fmt="o",
                        color="tab:blue", capsize=4, zorder=3)
        goal = GOALS.get((kind, round(target, 4)))
        if goal:
            ax.hlines(goal[0], i - 0.3, i + 0.35, color="tab:red", ls="--", lw=1)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(keys)), [f"{'size' if k == 'fine_grained' else 'MACs'} {t:g}\n{k.replace('_', '-')}"
                                     for k, t in keys])
    ax.set_ylabel("pick - best rule, test points")
    ax.set_title("per seed (gray), mean and 95% interval (blue), goal (red dashes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_readme(table_md: str) -> bool:
    return replace_marked(REPO / "README.md", MARK_START, MARK_END, table_md)


def summarize(args, results: list[dict], dense: dict) -> dict:
    rule_rows, stages, configs = tables(results)
    lines = verdict(rule_rows, stages, configs)
    gaps = selection_gaps(rule_rows, stages)
    compute = equal_compute(stages)
    return {"dense": dense, "rules": rule_rows, "stages": stages, "configs": configs, "verdict": lines,
            "gaps": gaps, "equal_compute": compute, "goals": goals(lines, gaps, stages, compute),
            "settings": {"seeds": args.seeds, "trials": args.trials, "anytime": args.anytime,
                         "finetune_epochs": dense["finetune_epochs"], "max_drop": args.max_drop,
                         "screen": args.screen, "width": args.width, "threads": args.threads},
            "commands": dense.get("commands", [dense["command"]]), "machine": dense["machine"], "torch": dense["torch"],
            "date": dense["date"], "summarized": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def write_outputs(args, s: dict) -> str:
    args.out.mkdir(parents=True, exist_ok=True)
    table_md = markdown(s)
    s["configs"].to_csv(args.out / "search-vs-baselines-rows.csv", index=False)
    figure(s, args.out / "search-vs-baselines.png")
    (args.out / "search-vs-baselines.md").write_text(table_md)
    keep = {k: s[k] for k in ("commands", "date", "summarized", "machine", "torch", "dense", "settings", "verdict",
                              "goals", "equal_compute")}
    keep["selection_gaps"] = s["gaps"].to_dict(orient="records")
    keep["stages"] = s["stages"].to_dict(orient="records")
    keep["rules"] = s["rules"].to_dict(orient="records")
    (args.out / "search-vs-baselines.json").write_text(json.dumps(keep, indent=2, default=float) + "\n")
    if not args.no_readme and update_readme(table_md):
        print("README.md table updated", file=sys.stderr)
    return table_md


# --- main ---------------------------------------------------------------------------


def run_all(args, todo: list[Job], checkpoint: str, scan, cost: dict, select) -> int:
    """Run ``todo`` on --workers processes in order; a screen job waits for its shipped study.

    Prints one line per finished job with the elapsed time and an ETA (the plan's estimate of
    what is left, scaled by how the finished jobs compared with theirs). Returns the failures.
    """
    est = {j: estimate(j, args, cost, select) for j in todo}
    pending, running = list(todo), {}
    clock = {"start": time.perf_counter(), "estimated_done": 0.0, "n": 0, "failed": 0}

    def shipped(job):  # the shipped study's last stage, which sizes a screen job
        path = args.work / "jobs" / f"{Job(job.kind, job.target, job.seed, 'search').name}.json"
        if job.method != "screen" or not path.is_file():
            return None
        stages = json.loads(path.read_text())["stages"]
        return stages[max(stages, key=int)]

    def next_ready():
        return next((j for j in pending if j.method != "screen" or shipped(j) is not None), None)

    def report(job, result, error):
        clock["n"] += 1
        clock["estimated_done"] += est[job]
        clock["failed"] += bool(error)
        elapsed = time.perf_counter() - clock["start"]
        # wall seconds per estimated job-second so far (the processes' parallelism included) x what is left
        left = sum(est[j] for j in pending + list(running.values()))
        eta = left * elapsed / clock["estimated_done"]
        what = f"FAILED: {error}" if error else summary_line(job, result)
        print(f"[{clock['n']}/{len(todo)}] {job.name}: {what} (elapsed {hms(elapsed)}, ETA {hms(eta)})",
              file=sys.stderr, flush=True)

    if args.workers == 1:  # in this process: simpler to debug
        while (job := next_ready()) is not None:
            pending.remove(job)
            report(*run_job(args, job, checkpoint, scan, shipped(job)))
    else:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
            while pending or running:
                while len(running) < args.workers and (job := next_ready()) is not None:
                    pending.remove(job)
                    running[pool.submit(run_job, args, job, checkpoint, scan, shipped(job))] = job
                if not running:
                    break
                for future in wait(running, return_when=FIRST_COMPLETED)[0]:
                    del running[future]
                    report(*future.result())
    if pending:  # screens whose shipped study failed or was filtered out
        print(f"skipped {len(pending)} screen job(s): their shipped study has no result", file=sys.stderr)
    return clock["failed"]


def summary_line(job: Job, result: dict) -> str:
    if "rule" in result:
        r = result["rule"]
        return f"val {r['val_accuracy']:.2f}% test {r['test_accuracy']:.2f}% ({result['seconds']:.0f}s)"
    parts_ = []
    for n, st in sorted(result["stages"].items(), key=lambda x: int(x[0])):
        p = st["pick"]
        parts_.append(f"{n} trials: pick " + (f"#{p['trial']} test {p['test_accuracy']:.2f}%" if p else "none"))
    return "; ".join(parts_) + f" ({result['seconds']:.0f}s)"


def kind_targets(text: str) -> list[tuple[str, float | None]]:
    out = []
    for item in filter(None, text.split(",")):
        kind, _, target = item.partition(":")
        if kind not in STUDY_TOML:
            raise argparse.ArgumentTypeError(f"--only takes KIND[:TARGET],... with KIND fine_grained or channel, "
                                             f"got {item!r}")
        out.append((kind, float(target) if target else None))
    return out


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2,3,4", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--fine-targets", default="0.10,0.05,0.25", type=floats, help="size fractions (run in this order)")
    p.add_argument("--channel-targets", default="0.3333,0.5", type=floats, help="MACs fractions: 3x and 2x fewer")
    p.add_argument("--only", default=[], type=kind_targets, help="KIND[:TARGET],... e.g. fine_grained:0.10")
    p.add_argument("--trials", type=int, default=0, help="the search's trials (default: the study TOML's)")
    p.add_argument("--anytime", type=int, default=10, help="the pick is also recorded after this many trials (0: no)")
    p.add_argument("--screen", type=int, default=8, help="[fidelity] screen of the equal-compute arm (0: skip it)")
    p.add_argument("--screen-target", type=float, default=0.10, help="fine-grained size of the equal-compute arm")
    p.add_argument("--width", type=float, default=0.125, help="VGG width (the studies ship 0.25; 0.125 fits 3 hours)")
    p.add_argument("--finetune-epochs", type=int, default=0, help="default: the study TOMLs' [finetune] epochs")
    p.add_argument("--max-drop", type=float, default=100.0,
                   help="accuracy floor, points below dense validation (default: lifted; see the module doc)")
    p.add_argument("--checkpoint", default="", help="a dense checkpoint of --width (default: train one, cached)")
    p.add_argument("--data", default="", help="data spec (default: the studies' subset), e.g. synthetic:600")
    p.add_argument("--val-size", type=int, default=0, help="validation images (default: the studies')")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=2, help="jobs in parallel (processes; 1: in this process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job")
    p.add_argument("--work", type=Path, default=REPO / "reports" / "bench-verdict")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--plan", action="store_true", help="print the job plan and its estimated time, then stop")
    p.add_argument("--summarize", action="store_true", help="only rebuild the outputs from the kept jobs")
    p.add_argument("--no-readme", action="store_true")
    args = p.parse_args()
    args.work = args.work.resolve()
    jobs_dir = args.work / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    base = study_config(args, "fine_grained", 0.25, 0, "dense", 1, args.checkpoint)
    args.trials = args.trials or load_config(REPO / "studies" / STUDY_TOML["fine_grained"]).study.trials
    jobs = plan_jobs(args)
    kept = [j for j in jobs if (jobs_dir / f"{j.name}.json").is_file()]
    todo = [j for j in jobs if j not in kept]
    dense_file = args.work / "dense.json"

    if not args.summarize:
        from autoprune.model import build_model
        from autoprune.prepare import dense_model
        from autoprune.sensitivity import scan_cached
        from autoprune.train import evaluate, resolve_device

        data = base.load_data()
        # Timing needs only the shapes: an untrained model of the width, so --plan trains nothing.
        cost = finetune_seconds(args, build_model("vgg", width=args.width).eval(), data, base)
        select = base.select  # [select] top_k trials re-scored with seeds other seeds
        total = sum(estimate(j, args, cost, select) for j in todo)
        count = {m: sum(j.method == m for j in todo) for m in ("search", "screen")}
        print(f"plan: {len(jobs)} jobs, {len(kept)} kept, {len(todo)} to run: {count['search']} searches of "
              f"{args.trials} trials (pick also after {args.anytime}), {count['screen']} screened searches, "
              f"{len(todo) - sum(count.values())} rule fine-tunes; seeds {args.seeds}. One fine-tune, measured now: "
              + ", ".join(f"{k[0].replace('_grained', '')} {k[1]:g} {v:.0f}s" for k, v in cost.items() if k != "eval")
              + f". Estimated {hms(total / args.workers)} on {args.workers} processes x {args.threads} threads "
              f"(+ the dense model's {base.model.train_epochs} epochs once)", file=sys.stderr, flush=True)
        if args.plan:
            return
        torch.set_num_threads(max(args.threads, args.workers))  # the dense model trains before any job
        device = resolve_device(args.device)
        dense, checkpoint = dense_model(base, data.to(device), device, progress=False)
        dense = dense.cpu().eval()
        data = data.to("cpu")
        dense_figures = {"val_accuracy": evaluate(dense, data.val), "test_accuracy": evaluate(dense, data.test),
                         "params": metrics.count_params(dense), "macs": metrics.count_macs(dense),
                         "width": args.width, "checkpoint": str(checkpoint), "train_epochs": base.model.train_epochs,
                         "finetune_epochs": base.finetune.epochs, "val_images": len(data.val),
                         "train_images": len(data.train), "test_images": len(data.test),
                         # the run that made the jobs, for the outputs (also of a later --summarize)
                         "command": " ".join(["python", "benchmarks/search_vs_baselines.py", *sys.argv[1:]]),
                         "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                                    f"{args.workers} processes x {args.threads} torch threads",
                         "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        # every run that added jobs, in order (the parts of one table may come from several --only runs)
        before = json.loads(dense_file.read_text()) if dense_file.is_file() else {}
        commands = before.get("commands", [before["command"]] if "command" in before else [])
        dense_figures["commands"] = [c for c in commands if c != dense_figures["command"]] + [dense_figures["command"]]
        atomic_write(dense_file, json.dumps(dense_figures, indent=2))
        print(f"dense: val {dense_figures['val_accuracy']:.2f}% test {dense_figures['test_accuracy']:.2f}% "
              f"({checkpoint})", file=sys.stderr, flush=True)
        scan = None
        if any(j.method == "by_hand" for j in todo):
            df, dense_acc, _ = scan_cached(checkpoint, data, "fine_grained", BY_HAND_GRID, "", args.work / "by-hand",
                                           progress=False)
            scan = (df, dense_acc)
        failed = run_all(args, todo, str(checkpoint), scan, cost, select) if todo else 0
        if failed:
            print(f"{failed} job(s) failed; rerun the same command to retry them", file=sys.stderr)
    if not dense_file.is_file():
        sys.exit(f"search_vs_baselines: no {dense_file}; run without --summarize first")
    results = [with_rescore_test(args, json.loads((jobs_dir / f"{j.name}.json").read_text())) for j in jobs
               if (jobs_dir / f"{j.name}.json").is_file()]
    if not any("stages" in r and r["job"]["method"] == "search" for r in results):
        sys.exit(f"search_vs_baselines: no finished search in {jobs_dir}; nothing to compare yet")
    print(write_outputs(args, summarize(args, results, json.loads(dense_file.read_text()))))


if __name__ == "__main__":
    main()
