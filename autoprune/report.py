"""A study's report: trials table, figures, and one self-contained HTML page.

``write_report(storage_url, study_name, out_dir)`` writes into ``out_dir``
(default ``reports/<study>/``, the name made one safe path component by
:func:`autoprune.files.safe_name`):

* ``trials.csv``: every trial (all states), one column per layer ratio,
  metrics, constraints, feasibility, deployability, early stop;
* ``pareto.png``: cost fraction vs validation accuracy, with feasible,
  infeasible and not-fully-fine-tuned trials told apart, Optuna's front
  (``study.best_trials``) as a step line, the constraint lines, the dense
  model, the uniform-pruning baseline and the picked config;
* channel studies: ``accuracy_vs_macs.png``, ``accuracy_vs_latency.png`` (with
  the latency-accuracy front of the feasible, fully fine-tuned trials) and
  ``latency_predicted_vs_measured.png`` (the lookup table against the
  measured latency, per trial);
* ``picked_layers.png``: the pick's per-layer ratios beside each layer's
  share of the dense parameters;
* ``sensitivity-<kind>.png`` (copied from the study's folder when the scan
  wrote one), ``history.png`` and ``importances.png`` (Optuna's plots);
* ``report.md`` and ``report.html`` (images embedded as data URIs).

The uniform baseline (every layer pruned alike, exactly at the cap, fine-tuned
with the study's recipe on the study's data) is computed once and cached in
``out_dir/baseline-cache.json``, keyed by the checkpoint's sha256, the plan,
the recipe and the data; a damaged cache is ignored and rewritten. Storage URLs
are written only redacted, so a password never reaches a report file; the
study's own text (name, data, paths) is escaped in report.md and report.html
and never read as math in figure titles. Every file is replaced whole or not
at all (:func:`autoprune.files.atomic_path`).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import json
import logging
import math
import os
import re
import shutil
import statistics
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from .config import StudyConfig
from .errors import AutopruneError, NothingQualifies
from .files import atomic_path, file_digest, safe_name
from .pick import (format_score, has_weights, is_deployable, is_feasible, named_constraints, pick, study_limits,
                   study_scores)
from .storage import redact, redacted_config
from .study import open_existing

log = logging.getLogger("autoprune")

ACCURACY_NOTE = ("Validation accuracy is measured on a split carved from the training images and is what "
                 "the search and pick select on. Test accuracy is measured on the held-out test split and "
                 "is reported only: it is never used to choose a trial.")

COLORS = {"feasible": "tab:blue", "infeasible": "0.55", "partial": "tab:orange", "front": "tab:green",
          "dense": "black", "baseline": "tab:red", "pick": "tab:purple"}


# --- helpers ---------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def _report_file(path: Path) -> Iterator[Path]:
    """A temporary path that replaces ``path`` once written (see autoprune.files); a failure is one line."""
    try:
        with atomic_path(path) as tmp:
            yield tmp
    except OSError as exc:
        raise AutopruneError(f"cannot write {path}: {exc.strerror or exc}; free some space or choose another "
                             f"--out") from None


def _save(fig, path: Path) -> Path:
    try:
        with _report_file(path) as tmp:
            fig.savefig(tmp)
    finally:
        _pyplot().close(fig)
    return path


def _write_text(path: Path, text: str) -> Path:
    with _report_file(path) as tmp:
        tmp.write_text(text)
    return path


def _category(t: FrozenTrial, config: StudyConfig) -> str:
    if not is_deployable(t, config):
        return "partial"
    return "feasible" if is_feasible(t) else "infeasible"


def _fmt(v, digits=4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


# --- trials table ----------------------------------------------------------------


def trials_frame(study: optuna.Study, config: StudyConfig) -> pd.DataFrame:
    """One row per trial, every state."""
    from .plan import layers_for

    layers = list(layers_for(config.study.kind))
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        row = {"number": t.number, "state": t.state.name,
               "datetime_start": t.datetime_start, "datetime_complete": t.datetime_complete,
               "duration_s": t.duration.total_seconds() if t.duration else None}
        plan = a.get("plan") or {}
        for layer in layers:
            row[f"plan_{layer}"] = plan.get(layer, 0.0) if "plan" in a else None
        for key in ("size_fraction", "nonzero_size_mib", "params", "nonzero_params", "macs", "macs_fraction",
                    "latency_ms", "latency_iqr_ms", "latency_fraction", "latency_predicted_ms",
                    "latency_prediction_error", "val_accuracy", "val_accuracy_before_finetune", "test_accuracy",
                    "finetune_seconds", "finetune_epochs_done", "fidelity", "repaired"):
            row[key] = a.get(key)
        complete = t.state == TrialState.COMPLETE
        row["feasible"] = is_feasible(t) if complete else None
        row["deployable"] = is_deployable(t, config)
        row["stopped_early"] = "stopped_early_at_epoch" in a
        row["stopped_early_at_epoch"] = a.get("stopped_early_at_epoch")
        row["has_weights"] = has_weights(t)
        for name, value in sorted(named_constraints(t).items()):
            row[f"constraint_{name}"] = value
        row["channels"] = "-".join(str(c) for c in a["channels"]) if "channels" in a else None
        for layer in layers:
            if layer in t.params:
                row[f"proposed_{layer}"] = t.params[layer]
        rows.append(row)
    return pd.DataFrame(rows)


# --- the uniform baseline --------------------------------------------------------


def _search_cwd(study: optuna.Study, config: StudyConfig) -> Path | None:
    """The directory the search ran from (its relative paths are relative to it)."""
    art = study.user_attrs.get("artifact_dir")
    rel = config.out_dir
    if not art or rel.is_absolute():
        return None
    out = Path(art).parent
    n = len(rel.parts)
    if out.parts[-n:] == rel.parts:
        return Path(*out.parts[:-n]) if len(out.parts) > n else Path("/")
    return None


def _checkpoint_path(study: optuna.Study, config: StudyConfig) -> Path | None:
    ckpt = study.user_attrs.get("checkpoint")
    if not ckpt:
        return None
    candidates = [Path(ckpt)]
    cwd = _search_cwd(study, config)
    if cwd is not None and not Path(ckpt).is_absolute():
        candidates.append(cwd / ckpt)
    return next((c for c in candidates if c.is_file()), None)


def baseline_plan(config: StudyConfig, channels, num_classes: int = 10, dense_figures: dict | None = None):
    """Uniform pruning exactly at the study's cap(s): equal preferences for every layer (a latency cap by the
    latency fit the study recorded in ``dense_figures``)."""
    from . import budget
    from .plan import PruningPlan

    from .latency import LatencyFit
    from .space import study_latency_budget

    c = config.constraints
    kind = config.study.kind
    round_to = config.pruning.round_to
    if kind == "fine_grained":
        ratios = budget.fine_grained_budget(channels, c.max_size_fraction, num_classes=num_classes)
    else:
        ratios = budget.channel_budget(channels, c.max_size_fraction, "params", num_classes=num_classes,
                                       round_to=round_to)
        caps = [("macs", c.max_macs_fraction, None)]
        if config.latency_budget:  # by this machine's lookup table (cached where the search ran here)
            cap, predictor = study_latency_budget(config, channels, num_classes,
                                                  fit=LatencyFit.from_figures(dense_figures))
            caps.append(("latency", cap, predictor))
        for metric, cap, predictor in caps:
            if cap is not None:
                by_cap = budget.channel_budget(channels, cap, metric, num_classes=num_classes, round_to=round_to,
                                               latency=predictor)
                ratios = {n: max(r, by_cap[n]) for n, r in ratios.items()}
    return PruningPlan(kind, {n: r for n, r in ratios.items() if r > 0}, config.study.criterion, tuple(channels),
                       round_to)


def uniform_baseline(study: optuna.Study, config: StudyConfig, out_dir: Path, device="auto",
                     progress: bool = False) -> dict:
    """Prune the dense checkpoint uniformly at the cap, fine-tune by the study's recipe, measure (cached)."""
    from . import metrics
    from .latency import Meter
    from .model import load_checkpoint
    from .objective import finetune
    from .plan import prune
    from .train import evaluate, resolve_device

    ua = study.user_attrs
    ckpt = _checkpoint_path(study, config)
    if ckpt is None and ua.get("checkpoint_artifact_id"):  # studies that upload their dense checkpoint
        try:
            from .export import artifact_store
            from .study import study_checkpoint

            ckpt = Path(study_checkpoint(study, artifact_store(study)[0]))
        except ImportError:
            pass
    if ckpt is None:
        raise AutopruneError(f"the study's dense checkpoint {ua.get('checkpoint')!r} was not found")
    sha = ua.get("checkpoint_sha256") or file_digest(ckpt)
    if file_digest(ckpt) != sha:
        raise AutopruneError(f"{ckpt} changed since the search ran (sha256 differs); the baseline would not be "
                             f"comparable")
    model, _ = load_checkpoint(ckpt)
    plan = baseline_plan(config, model.channels, model.num_classes, ua.get("dense"))
    d = config.data
    recipe = config.finetune_recipe().to_dict()
    key_src = {"checkpoint_sha256": sha, "plan": plan.to_dict(), "recipe": recipe,
               "distill": config.finetune.distill, "data": d.spec,
               "val_size": d.val_size, "data_seed": d.seed, "version": 1}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    cache_path = out_dir / "baseline-cache.json"
    cache = _read_baseline_cache(cache_path)
    hit = cache.get(key)
    if hit is not None and hit.get("key") == key and all(f in hit for f in _BASELINE_FIELDS):
        log.info("uniform baseline: reusing cached result %s", key)
        return {**hit, "from_cache": True}
    if hit is not None:
        log.warning("uniform baseline: ignoring the damaged entry %s of the cache %s", key, cache_path)
    log.info("uniform baseline: pruning %s uniformly at the cap and fine-tuning %d epoch(s)",
             config.study.kind, config.finetune.epochs)
    dev = resolve_device(device)
    data = config.load_data().to(dev)
    model.to(dev)
    pruned = prune(model, plan)
    net = pruned.model
    start = time.perf_counter()
    # The trials' own fine-tune (distillation from the dense model included when it is on).
    history = finetune(pruned, model, data, config, config.study.seed, progress=progress, desc="baseline")
    seconds = time.perf_counter() - start
    dense = ua.get("dense", {})
    figures = metrics.profile(net.cpu(), latency=False)
    net.to(dev)
    result = {
        "plan": plan.to_dict(), "val_accuracy": history[-1]["val_accuracy"], "test_accuracy": evaluate(net, data.test),
        "size_fraction": figures["nonzero_params"] / dense.get("params", figures["params"]),
        "macs_fraction": figures["macs"] / dense.get("macs", figures["macs"]), "macs": figures["macs"],
        "params": figures["params"], "nonzero_params": figures["nonzero_params"],
        "finetune_seconds": seconds, "finetune_epochs": len(history), "checkpoint_sha256": sha, "key": key,
    }
    if config.study.kind == "channel":  # as the trials measure it: [latency], beside the dense model
        meter = Meter.from_config(dataclasses.replace(config.latency, predict=False))
        lat = meter.figures(net, model)
        result.update({k: lat[k] for k in ("latency_ms", "latency_runtime", "latency_threads", "latency_fraction")})
    cache[key] = result
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_text(cache_path, json.dumps(cache, indent=2))
    return {**result, "from_cache": False}


