"""Issue 15's goal: at equal measured latency, is a latency-budgeted study's pick at least as accurate as a
MACs-budgeted study's pick?

Per seed, two channel studies on the real CIFAR-10 subset, both ``studies/subset-channel.toml`` with the
same dense VGG (``--checkpoint``, or trained once by autoprune's dense training and cached), seed, trials
and everything else equal (the studies' defaults: ``[latency]`` torch eager, 1 thread, batch 1; the
re-scoring of ``[select]``):

* arm A, budgeted by MACs: ``[constraints] max_macs_fraction = --macs``. Its pick (``autoprune.pick.pick``,
  what ``autoprune pick`` runs) has a measured ``latency_fraction`` L (its latency / the dense model's,
  timed side by side when the trial ran);
* arm B, budgeted by latency: the same study with ``max_latency_fraction = L`` instead of the MACs cap.

The size cap is lifted in both (MACs alone against latency alone) and so is the accuracy floor
(``--max-drop``, as in ``search_vs_baselines.py``: a pick must exist to be compared). Per seed: B's pick -
A's pick in test and validation accuracy (the re-scored estimate the pick ranks by), measured latency
fraction and MACs fraction, then the mean with a 95% t interval over seeds, and whether B's pick measured
<= L. Latency on a shared machine is noisy: the load average is recorded before and after every study.

Each finished study is one JSON file in ``--work``/jobs (written atomically); a rerun skips it and a study
resumes from its SQLite file. ``--summarize`` rebuilds the outputs from the kept files alone.

    python benchmarks/latency_budget.py --checkpoint DENSE.pt --trials 8 --seeds 0,1,2,3,4   # ~36 min, 2 cores
    python benchmarks/latency_budget.py --summarize

Writes ``benchmarks/results/latency-budget.json`` and ``latency-budget.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from statistics import median
from multiprocessing import get_context
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's autoprune, not an installed one
sys.path.insert(0, str(REPO / "benchmarks"))

from autoprune.config import StudyConfig, load_config  # noqa: E402
from autoprune.files import atomic_write  # noqa: E402
from search_vs_baselines import hms, paired  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
STUDY_TOML = REPO / "studies" / "subset-channel.toml"
ARMS = ("macs", "latency")
# What is compared (B - A), in the order of the table: (key of a pick record, label, format)
METRICS = (("test_accuracy", "test accuracy (points)", "{:+.2f}"),
           ("val_accuracy", "validation accuracy, as picked (points)", "{:+.2f}"),
           ("latency_fraction", "measured latency fraction", "{:+.3f}"),
           ("macs_fraction", "MACs fraction", "{:+.3f}"))
PICK_KEYS = ("trial", "val_accuracy", "val_first", "test_accuracy", "latency_fraction", "latency_ms",
             "latency_dense_ms", "latency_predicted_fraction", "latency_predicted_ms", "latency_prediction_error",
             "macs_fraction", "size_fraction")


def job_name(seed: int, arm: str) -> str:
    return f"s{seed}-{arm}"


def study_config(args, seed: int, arm: str, cap: float, checkpoint: str) -> StudyConfig:
    """The shipped channel study with only what the comparison fixes overridden (see the module doc)."""
    name = job_name(seed, arm)
    config = load_config(STUDY_TOML, name=name, trials=args.trials, seed=seed)
    config.model.width = args.width
    config.model.checkpoint = checkpoint
    config.study.out_dir = str(args.work)  # shared: the sensitivity scan and the latency table are cached once
    config.study.storage = f"sqlite:///{args.work / (name + '.db')}"
    c = config.constraints
    c.max_size_fraction = 1.0
    c.min_accuracy, c.max_accuracy_drop = None, args.max_drop
    if arm == "macs":
        c.max_macs_fraction, c.max_latency_fraction = cap, None
    else:
        c.max_macs_fraction, c.max_latency_fraction = None, cap
    return config.validate()


def pick_record(storage_url: str, name: str) -> dict:
    """The study's pick as ``autoprune pick`` chooses it (None when nothing qualifies), and every trial."""
    from optuna.trial import TrialState

    from autoprune.errors import NothingQualifies
    from autoprune.pick import is_feasible, pick, study_scores
    from autoprune.study import open_existing

    study, own = open_existing(storage_url, name)
    score = study_scores(study)
    try:
        best = pick(study, own)[0]
    except NothingQualifies as exc:
        best, why = None, str(exc)
    else:
        why = ""

    def brief(t):
        a = t.user_attrs
        out = {k: a.get(k) for k in PICK_KEYS if k in a}
        out.update(trial=t.number, val_first=a["val_accuracy"], feasible=is_feasible(t),
                   val_accuracy=score[t.number].estimate if t.number in score else a["val_accuracy"])
        return out

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return {"pick": brief(best) if best else None, "no_pick": why, "trials": [brief(t) for t in trials],
            "trial_seconds": sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials)}


