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

The figures are drawn by :mod:`autoprune.plots`. The uniform baseline (every
layer or channel group pruned alike, exactly at the cap, fine-tuned with the
study's recipe on the study's data; :mod:`autoprune.baseline`) is computed
once and cached in ``out_dir/baseline-cache.json``, keyed by the checkpoint's
sha256, the plan, the recipe and the data; a damaged cache is ignored and
rewritten. Models of any source are reported: layers and channel groups by
their names, kept widths from the trials' ``channels`` (the lab's VGG) or
``widths`` (group -> kept). Storage URLs
are written only redacted, so a password never reaches a report file; the
study's own text (name, data, paths) is escaped in report.md and report.html
and never read as math in figure titles. Every file is replaced whole or not
at all (:func:`autoprune.files.output_path`).
"""

from __future__ import annotations

import base64
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
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState
from torch import nn

from .artifacts import study_artifact_store
from .baseline import cached_uniform
from .budget import CostModel, vgg_cost_model
from .config import StudyConfig
from .errors import AutopruneError, NothingQualifies
from .files import file_digest, output_path, safe_name
from .kinds import KINDS
from .model import vgg_channels
from .plan import layers_for
from .plots import (plot_channel_extra, plot_history, plot_importances, plot_pareto, plot_picked_layers,
                    prediction_errors)
from .pick import (format_score, has_weights, is_deployable, is_feasible, named_constraints, pick, study_limits,
                   study_scores)
from .sources import load_checkpoint, prunable
from .space import BUDGET
from .storage import redact, redacted_config
from .study import open_existing, study_checkpoint

log = logging.getLogger("autoprune")

ACCURACY_NOTE = ("Validation accuracy is measured on a split carved from the training images and is what "
                 "the search and pick select on. Test accuracy is measured on the held-out test split and "
                 "is reported only: it is never used to choose a trial.")

# --- helpers ---------------------------------------------------------------------


def _write_text(path: Path, text: str) -> Path:
    with output_path(path) as tmp:  # whole or not at all; a failure is one line
        tmp.write_text(text)
    return path


def layer_names(study: optuna.Study, config: StudyConfig, costs: CostModel | None = None) -> tuple[str, ...]:
    """The layers (fine-grained) or channel groups (channel) the study's plans set, in the model's order.

    From the dense model's ``costs`` when known; else the lab's VGG names when every trial's plan is within
    them, or the names the trials' plans and params hold, in the order first seen.
    """
    kind = config.study.kind
    if costs is not None:
        return tuple(KINDS[kind].units(costs))
    seen = dict.fromkeys(n for t in study.get_trials(deepcopy=False)
                         for n in [*(t.user_attrs.get("plan") or {}), *t.params] if n != BUDGET)
    vgg = layers_for(kind)
    return vgg if set(seen) <= set(vgg) else tuple(seen)


def _model_text(config: StudyConfig) -> str:
    """The dense model in words: the lab's VGG with its width, else its source."""
    source = config.model.source
    return f"a VGG (width {config.model.width:g})" if source == "vgg" else f"the model {source}"


def kept_widths(attrs: dict, groups) -> dict[str, int] | None:
    """Channels each group kept, from a trial's (or export's) ``widths`` (group -> kept: any model) or
    ``channels`` (the lab's VGG conv widths, in group order); None when it recorded neither."""
    if isinstance(attrs.get("widths"), dict):
        return {str(g): int(k) for g, k in attrs["widths"].items()}
    if "channels" in attrs:
        return dict(zip(groups, (int(c) for c in attrs["channels"])))
    return None