_BASELINE_FIELDS = ("plan", "val_accuracy", "test_accuracy", "size_fraction", "macs_fraction", "finetune_epochs")


def _read_baseline_cache(path: Path) -> dict:
    """The cached baselines by key; a damaged cache counts as empty (and is rewritten after the next baseline)."""
    try:
        cache = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("uniform baseline: ignoring the unreadable cache %s (%s)", path, exc)
        return {}
    if not isinstance(cache, dict) or not all(isinstance(v, dict) for v in cache.values()):
        log.warning("uniform baseline: ignoring the damaged cache %s (not a JSON object of entries)", path)
        return {}
    return cache


# --- figures ---------------------------------------------------------------------


_LABELS = {"feasible": "feasible", "infeasible": "infeasible",
           "partial": "not fully fine-tuned (stopped early)"}


def _scatter_trials(ax, trials, config, x_of, pick_trial, baseline, dense_xy, baseline_x):
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    for cat, marker in (("infeasible", "x"), ("partial", "v"), ("feasible", "o")):
        pts = [(x_of(t), t.user_attrs["val_accuracy"]) for t in complete if _category(t, config) == cat]
        pts = [p for p in pts if p[0] is not None]
        if pts:
            kw = dict(facecolors="none") if cat == "partial" else {}
            ax.scatter(*zip(*pts), marker=marker, s=36, color=COLORS[cat] if cat != "partial" else None,
                       edgecolors=COLORS[cat] if cat == "partial" else None, label=f"{_LABELS[cat]} ({len(pts)})",
                       zorder=3, **kw)
    if dense_xy is not None and dense_xy[0] is not None:
        ax.scatter(*dense_xy, marker="*", s=160, color=COLORS["dense"], zorder=4,
                   label=f"dense ({dense_xy[1]:.2f}%)")
    if baseline and baseline_x is not None:
        ax.scatter(baseline_x, baseline["val_accuracy"], marker="D", s=60, color=COLORS["baseline"], zorder=4,
                   label=f"uniform at cap ({baseline['val_accuracy']:.2f}%)")
    if pick_trial is not None and x_of(pick_trial) is not None:
        ax.scatter(x_of(pick_trial), pick_trial.user_attrs["val_accuracy"], s=260, facecolors="none",
                   edgecolors=COLORS["pick"], linewidths=2.2, zorder=5, label=f"picked: trial {pick_trial.number}")
        ax.annotate(f"#{pick_trial.number}", (x_of(pick_trial), pick_trial.user_attrs["val_accuracy"]),
                    xytext=(8, 8), textcoords="offset points", color=COLORS["pick"], fontsize=9)