def run_seed(args, seed: int, checkpoint: str, index: int, total: int) -> list[dict]:
    """Arm A, then arm B at A's measured latency fraction; each kept as a job file (skipped when kept)."""
    from autoprune.search import run_search

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    out = []
    for k, arm in enumerate(ARMS):
        path = args.work / "jobs" / f"{job_name(seed, arm)}.json"
        if path.is_file():
            out.append(json.loads(path.read_text()))
            continue
        if arm == "macs":
            cap = args.macs
        else:
            a = out[0]["pick"]
            if a is None or a.get("latency_fraction") is None:
                print(f"seed {seed}: arm A has no pick with a measured latency; arm B skipped", file=sys.stderr)
                break
            cap = round(float(a["latency_fraction"]), 6)
        i = index + k
        print(f"[study {i}/{total}] seed {seed}, arm {'A (MACs' if arm == 'macs' else 'B (latency'} <= {cap:.4g}): "
              f"{args.trials} trials ...", file=sys.stderr, flush=True)
        config = study_config(args, seed, arm, cap, checkpoint)
        load_before = os.getloadavg()
        start = time.perf_counter()
        run_search(config, device="cpu", progress=False)
        record = pick_record(config.storage_url, config.study.name)
        record.update(seed=seed, arm=arm, cap=cap, seconds=time.perf_counter() - start,
                      load_before=list(load_before), load_after=list(os.getloadavg()))
        atomic_write(path, json.dumps(record, indent=2))
        p = record["pick"]
        what = (f"pick #{p['trial']} val {p['val_accuracy']:.2f}% test {p['test_accuracy']:.2f}% "
                f"MACs {p['macs_fraction']:.3f} latency {p.get('latency_fraction', math.nan):.3f}" if p else
                "no pick: " + record["no_pick"])
        print(f"[study {i}/{total}] seed {seed}, arm {arm}: {what} ({hms(record['seconds'])}, load "
              f"{load_before[0]:.1f} -> {record['load_after'][0]:.1f})", file=sys.stderr, flush=True)
        out.append(record)
    return out


# --- the comparison (pure: tested in tests/test_benchmarks.py) ----------------------------