def _fmt(v, digits=4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


# --- trials table ----------------------------------------------------------------


def trials_frame(study: optuna.Study, config: StudyConfig, layers=None) -> pd.DataFrame:
    """One row per trial, every state; a ``plan_`` and ``proposed_`` column per layer (:func:`layer_names`
    when ``layers`` is not given)."""
    layers = list(layer_names(study, config) if layers is None else layers)
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
        if isinstance(a.get("widths"), dict):  # graph models: group -> channels kept
            row["widths"] = ";".join(f"{g}={k}" for g, k in a["widths"].items())
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


def study_dense(study: optuna.Study, config: StudyConfig) -> tuple[nn.Module, str]:
    """The study's dense model (any source, from its checkpoint file or uploaded artifact) and its sha256."""
    ua = study.user_attrs
    ckpt = _checkpoint_path(study, config)
    if ckpt is None and ua.get("checkpoint_artifact_id"):  # studies that upload their dense checkpoint
        store = study_artifact_store(study)
        if store is not None:
            ckpt = Path(study_checkpoint(study, store))
    if ckpt is None:
        raise AutopruneError(f"the study's dense checkpoint {ua.get('checkpoint')!r} was not found")
    sha = ua.get("checkpoint_sha256") or file_digest(ckpt)
    if file_digest(ckpt) != sha:
        raise AutopruneError(f"{ckpt} changed since the search ran (sha256 differs); the baseline would not be "
                             f"comparable")
    # a module: source imports user code only when the study's config names it
    return load_checkpoint(ckpt, config.model.source)[0], sha


def uniform_baseline(study: optuna.Study, config: StudyConfig, out_dir: Path, device="auto",
                     progress: bool = False, dense: tuple[nn.Module, str] | None = None) -> dict:
    """Prune the study's dense checkpoint uniformly at the cap, fine-tune by the study's recipe, measure
    (:func:`autoprune.baseline.cached_uniform`, cached in ``out_dir``). ``dense``: :func:`study_dense`'s
    result when the caller has it."""
    model, sha = dense or study_dense(study, config)
    return cached_uniform(model, config, Path(out_dir), sha, dense_figures=study.user_attrs.get("dense"),
                          device=device, progress=progress)


def _dense_costs(config: StudyConfig, dense: tuple[nn.Module, str] | None) -> CostModel | None:
    """The dense model's cost model (layer sizes, groups); the lab's VGG's by the config's width when its
    checkpoint was not read (the search checked the checkpoint has those widths); else None."""
    if dense is not None:
        return prunable(dense[0]).cost_model()
    if config.model.source == "vgg":
        return vgg_cost_model(vgg_channels(config.model.width), config.model.num_classes)
    return None


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
                   floor, limits, layers=None) -> list[tuple[str, list]]:
    """The report as (heading, blocks); a block is ('p', text) | ('table', t) | ('img', name, caption) | ('pre', text).

    ``layers``: the layer or group names of the study's plans (:func:`layer_names`)."""
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
              f"pruning of {_md_text(_model_text(config))} on "
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
        plan = a.get("plan") or {}
        layers = layer_names(study, config) if layers is None else layers
        kept = kept_widths(a, layers) if KINDS[config.study.kind].changes_shape else None
        headers = ["layer", "ratio removed"] + (["channels kept"] if kept else [])
        rows = []
        for layer in layers:
            row = [layer, f"{plan.get(layer, 0.0):.4f}"]
            if kept:
                row.append(str(kept.get(layer, "")))
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
    if KINDS[config.study.kind].changes_shape:
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

    # The dense model: for the baseline, and for any model but the lab's VGG (whose layers its width gives)
    # the layer sizes of the picked-layers figure.
    dense, dense_note = None, ""
    if baseline or config.model.source != "vgg":
        try:
            dense = study_dense(study, config)
        except AutopruneError as exc:
            dense_note = str(exc)
    costs = _dense_costs(config, dense)
    layers = layer_names(study, config, costs)

    base, base_note = None, "skipped (--no-baseline)."
    if baseline:
        try:
            if dense is None:
                raise AutopruneError(dense_note)
            base = uniform_baseline(study, config, out, device=device, progress=progress, dense=dense)
        except AutopruneError as exc:
            base_note = str(exc)
            log.warning("uniform baseline skipped: %s", exc)

    written["pareto.png"] = plot_pareto(study, config, out / "pareto.png", pick_trial, base, floor)
    if KINDS[config.study.kind].changes_shape:
        written.update(plot_channel_extra(study, config, out, pick_trial, base, floor))
    if pick_trial is not None and costs is not None:
        kept = kept_widths(pick_trial.user_attrs, costs.groups) if KINDS[config.study.kind].changes_shape else None
        written["picked_layers.png"] = plot_picked_layers(study, config, pick_trial, out / "picked_layers.png",
                                                          costs, kept)
    elif pick_trial is not None:
        log.warning("picked layers plot skipped: %s", dense_note)
    sens = _sensitivity_png(study, config)
    if sens is not None:
        target = out / sens.name
        if sens.resolve() != target.resolve():
            with output_path(target) as tmp:
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
                              floor, limits, layers)
    title = f"autoprune report: {study_name}"
    written["report.md"] = _write_text(out / "report.md", render_md(title, sections, written))
    written["report.html"] = _write_text(out / "report.html", render_html(title, sections, written))
    return {path.name: str(path) for path in written.values()}