def _floor_line(ax, floor):
    if floor is not None:
        ax.axhline(floor, color="tab:red", ls="--", lw=1.1, label=f"accuracy floor {floor:.2f}%")


def _finish(ax, title, xlabel, floor=None):
    # Fit the accuracy axis to the points and the floor (a floor below 0% is drawn at the edge).
    ys = [y for coll in ax.collections for y in coll.get_offsets()[:, 1].tolist()]
    ys += [floor] if floor is not None else []
    if ys:
        lo, hi = max(0.0, min(ys)), min(100.0, max(ys))
        pad = max(1.0, 0.08 * (hi - lo))
        ax.set_ylim(max(-1.0, lo - pad), min(101.0, hi + pad))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation accuracy (%) [selection split]")
    ax.set_title(title, fontsize=10, parse_math=False)  # titles hold the study's name: a "$" is no math
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    ax.figure.tight_layout()


def plot_pareto(study, config, path: Path, pick_trial, baseline, floor) -> Path:
    plt = _pyplot()
    cost = config.cost_attr
    trials = study.get_trials(deepcopy=False)
    dense = study.user_attrs.get("dense", {})
    fig, ax = plt.subplots(figsize=(8.5, 5.8), dpi=110)
    _scatter_trials(ax, trials, config, lambda t: t.user_attrs.get(cost), pick_trial, baseline,
                    (1.0, dense.get("val_accuracy")) if dense.get("val_accuracy") is not None else None,
                    baseline.get(cost) if baseline else None)
    try:
        front = sorted(study.best_trials, key=lambda t: t.user_attrs[cost])
    except Exception:  # no complete trial yet
        front = []
    if front:
        ax.step([t.user_attrs[cost] for t in front], [t.user_attrs["val_accuracy"] for t in front], where="post",
                color=COLORS["front"], lw=1.8, zorder=2, marker="s", ms=10, mfc="none", mew=1.5,
                label=f"Pareto front, Optuna best_trials ({len(front)})")
    c = config.constraints
    cap = {"size_fraction": c.max_size_fraction, "macs_fraction": c.max_macs_fraction,
           "latency_fraction": c.max_latency_fraction}.get(cost)
    if cap is not None:
        ax.axvline(cap, color="tab:red", ls=":", lw=1.3, label=f"{cost.split('_')[0]} cap {cap:g}")
    _floor_line(ax, floor)
    what = {"size_fraction": "nonzero size", "macs_fraction": "MACs (conv + linear)",
            "latency_fraction": "measured latency"}.get(cost, cost)
    _finish(ax, f"{study.study_name}: {what} vs validation accuracy ({config.study.kind})",
            f"{cost} ({what} as a fraction of dense)", floor)
    return _save(fig, path)