def compare(jobs: list[dict]) -> dict:
    """Per seed B - A on every metric, the paired means with 95% t intervals, and B within L."""
    by = {(j["seed"], j["arm"]): j for j in jobs}
    seeds = sorted({s for s, _ in by})
    rows = []
    for s in seeds:
        a, b = by.get((s, "macs")), by.get((s, "latency"))
        pa, pb = (a or {}).get("pick"), (b or {}).get("pick")
        row = {"seed": s, "A": pa, "B": pb, "L": b["cap"] if b else None}
        for key, _, _ in METRICS:
            row[key] = pb[key] - pa[key] if pa and pb and pb.get(key) is not None and pa.get(key) is not None else None
        # B ran and picked nothing within L: the latency budget gave no deployable config there (a miss)
        row["B_within_L"] = None if not b else bool(pb and pb["latency_fraction"] <= b["cap"] + 1e-12)
        row["B_trials_within_L"] = None if not (b and b.get("trials")) else (
            f"{sum(t.get('latency_fraction', math.inf) <= b['cap'] + 1e-12 for t in b['trials'])} of "
            f"{len(b['trials'])}")
        rows.append(row)
    diffs = {key: paired([r[key] for r in rows]) for key, _, _ in METRICS}
    within = [r["B_within_L"] for r in rows if r["B_within_L"] is not None]
    t = diffs["test_accuracy"]
    # The goal: B's pick at least as accurate (mean test difference >= 0) within A's measured latency.
    met = None if not within else bool(all(within) and t["mean"] >= 0)
    # The lookup table's error on the measured latency (predicted / measured - 1), per arm over every trial
    errors = {arm: [t["latency_prediction_error"] for j in jobs if j["arm"] == arm for t in j.get("trials", [])
                    if t.get("latency_prediction_error") is not None] for arm in ARMS}
    prediction = {arm: {"n": len(e), "median": float(median(e)) if e else None} for arm, e in errors.items()}
    return {"rows": rows, "diffs": diffs, "prediction": prediction, "within": f"{sum(within)} of {len(within)}", "goal_met": met,
            "goal_shown": None if met is None else bool(met and t["lo"] >= 0)}


def ci(d: dict, fmt: str) -> str:
    if d["n"] == 0:
        return "n/a"
    text = fmt.format(d["mean"])
    if math.isnan(d["lo"]):
        return f"{text} (n={d['n']}, no interval)"
    return f"{text} [{fmt.format(d['lo'])}, {fmt.format(d['hi'])}] (n={d['n']})"


