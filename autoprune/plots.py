"""Every figure autoprune draws (matplotlib's Agg backend, no display needed), each a PNG whose path is returned.

* The lab's: weight histograms per prunable tensor and each layer's share of
  parameters (``autoprune profile --plots``).
* A study report's (:mod:`autoprune.report`): cost vs validation accuracy with
  the front, the constraints, the dense model, the uniform baseline and the
  pick (:func:`plot_pareto`; channel studies also MACs and measured latency,
  :func:`plot_channel_extra`), the latency predictor against the measurement,
  the pick's per-layer ratios, and Optuna's history and importance plots.

A figure is written whole or not at all (:func:`autoprune.files.output_path`:
a failed write is one error line), and titles holding a study's own text are
never read as math.
"""

from __future__ import annotations

import math
import os
import statistics
import warnings
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from .budget import CostModel
from .config import StudyConfig
from .files import OUT_FIX, output_path
from .kinds import KINDS
from .model import PRUNABLE_LAYERS, param_name
from .pick import is_deployable, is_feasible

PLOTS_FIX = "free some space or choose another --plots folder"
COLORS = {"feasible": "tab:blue", "infeasible": "0.55", "partial": "tab:orange", "front": "tab:green",
          "dense": "black", "baseline": "tab:red", "pick": "tab:purple"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, fix: str = OUT_FIX) -> Path:
    """Write ``fig`` to ``path`` whole (a failure is one error line ending in ``fix``) and close it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with output_path(path, fix) as tmp:
            fig.savefig(tmp)
    finally:
        _pyplot().close(fig)
    return path


def category(t: FrozenTrial, config: StudyConfig) -> str:
    """How a complete trial is drawn: ``partial`` (not fully fine-tuned), ``feasible`` or ``infeasible``."""
    if not is_deployable(t, config):
        return "partial"
    return "feasible" if is_feasible(t) else "infeasible"


def weight_histograms(model: nn.Module, path: str | os.PathLike, bins: int = 128) -> Path:
    """One histogram per prunable tensor (conv weights, classifier weight), as in the lab.

    Zeros are left out of each histogram (a pruned tensor would otherwise show
    one spike at 0); each title gives the tensor's shape and sparsity.
    """
    plt = _pyplot()
    params = dict(model.named_parameters())
    layers = [n for n in PRUNABLE_LAYERS if param_name(n) in params]
    cols = 3
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(12, 3.2 * rows), dpi=110, squeeze=False)
    for ax, layer in zip(axes.flat, layers):
        w = params[param_name(layer)].detach().flatten().float().cpu()
        nonzero = w[w != 0]
        sparsity = 1.0 - nonzero.numel() / max(1, w.numel())
        if nonzero.numel():
            ax.hist(nonzero.numpy(), bins=bins, density=True, color="tab:blue", alpha=0.8)
        else:
            ax.text(0.5, 0.5, "all weights zero", ha="center", va="center", transform=ax.transAxes)
        shape = "x".join(str(s) for s in params[param_name(layer)].shape)
        ax.set_title(f"{layer} [{shape}], sparsity {100 * sparsity:.1f}%", fontsize=9)
        ax.set_xlabel("weight value (zeros excluded)", fontsize=8)
        ax.set_ylabel("density", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.suptitle("Weight distributions of the prunable tensors", fontsize=11)
    fig.tight_layout()
    return _save(fig, Path(path), PLOTS_FIX)


def param_shares(model: nn.Module) -> list[tuple[str, int]]:
    """(layer, parameters): each conv, the classifier (weight + bias), all BatchNorms together."""
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "backbone" and parts[1].startswith("bn"):
            key = "batchnorm"
        elif parts[0] == "backbone":
            key = parts[1]
        else:
            key = parts[0]
        counts[key] = counts.get(key, 0) + p.numel()
    bn = counts.pop("batchnorm", 0)
    items = list(counts.items())
    if bn:
        items.append(("batchnorm", bn))
    return items


def param_share_chart(model: nn.Module, path: str | os.PathLike) -> Path:
    """Bar chart of each layer's share of all parameters, percent (BatchNorms in one bar)."""
    plt = _pyplot()
    items = param_shares(model)
    total = sum(n for _, n in items)
    names = [k for k, _ in items]
    shares = [100.0 * n / total for _, n in items]
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    bars = ax.bar(names, shares, color="tab:blue")
    for bar, (_, n), share in zip(bars, items, shares):
        ax.annotate(f"{share:.2f}%\n{n:,}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_ylabel("share of parameters (%)")
    ax.set_xlabel("layer")
    ax.set_ylim(0, max(shares) * 1.2 if shares else 1)
    ax.set_title(f"Share of parameters by layer ({total:,} parameters in all)", fontsize=11)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, Path(path), PLOTS_FIX)


# --- a study report's figures ------------------------------------------------------


_LABELS = {"feasible": "feasible", "infeasible": "infeasible",
           "partial": "not fully fine-tuned (stopped early)"}


def _scatter_trials(ax, trials, config, x_of, pick_trial, baseline, dense_xy, baseline_x):
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    for cat, marker in (("infeasible", "x"), ("partial", "v"), ("feasible", "o")):
        pts = [(x_of(t), t.user_attrs["val_accuracy"]) for t in complete if category(t, config) == cat]
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


def plot_picked_layers(study, config, trial: FrozenTrial, path: Path, costs: CostModel,
                       kept: dict[str, int] | None = None) -> Path:
    """The pick's per-layer (or per-group) ratios beside each layer's share of the dense parameters.

    ``costs``: the dense model's :class:`autoprune.budget.CostModel` (a channel group's share is that of
    its root layer's weight); ``kept``: channels each group kept, shown under its name.
    """
    plt = _pyplot()
    kind = config.study.kind
    layers = list(KINDS[kind].units(costs))
    widths = costs.groups if KINDS[kind].changes_shape else {}
    plan = trial.user_attrs.get("plan") or {}
    ratios = [plan.get(n, 0.0) for n in layers]
    shares = [costs.layers.get(n, 0) / costs.params for n in layers]
    fig, ax = plt.subplots(figsize=(max(9, 0.45 * len(layers)), 4.8), dpi=110)
    xs = range(len(layers))
    w = 0.4
    what = KINDS[kind].ratio_label
    b1 = ax.bar([x - w / 2 for x in xs], ratios, w, color=COLORS["pick"], label=f"picked trial {trial.number}: {what}")
    b2 = ax.bar([x + w / 2 for x in xs], shares, w, color="tab:gray", label="layer's share of dense parameters")
    if len(layers) <= 24:  # beyond that the numbers overlap
        for bars, vals in ((b1, ratios), (b2, shares)):
            for bar, v in zip(bars, vals):
                ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                            va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    labels = list(layers)
    if kept:
        labels = [f"{n}\n{kept[n]}/{widths[n]}" if n in kept else n for n in layers]
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=8, rotation=0 if len(layers) <= 12 else 90)
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