def plot_channel_extra(study, config, out: Path, pick_trial, baseline, floor) -> dict[str, Path]:
    plt = _pyplot()
    trials = study.get_trials(deepcopy=False)
    dense = study.user_attrs.get("dense", {})
    written = {}
    specs = [("accuracy_vs_macs.png", lambda t: t.user_attrs.get("macs", 0) / 1e6, "macs", 1e6,
              "MACs per image, millions (conv + linear only)", "MACs"),
             ("accuracy_vs_latency.png", lambda t: t.user_attrs.get("latency_ms"), "latency_ms", 1.0,
              f"latency, ms (median, batch {config.latency.batch_sizes[0]}, {config.latency.runtime}, "
              f"{config.latency.threads or 'all'} thread(s), {config.latency.device} of the search machine)",
              "latency")]
    for name, x_of, key, scale, xlabel, what in specs:
        fig, ax = plt.subplots(figsize=(8.5, 5.8), dpi=110)
        dx = dense.get(key)
        _scatter_trials(ax, trials, config, x_of, pick_trial, baseline,
                        (dx / scale if dx is not None else None, dense.get("val_accuracy")),
                        baseline[key] / scale if baseline and key in baseline else None)
        if key == "latency_ms":
            front = latency_front([t for t in trials if t.state == TrialState.COMPLETE and is_feasible(t)
                                   and is_deployable(t, config)])
            if front:
                ax.step([t.user_attrs["latency_ms"] for t in front], [t.user_attrs["val_accuracy"] for t in front],
                        where="post", color=COLORS["front"], lw=1.8, zorder=2, marker="s", ms=10, mfc="none",
                        mew=1.5, label=f"latency-accuracy front, feasible ({len(front)})")
            cap_ms = config.constraints.max_latency_ms
            if cap_ms is None and config.constraints.max_latency_fraction is not None and dx:
                cap_ms = config.constraints.max_latency_fraction * dx  # drawn at the dense model's median here
            if cap_ms is not None:
                ax.axvline(cap_ms, color="tab:red", ls=":", lw=1.3, label=f"latency cap {cap_ms:.3g} ms")
        if key == "macs" and config.constraints.max_macs_fraction is not None and dx:
            ax.axvline(config.constraints.max_macs_fraction * dx / scale, color="tab:red", ls=":", lw=1.3,
                       label=f"MACs cap {config.constraints.max_macs_fraction:g} of dense")
        _floor_line(ax, floor)
        _finish(ax, f"{study.study_name}: {what} vs validation accuracy (channel pruning)", xlabel, floor)
        written[name] = _save(fig, out / name)
    predicted = plot_latency_prediction(study, out / "latency_predicted_vs_measured.png")
    if predicted is not None:
        written[predicted.name] = predicted
    return written


def latency_front(trials) -> list[FrozenTrial]:
    """The trials no other beats on both measured latency (lower) and validation accuracy (higher), by latency."""
    pts = sorted(trials, key=lambda t: (t.user_attrs["latency_ms"], -t.user_attrs["val_accuracy"], t.number))
    front, best = [], -math.inf
    for t in pts:
        if t.user_attrs["val_accuracy"] > best:
            front.append(t)
            best = t.user_attrs["val_accuracy"]
    return front


def prediction_errors(trials) -> list[float]:
    """Each complete trial's lookup-table prediction error, predicted / measured - 1."""
    return [t.user_attrs["latency_prediction_error"] for t in trials
            if t.state == TrialState.COMPLETE and "latency_prediction_error" in t.user_attrs]


def plot_latency_prediction(study, path: Path) -> Path | None:
    """Predicted (lookup table) vs measured latency of every complete trial, the dense model starred; None
    when no trial recorded a prediction."""
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if "latency_predicted_ms" in t.user_attrs and "latency_ms" in t.user_attrs]
    if not trials:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 6.0), dpi=110)
    xs = [t.user_attrs["latency_ms"] for t in trials]
    ys = [t.user_attrs["latency_predicted_ms"] for t in trials]
    ax.scatter(xs, ys, s=30, color=COLORS["feasible"], zorder=3, label=f"trials ({len(trials)})")
    dense = study.user_attrs.get("dense", {})
    if "latency_predicted_ms" in dense and "latency_ms" in dense:
        ax.scatter(dense["latency_ms"], dense["latency_predicted_ms"], marker="*", s=160, color=COLORS["dense"],
                   zorder=4, label="dense")
        xs, ys = xs + [dense["latency_ms"]], ys + [dense["latency_predicted_ms"]]
    lo, hi = 0.0, 1.05 * max(xs + ys)
    ax.plot([lo, hi], [lo, hi], color="0.3", lw=1.0, label="predicted = measured")
    ax.fill_between([lo, hi], [0.9 * lo, 0.9 * hi], [1.1 * lo, 1.1 * hi], color="0.5", alpha=0.15,
                    label="within 10%")
    errors = [abs(e) for e in prediction_errors(trials)]
    a = trials[0].user_attrs
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel(f"measured latency, ms (median, batch {a.get('latency_batch_size', 1)}, "
                  f"{a.get('latency_runtime', 'torch')}, {a.get('latency_threads', '?')} thread(s))")
    ax.set_ylabel("predicted latency, ms (per-layer lookup table)")
    ax.set_title(f"{study.study_name}: predicted vs measured latency; median |error| "
                 f"{100 * statistics.median(errors):.1f}%, largest {100 * max(errors):.1f}%", fontsize=10,
                 parse_math=False)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", framealpha=0.9)
    fig.tight_layout()
    return _save(fig, path)