def markdown(s: dict) -> str:
    """The per-seed table, the paired differences and the verdict."""
    def cell(p, key, fmt):
        return fmt.format(p[key]) if p and p.get(key) is not None else "-"

    lines = ["| seed | arm | cap | pick | MACs | measured latency | val (picked by) | test |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in s["rows"]:
        for arm, label, cap in (("A", "A: MACs", s["macs"]), ("B", "B: latency", r["L"])):
            p = r[arm]
            lines.append(f"| {r['seed']} | {label} | {'-' if cap is None else f'{cap:.3f}'} | "
                         f"{'#' + str(p['trial']) if p else 'none'} | {cell(p, 'macs_fraction', '{:.3f}')} | "
                         f"{cell(p, 'latency_fraction', '{:.3f}')} | {cell(p, 'val_accuracy', '{:.2f}')} | "
                         f"{cell(p, 'test_accuracy', '{:.2f}')} |")
    lines += ["", "| B - A (paired over seeds) | mean [95% t interval] |", "| --- | --- |"]
    lines += [f"| {label} | {ci(s['diffs'][key], fmt)} |" for key, label, fmt in METRICS]
    trials = ", ".join(f"seed {r['seed']} {r['B_trials_within_L']}" for r in s["rows"] if r["B_trials_within_L"])
    if trials:
        lines += ["", f"B's trials measured within L: {trials}."]
    pred = s.get("prediction", {})
    if any(pred.get(a, {}).get("median") is not None for a in ARMS):
        lines += ["", "Lookup table's error on the measured latency (predicted / measured - 1), median over trials: "
                  + ", ".join(f"{label} {pred[a]['median']:+.1%} ({pred[a]['n']} trials)" for a, label in
                              zip(ARMS, ("A", "B")) if pred.get(a, {}).get("median") is not None) + "."]
    verdict = {True: "met", False: "not met", None: "undecided (no pair)"}[s["goal_met"]]
    lines += ["", f"B's pick measured within L: {s['within']}. Goal (B's pick at least as accurate on test, "
                  f"mean difference >= 0, within A's measured latency): **{verdict}**"
              + (" (the interval does not exclude a loss)" if s["goal_met"] and not s["goal_shown"] else "") + "."]
    return "\n".join(lines) + "\n"


# --- main ---------------------------------------------------------------------------


def summarize(args, jobs: list[dict], meta: dict) -> dict:
    s = compare(jobs)
    s["macs"] = meta["macs"]
    loads = [(j["seed"], j["arm"], j["load_before"][0], j["load_after"][0]) for j in jobs]
    s.update(meta=meta, loads=[{"seed": a, "arm": b, "load_before": c, "load_after": d} for a, b, c, d in loads],
             summarized=datetime.now(timezone.utc).isoformat(timespec="seconds"),
             studies=[{k: j.get(k) for k in ("seed", "arm", "cap", "seconds", "trial_seconds", "no_pick", "trials")}
                      for j in jobs])
    return s


def write_outputs(args, s: dict) -> str:
    args.out.mkdir(parents=True, exist_ok=True)
    md = markdown(s)
    loads = [x for d in s["loads"] for x in (d["load_before"], d["load_after"])]
    if loads:
        md += (f"\nLoad average (1 min) around the studies: {min(loads):.1f} to {max(loads):.1f} on "
               f"{os.cpu_count()} CPUs; latency on a machine shared with other jobs is noisy (each fraction is "
               f"timed beside the dense model, which cancels part of the load).\n")
    md = f"`{s['meta']['command']}`\n\n" + md
    (args.out / "latency-budget.md").write_text(md)
    (args.out / "latency-budget.json").write_text(json.dumps(s, indent=2, default=float) + "\n")
    return md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",") if x])
    p.add_argument("--trials", type=int, default=8, help="trials per study (the same in both arms)")
    p.add_argument("--macs", type=float, default=0.5, help="arm A's max_macs_fraction")
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--max-drop", type=float, default=100.0, help="accuracy floor, points below dense (lifted)")
    p.add_argument("--checkpoint", default="", help="a dense checkpoint of --width (default: train one, cached)")
    p.add_argument("--workers", type=int, default=1, help="seeds in parallel (processes; each runs A then B)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (training)")
    p.add_argument("--work", type=Path, default=REPO / "reports" / "bench-latency-budget")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--summarize", action="store_true", help="only rebuild the outputs from the kept jobs")
    args = p.parse_args()
    args.work = args.work.resolve()
    (args.work / "jobs").mkdir(parents=True, exist_ok=True)
    meta_file = args.work / "meta.json"
    if not args.summarize:
        checkpoint = args.checkpoint
        if not checkpoint:
            from autoprune.prepare import dense_model

            base = study_config(args, 0, "macs", args.macs, "")
            checkpoint = str(dense_model(base, base.load_data(), torch.device("cpu"), progress=False)[1])
        meta = {"command": " ".join(["python", "benchmarks/latency_budget.py", *sys.argv[1:]]),
                "macs": args.macs, "trials": args.trials, "width": args.width, "seeds": args.seeds,
                "max_drop": args.max_drop, "workers": args.workers, "threads": args.threads,
                "checkpoint": checkpoint, "latency": "default [latency]: torch eager, 1 thread, batch 1",
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "load_before": list(os.getloadavg())}
        start, total = time.perf_counter(), 2 * len(args.seeds)
        work = [(args, s, checkpoint, 2 * i + 1, total) for i, s in enumerate(args.seeds)]
        if args.workers == 1:
            for w in work:
                run_seed(*w)
        else:
            with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
                list(pool.map(run_seed, *zip(*work)))
        meta.update(load_after=list(os.getloadavg()), wall_seconds=time.perf_counter() - start)
        atomic_write(meta_file, json.dumps(meta, indent=2))
    if not meta_file.is_file():
        sys.exit(f"latency_budget: no {meta_file}; run without --summarize first")
    meta = json.loads(meta_file.read_text())
    jobs = [json.loads(f.read_text()) for f in sorted((args.work / "jobs").glob("s*.json"))]
    jobs = [j for j in jobs if j["seed"] in meta["seeds"]]
    for j in jobs:  # the picks and trials again from the kept study files (nothing is retrained)
        db = args.work / f"{job_name(j['seed'], j['arm'])}.db"
        if args.summarize and db.is_file():
            j.update(pick_record(f"sqlite:///{db}", job_name(j["seed"], j["arm"])))
    if not jobs:
        sys.exit(f"latency_budget: no finished study in {args.work / 'jobs'}")
    print(write_outputs(args, summarize(args, jobs, meta)))


if __name__ == "__main__":
    main()