def plot_picked_layers(study, config, trial: FrozenTrial, path: Path) -> Path:
    from . import budget
    from .model import vgg_channels

    plt = _pyplot()
    base = vgg_channels(config.model.width)  # the search checked the checkpoint has these widths
    num_classes = config.model.num_classes
    numels = budget.layer_numels(base, num_classes)
    total = budget.vgg_cost(base, num_classes)["params"]
    kind = config.study.kind
    layers = list(numels) if kind == "fine_grained" else [n for n in numels if n != "classifier"]
    plan = trial.user_attrs.get("plan") or {}
    ratios = [plan.get(n, 0.0) for n in layers]
    shares = [numels[n] / total for n in layers]
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    xs = range(len(layers))
    w = 0.4
    what = "sparsity (fraction of weights zeroed)" if kind == "fine_grained" else "channel prune ratio"
    b1 = ax.bar([x - w / 2 for x in xs], ratios, w, color=COLORS["pick"], label=f"picked trial {trial.number}: {what}")
    b2 = ax.bar([x + w / 2 for x in xs], shares, w, color="tab:gray", label="layer's share of dense parameters")
    for bars, vals in ((b1, ratios), (b2, shares)):
        for bar, v in zip(bars, vals):
            ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    labels = list(layers)
    if kind == "channel" and "channels" in trial.user_attrs:
        labels = [f"{n}\n{k}/{c}" for n, k, c in zip(layers, trial.user_attrs["channels"], base)]
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("fraction")
    ax.set_title(f"{study.study_name}: per-layer ratios of the picked config (trial {trial.number}) "
                 f"and each layer's share of parameters", fontsize=10, parse_math=False)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return _save(fig, path)


def _acc_target(config: StudyConfig):
    i = config.objectives.index("accuracy")
    return lambda t: t.values[i] if t.values is not None else float("nan")


def plot_history(study, config, path: Path) -> Path:
    from optuna.visualization.matplotlib import plot_optimization_history

    plt = _pyplot()
    with warnings.catch_warnings(), plt.style.context("default"):  # Optuna switches to ggplot globally
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        target = _acc_target(config) if len(config.objectives) > 1 else None
        ax = plot_optimization_history(study, target=target, target_name="validation accuracy (%)")
    ax.set_title(f"{study.study_name}: optimization history (validation accuracy, every complete trial)",
                 fontsize=10, parse_math=False)
    fig = ax.figure
    fig.set_size_inches(8.5, 5.2)
    fig.set_dpi(110)
    fig.tight_layout()
    return _save(fig, path)


def plot_importances(study, config, path: Path) -> Path:
    from optuna.visualization.matplotlib import plot_param_importances

    plt = _pyplot()
    with warnings.catch_warnings(), plt.style.context("default"):
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)
        target = _acc_target(config) if len(config.objectives) > 1 else None
        ax = plot_param_importances(study, target=target, target_name="validation accuracy")
    ax.set_title("")  # Optuna titles it on the left; one title, ours
    ax.set_title(f"{study.study_name}: parameter importances for validation accuracy (fANOVA)", fontsize=10,
                 loc="left", parse_math=False)
    fig = ax.figure
    fig.set_size_inches(8.5, 5.2)
    fig.set_dpi(110)
    fig.tight_layout()
    return _save(fig, path)


def _sensitivity_png(study, config) -> Path | None:
    name = f"sensitivity-{config.study.kind}.png"
    candidates = []
    art = study.user_attrs.get("artifact_dir")
    if art:
        candidates.append(Path(art).parent / name)
    candidates.append(config.out_dir / name)
    return next((c for c in candidates if c.is_file()), None)


# --- the text --------------------------------------------------------------------


def _wall_span(trials) -> float | None:
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    if not starts or not ends:
        return None
    return (max(ends) - min(starts)).total_seconds()


def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def _table(headers: list[str], rows: list[list]) -> dict:
    return {"headers": headers, "rows": [[_fmt(v) if not isinstance(v, str) else v for v in r] for r in rows]}


def _md_table(t: dict) -> str:
    lines = ["| " + " | ".join(t["headers"]) + " |", "|" + "---|" * len(t["headers"])]
    lines += ["| " + " | ".join(r) + " |" for r in t["rows"]]
    return "\n".join(lines)


def _html_table(t: dict) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t["headers"])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in t["rows"])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def build_sections(study, config, storage_url, pick_trial, pick_note, runners, baseline, baseline_note,
                   floor, limits) -> list[tuple[str, list]]:
    """The report as (heading, blocks); a block is ('p', text) | ('table', t) | ('img', name, caption) | ('pre', text)."""
    cost = config.cost_attr
    score = study_scores(study)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    feasible = [t for t in complete if is_feasible(t)]
    deployable = [t for t in complete if is_deployable(t, config)]
    stopped = [t for t in complete if "stopped_early_at_epoch" in t.user_attrs]
    states = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    dense = study.user_attrs.get("dense", {})
    ft_seconds = sum(t.user_attrs.get("finetune_seconds", 0.0) for t in complete)
    saved = sum(t.user_attrs.get("finetune_seconds_saved", 0.0) for t in complete)
    sections = []

    overview = [
        ("p", f"Study **{_md_text(study.study_name)}** in {_md_code(redact(storage_url))}: {config.study.kind} "
              f"pruning of a VGG (width {config.model.width:g}) on "
              f"{_md_code(study.user_attrs.get('data', config.data.spec))}; objectives "
              f"{', '.join(config.objectives)}; sampler {config.study.sampler} (seed {config.study.seed})."),
        ("p", f"Trials: {len(trials)} in all ({', '.join(f'{n} {k.lower()}' for k, n in sorted(states.items()))}); "
              f"**{len(feasible)} feasible** of {len(complete)} complete; {len(deployable)} fully fine-tuned "
              f"(deployable); {len(stopped)} stopped early."),
        ("p", f"Constraints: {limits.describe()} (accuracy floor {floor:.2f}%"
              + (f", i.e. dense {dense['val_accuracy']:.2f}% - {config.constraints.max_accuracy_drop:g} points"
                 if config.constraints.max_accuracy_drop is not None and 'val_accuracy' in dense else "") + ")."),
        ("p", f"Time spent: {_hms(ft_seconds)} of fine-tuning in all complete trials "
              f"({_hms(saved)} saved by early stop); wall span of the trials {_hms(_wall_span(trials))}."),
        ("p", "Dense model: " + ", ".join(
            x for x in [f"{dense['params']:,} parameters" if 'params' in dense else "",
                        f"{dense['macs'] / 1e6:.2f} M MACs (conv + linear)" if 'macs' in dense else "",
                        f"val {dense['val_accuracy']:.2f}%" if 'val_accuracy' in dense else "",
                        f"test {dense['test_accuracy']:.2f}%" if 'test_accuracy' in dense else "",
                        f"latency {dense['latency_ms']:.2f} ms" if 'latency_ms' in dense else ""] if x) + "."),
        ("p", "**Which split:** " + ACCURACY_NOTE),
    ]
    errors = [abs(e) for e in prediction_errors(complete)]
    if errors:
        a = next(t.user_attrs for t in complete if "latency_prediction_error" in t.user_attrs)
        overview.append(("p", f"Latency: {a.get('latency_runtime', 'torch')}, {a.get('latency_threads', '?')} "
                              f"thread(s), batch {a.get('latency_batch_size', 1)}; the per-layer lookup table "
                              f"predicted it with median error {100 * statistics.median(errors):.1f}% "
                              f"(largest {100 * max(errors):.1f}%) over {len(errors)} complete trials."))
    sections.append(("Overview", overview))

    blocks = []
    if pick_trial is None:
        blocks.append(("p", f"No config to recommend: {_md_text(pick_note)}"))
    else:
        a = pick_trial.user_attrs
        cost_txt = "" if cost == "size_fraction" else f"{cost} {a[cost]:.4f}, "
        rescored = format_score(score[pick_trial.number].to_dict()) if pick_trial.number in score else ""
        blocks.append(("p", f"Trial **{pick_trial.number}**: {cost_txt}size_fraction "
                            f"{a['size_fraction']:.4f} ({a['nonzero_size_mib']:.3f} MiB nonzero), val "
                            f"{a['val_accuracy']:.2f}% (first fine-tune), "
                            + (f"{rescored}, " if rescored else "")
                            + f"test {a['test_accuracy']:.2f}% (reported only)"
                       + (f", latency {a['latency_ms']:.2f} ms" if "latency_ms" in a else "")
                       + f". Chosen by `autoprune pick` (highest validation accuracy, re-scored where the search "
                         f"re-scored the leaders, among fully fine-tuned trials meeting {limits.describe()})."
                       + ("" if has_weights(pick_trial) else " Its weights were not kept.")))
        from .plan import layers_for

        plan = a.get("plan") or {}
        kept = a.get("channels")
        headers = ["layer", "ratio removed"] + (["channels kept"] if kept and config.study.kind == "channel" else [])
        rows = []
        for i, layer in enumerate(layers_for(config.study.kind)):
            row = [layer, f"{plan.get(layer, 0.0):.4f}"]
            if len(headers) == 3:
                row.append(str(kept[i]))
            rows.append(row)
        blocks.append(("table", _table(headers, rows)))
        blocks.append(("img", "picked_layers.png", "Per-layer ratios of the picked config beside each layer's "
                                                   "share of the dense parameters."))
        if runners:
            blocks.append(("p", "Runners-up: " + "; ".join(
                f"trial {t.number} ({cost} {t.user_attrs[cost]:.4f}, val {t.user_attrs['val_accuracy']:.2f}%)"
                for t in runners) + "."))
    sections.append(("Best feasible config", blocks))

    try:
        front = sorted(study.best_trials, key=lambda t: t.user_attrs[cost])
    except Exception:
        front = []
    costs = [cost] if cost == "size_fraction" else [cost, "size_fraction"]

    def rescored(t):
        s = score.get(t.number)
        if s is None or not s.rescored:
            return ["", ""]
        ci = f" ± {s.half_width:.2f}" if s.half_width is not None and math.isfinite(s.half_width) else ""
        return [f"{s.estimate:.2f}{ci} (n={s.rescored})", f"{s.gap:+.2f}"]

    prows = [[str(t.number), *(f"{t.user_attrs[c]:.4f}" for c in costs), f"{t.user_attrs['val_accuracy']:.2f}",
              *rescored(t), f"{t.user_attrs['test_accuracy']:.2f}", "yes" if is_feasible(t) else "no",
              "yes" if is_deployable(t, config) else "no", "yes" if has_weights(t) else "no"] for t in front]
    blocks = [("p", f"Optuna's `study.best_trials` ({len(front)} trials; constraint-aware: feasible trials only). "
                    "Re-scored: the mean validation accuracy of the extra fine-tunes (other seeds) the search ran for "
                    "its leading trials, with a 95% interval from the pooled spread; selection gap: first score "
                    "minus re-scored mean (how lucky the first fine-tune was)."),
              ("table", _table(["trial", *costs, "val acc (%)", "re-scored val (%)", "selection gap",
                                "test acc (%)", "feasible", "deployable", "weights kept"], prows)),
              ("img", "pareto.png", f"{cost} vs validation accuracy. Circles: feasible; crosses: infeasible; "
                                    "hollow triangles: stopped early (not fully fine-tuned); green steps: the "
                                    "Pareto front; star: dense; diamond: uniform pruning at the cap; ring: the "
                                    "picked config.")]
    if config.study.kind == "channel":
        blocks += [("img", "accuracy_vs_macs.png", "MACs (conv + linear) vs validation accuracy."),
                   ("img", "accuracy_vs_latency.png",
                    f"Latency (median of batch-{config.latency.batch_sizes[0]} {config.latency.runtime} runs at "
                    f"{config.latency.threads or 'all'} thread(s), {config.latency.device} of the search machine) "
                    f"vs validation accuracy; green steps: the latency-accuracy front of the feasible, fully "
                    f"fine-tuned trials."),
                   ("img", "latency_predicted_vs_measured.png",
                    "Latency predicted by the per-layer lookup table (what a latency budget is repaired on) vs "
                    "measured, per trial; the band is within 10%.")]
    sections.append(("Pareto front", blocks))

    blocks = []
    if baseline:
        blocks.append(("p", f"Uniform pruning at the cap ({baseline['plan']['kind']}, every layer alike: "
                            + ", ".join(f"{k}={v:.3f}" for k, v in baseline["plan"]["ratios"].items())
                            + f"), fine-tuned {baseline['finetune_epochs']} epoch(s) with the study's recipe: "
                              f"{cost} {baseline[cost]:.4f}, val {baseline['val_accuracy']:.2f}%, test "
                              f"{baseline['test_accuracy']:.2f}%"
                            + (f", latency {baseline['latency_ms']:.2f} ms" if "latency_ms" in baseline else "")
                            + (" (cached)." if baseline.get("from_cache") else ".")))
        if pick_trial is not None:
            diff = pick_trial.user_attrs["val_accuracy"] - baseline["val_accuracy"]
            blocks.append(("p", f"The picked config is {diff:+.2f} points of validation accuracy against it."))
    else:
        blocks.append(("p", f"Not computed: {_md_text(baseline_note)}"))
    sections.append(("Uniform baseline", blocks))

    sections.append(("Search diagnostics", [("img", "sensitivity.png", "Sensitivity scan: each layer pruned alone, "
                                                                       "no fine-tuning (validation split)."),
                                            ("img", "history.png", "Optimization history (validation accuracy)."),
                                            ("img", "importances.png", "Parameter importances for validation "
                                                                       "accuracy (fANOVA), over the sampler's "
                                                                       "proposed ratios (before the budget "
                                                                       "repair).")]))
    cfg_dump = json.dumps(redacted_config(config), indent=2, default=str)
    sections.append(("Study config", [("p", f"Storage: {_md_code(redact(storage_url))}; dense checkpoint: "
                                            f"{_md_code(study.user_attrs.get('checkpoint', ''))}."),
                                      ("pre", cfg_dump)]))
    return sections


def _md_text(text) -> str:
    """Untrusted text (a study's name, a path, an error) for a markdown paragraph: one line, every mark escaped."""
    return re.sub(r"([\\`*_{}\[\]<>|!#~&$])", r"\\\1", re.sub(r"[\x00-\x1f\x7f]", " ", str(text)))


def _md_code(text) -> str:
    """Untrusted text as one markdown code span (literal: fenced by more backticks than it holds)."""
    text = re.sub(r"[\x00-\x1f\x7f]", " ", str(text))
    fence = "`" * (max(map(len, re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def render_md(title: str, sections, images: dict[str, Path]) -> str:
    out = [f"# {_md_text(title)}", ""]
    for heading, blocks in sections:
        out += [f"## {heading}", ""]
        for b in blocks:
            if b[0] == "p":
                out += [b[1], ""]
            elif b[0] == "table":
                out += [_md_table(b[1]), ""]
            elif b[0] == "pre":
                fence = "`" * max(3, 1 + max(map(len, re.findall(r"`+", b[1])), default=0))
                out += [fence + "json", b[1], fence, ""]
            elif b[0] == "img" and b[1] in images:
                out += [f"![{b[2]}]({images[b[1]].name})", "", f"*{b[2]}*", ""]
    return "\n".join(out)


# A backslash escape, a code span (a run of backticks to the same run), or **bold** (escapes inside kept whole).
_INLINE = re.compile(r"\\([!-/:-@\[-`{-~])|(`+)(.+?)(?<!`)\2(?!`)|\*\*((?:\\.|[^\\])+?)\*\*")


def _inline_md(text: str) -> str:
    """The markdown of the paragraphs above (escapes, `code`, **bold**) as HTML, every text escaped."""
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[pos:m.start()]))
        if m.group(1) is not None:
            out.append(html.escape(m.group(1)))
        elif m.group(2):
            code = m.group(3)
            code = code[1:-1] if len(code) > 2 and code[0] == code[-1] == " " else code
            out.append(f"<code>{html.escape(code)}</code>")
        else:
            out.append(f"<strong>{_inline_md(m.group(4))}</strong>")
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


CSS = """body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;max-width:1080px;margin:24px auto;
padding:0 16px;color:#222;line-height:1.45}h1{font-size:1.6em;border-bottom:2px solid #ddd;padding-bottom:6px}
h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #eee}table{border-collapse:collapse;margin:8px 0 14px}
th,td{border:1px solid #ccc;padding:3px 9px;text-align:right;font-size:.9em}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}figure{margin:12px 0 22px}img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.88em;color:#555}pre{background:#f7f7f7;padding:10px;overflow-x:auto;font-size:.8em}
code{background:#f3f3f3;padding:0 3px}"""


def render_html(title: str, sections, images: dict[str, Path]) -> str:
    out = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
           f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    for heading, blocks in sections:
        out.append(f"<h2>{html.escape(heading)}</h2>")
        for b in blocks:
            if b[0] == "p":
                out.append(f"<p>{_inline_md(b[1])}</p>")
            elif b[0] == "table":
                out.append(_html_table(b[1]))
            elif b[0] == "pre":
                out.append(f"<pre>{html.escape(b[1])}</pre>")
            elif b[0] == "img" and b[1] in images:
                data = base64.b64encode(images[b[1]].read_bytes()).decode("ascii")
                out.append(f"<figure><img alt='{html.escape(b[1])}' src='data:image/png;base64,{data}'>"
                           f"<figcaption>{_inline_md(b[2])}</figcaption></figure>")
    out.append(f"<p style='color:#888;font-size:.8em'>Written by autoprune report on "
               f"{time.strftime('%Y-%m-%d %H:%M')}.</p></body></html>")
    return "\n".join(out)


# --- the report --------------------------------------------------------------------


def write_report(storage_url: str, study_name: str, out_dir=None, baseline: bool = True, device="auto",
                 progress: bool = False) -> dict[str, str]:
    """Write the study's report files (see the module doc); returns file name -> path."""
    study, config = open_existing(storage_url, study_name)
    out = Path(out_dir) if out_dir else Path("reports") / safe_name(study_name)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")  # fail now, not after the baseline
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise AutopruneError(f"cannot write the report to {out}: {exc.strerror or exc}; choose another --out") from None
    written: dict[str, Path] = {}

    # No password reaches a file: URLs are written only as redact(url) / redacted_config(config).
    df = trials_frame(study, config)
    written["trials.csv"] = _write_text(out / "trials.csv", df.to_csv(index=False))

    limits = study_limits(study, config)
    floor = limits.min_accuracy
    pick_trial, runners, pick_note = None, [], ""
    try:
        pick_trial, runners = pick(study, config)
    except NothingQualifies as exc:
        pick_note = str(exc)

    base, base_note = None, "skipped (--no-baseline)."
    if baseline:
        try:
            base = uniform_baseline(study, config, out, device=device, progress=progress)
        except AutopruneError as exc:
            base_note = str(exc)
            log.warning("uniform baseline skipped: %s", exc)

    written["pareto.png"] = plot_pareto(study, config, out / "pareto.png", pick_trial, base, floor)
    if config.study.kind == "channel":
        written.update(plot_channel_extra(study, config, out, pick_trial, base, floor))
    if pick_trial is not None:
        written["picked_layers.png"] = plot_picked_layers(study, config, pick_trial, out / "picked_layers.png")
    sens = _sensitivity_png(study, config)
    if sens is not None:
        target = out / sens.name
        if sens.resolve() != target.resolve():
            with _report_file(target) as tmp:
                shutil.copyfile(sens, tmp)
        written["sensitivity.png"] = target
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete:
        try:
            written["history.png"] = plot_history(study, config, out / "history.png")
        except Exception as exc:  # a plotting corner case must not sink the report
            log.warning("optimization history plot skipped: %s", str(exc).splitlines()[0] if str(exc) else exc)
    if len(complete) >= 2:
        try:
            written["importances.png"] = plot_importances(study, config, out / "importances.png")
        except Exception as exc:
            log.warning("parameter importance plot skipped: %s", str(exc).splitlines()[0] if str(exc) else exc)

    sections = build_sections(study, config, storage_url, pick_trial, pick_note, runners, base, base_note,
                              floor, limits)
    title = f"autoprune report: {study_name}"
    written["report.md"] = _write_text(out / "report.md", render_md(title, sections, written))
    written["report.html"] = _write_text(out / "report.html", render_html(title, sections, written))
    return {path.name: str(path) for path in written.values()}
