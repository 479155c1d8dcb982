"""Reading a finished study (opened by :func:`autoprune.study.open_existing`): pick a deployable config.

* :func:`is_deployable` is the one rule for "fully fine-tuned, safe to ship":
  a COMPLETE trial that was not stopped early, ran every fine-tune epoch of the
  study's recipe and (for multi-fidelity studies) ran at full fidelity. Pick,
  report and export all use it.
* :func:`pick` chooses among deployable trials that meet deployment limits
  (by default the study's own constraints) by validation accuracy or by cost.
  Validation accuracy means the re-scored estimate where the search re-scored
  the leading trials (:mod:`autoprune.rescore`), so a config that was lucky
  once is not picked over a steadier one. Test accuracy is reported beside
  the pick, never used to choose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from .config import StudyConfig
from .errors import AutopruneError, NothingQualifies
from .kinds import KINDS
from .objective import CONSTRAINT_NAMES_ATTR
from .rescore import Score, rescores, scores

WEIGHTS_ATTR = "weights_artifact_id"
PREFER = ("accuracy", "size", "macs", "latency")
_PREFER_ATTR = {"size": "size_fraction", "macs": "macs_fraction", "latency": "latency_ms"}


# --- trial predicates ----------------------------------------------------------


def is_feasible(trial: FrozenTrial) -> bool:
    """Feasible under the study's own constraints (as recorded on the trial)."""
    return trial.state == TrialState.COMPLETE and bool(trial.constraints) and all(
        v <= 0 for v in trial.constraints.values())


def named_constraints(trial: FrozenTrial) -> dict[str, float]:
    """Constraint name -> value (<= 0 feasible), each constraint once.

    Reads the list autoprune writes with its ``constraint_names``, and the named
    form (``trial.set_constraint``) that studies made before it hold.
    """
    values = dict(trial.constraints)  # Optuna's merge: the list as "0", "1", ..., then the named ones
    names = trial.user_attrs.get(CONSTRAINT_NAMES_ATTR)
    listed = trial.system_attrs.get("constraints")
    if isinstance(names, list) and isinstance(listed, (list, tuple)) and len(names) == len(listed):
        values = {**{name: values.pop(str(i)) for i, name in enumerate(names)}, **values}
    return values


def not_deployable_reason(trial: FrozenTrial, config: StudyConfig) -> str | None:
    """Why ``trial`` must not be shipped as a fully fine-tuned model, or None if it may."""
    a = trial.user_attrs
    if trial.state != TrialState.COMPLETE:
        return f"it did not finish (state {trial.state.name})"
    if "stopped_early_at_epoch" in a:
        return (f"it was stopped early after fine-tune epoch {a['stopped_early_at_epoch']} of "
                f"{config.finetune.epochs} (not fully fine-tuned)")
    fidelity = a.get("fidelity", "full")
    if fidelity != "full":
        return f"it ran at fidelity {fidelity!r}, not 'full' (not fully fine-tuned)"
    done = a.get("finetune_epochs_done")
    if done is None:
        return "it records no finetune_epochs_done (cannot tell that it was fully fine-tuned)"
    if int(done) < config.finetune.epochs:
        return f"it ran {done} of {config.finetune.epochs} fine-tune epochs (not fully fine-tuned)"
    return None


def is_deployable(trial: FrozenTrial, config: StudyConfig) -> bool:
    """A COMPLETE trial, fully fine-tuned by the study's recipe: the only kind pick and export use."""
    return not_deployable_reason(trial, config) is None


def has_weights(trial: FrozenTrial) -> bool:
    return bool(trial.user_attrs.get(WEIGHTS_ATTR))


# --- deployment limits ---------------------------------------------------------


@dataclass
class Limits:
    """Deployment limits; None = not constrained."""

    max_size: float | None = None
    min_accuracy: float | None = None
    max_macs: float | None = None
    max_latency_ms: float | None = None
    max_latency_fraction: float | None = None  # measured latency / the dense model's, timed side by side

    def to_dict(self) -> dict:
        return {"max_size_fraction": self.max_size, "min_val_accuracy": self.min_accuracy,
                "max_macs_fraction": self.max_macs, "max_latency_ms": self.max_latency_ms,
                "max_latency_fraction": self.max_latency_fraction}

    def describe(self) -> str:
        parts = []
        if self.max_size is not None:
            parts.append(f"size_fraction <= {self.max_size:.4g}")
        if self.min_accuracy is not None:
            parts.append(f"val accuracy >= {self.min_accuracy:.2f}%")
        if self.max_macs is not None:
            parts.append(f"macs_fraction <= {self.max_macs:.4g}")
        if self.max_latency_ms is not None:
            parts.append(f"latency <= {self.max_latency_ms:.3g} ms")
        if self.max_latency_fraction is not None:
            parts.append(f"latency_fraction <= {self.max_latency_fraction:.4g}")
        return ", ".join(parts) or "no limits"

    def violations(self, trial: FrozenTrial) -> dict[str, float]:
        """Limit -> violation in fraction units (> 0: missed by that much).

        Size and MACs in fractions of dense, accuracy in points / 100, latency
        relative to its limit, so that they add up to one 'distance'.
        """
        a = trial.user_attrs
        out = {}
        if self.max_size is not None:
            out["size"] = a["size_fraction"] - self.max_size
        if self.min_accuracy is not None:
            out["accuracy"] = (self.min_accuracy - a["val_accuracy"]) / 100.0
        if self.max_macs is not None:
            out["macs"] = a["macs_fraction"] - self.max_macs
        if self.max_latency_ms is not None:
            lat = a.get("latency_ms")
            out["latency"] = math.inf if lat is None else (lat - self.max_latency_ms) / self.max_latency_ms
        if self.max_latency_fraction is not None:
            lat = a.get("latency_fraction")
            out["latency_fraction"] = math.inf if lat is None else lat - self.max_latency_fraction
        return out

    def met_by(self, trial: FrozenTrial) -> bool:
        return all(v <= 1e-12 for v in self.violations(trial).values())


def study_limits(study: optuna.Study, config: StudyConfig, max_size=None, min_accuracy=None, max_macs=None,
                 max_latency_ms=None, max_latency_fraction=None) -> Limits:
    """The given limits, each defaulting to the study's own constraint; validated."""
    c = config.constraints
    if max_size is not None and not 0 < max_size <= 1:
        raise AutopruneError(f"--max-size is a fraction of dense size in (0, 1], got {max_size}")
    if min_accuracy is not None and not 0 <= min_accuracy <= 100:
        raise AutopruneError(f"--min-accuracy is a percentage in [0, 100], got {min_accuracy}")
    if max_macs is not None and not 0 < max_macs <= 1:
        raise AutopruneError(f"--max-macs is a fraction of dense MACs in (0, 1], got {max_macs}")
    if max_latency_ms is not None and not max_latency_ms > 0:
        raise AutopruneError(f"--max-latency-ms must be > 0, got {max_latency_ms}")
    if max_latency_fraction is not None and not 0 < max_latency_fraction <= 1:
        raise AutopruneError(f"--max-latency-fraction is a fraction of the dense model's latency in (0, 1], got "
                             f"{max_latency_fraction}")
    for flag, value in (("--max-latency-ms", max_latency_ms), ("--max-latency-fraction", max_latency_fraction)):
        if value is not None and not KINDS[config.study.kind].changes_shape:
            raise AutopruneError(f"{flag} needs a channel study: fine-grained trials record no latency "
                                 "(zeros do not make a dense kernel faster)")
    if max_latency_ms is not None and max_latency_fraction is not None:
        raise AutopruneError("give --max-latency-ms or --max-latency-fraction, not both")
    # A latency limit given here replaces the study's own (in ms or as a fraction), not adds to it.
    own_ms, own_fraction = ((c.max_latency_ms, c.max_latency_fraction) if KINDS[config.study.kind].changes_shape
                            else (None, None))
    if max_latency_ms is not None or max_latency_fraction is not None:
        own_ms, own_fraction = max_latency_ms, max_latency_fraction
    floor = study.user_attrs.get("accuracy_floor")
    if floor is None:
        floor = config.accuracy_floor(study.user_attrs.get("dense", {}).get("val_accuracy", 0.0))
    return Limits(
        max_size=c.max_size_fraction if max_size is None else max_size,
        min_accuracy=float(floor) if min_accuracy is None else min_accuracy,
        max_macs=c.max_macs_fraction if max_macs is None else max_macs,
        max_latency_ms=own_ms,
        max_latency_fraction=own_fraction,
    )


# --- pick ----------------------------------------------------------------------


def study_scores(study: optuna.Study) -> dict[int, Score]:
    """Trial number -> what it ranks by (re-scored where the search re-scored it); see autoprune.rescore."""
    return scores(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), rescores(study))


def qualified(study: optuna.Study, config: StudyConfig) -> list[FrozenTrial]:
    """The COMPLETE trials that meet the study's constraints and can be exported: what a search may pick."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if is_feasible(t) and is_deployable(t, config)]


def leaders(study: optuna.Study, config: StudyConfig, k: int) -> list[FrozenTrial]:
    """The ``k`` feasible, deployable trials with the highest first validation scores (ties: smaller cost)."""
    ok = qualified(study, config)
    cost = config.cost_attr
    return sorted(ok, key=lambda t: (-t.user_attrs["val_accuracy"], t.user_attrs.get(cost, 0.0), t.number))[:k]


def _sort_key(prefer: str, score: dict[int, Score]):
    def acc(t):
        return score[t.number].estimate if t.number in score else t.user_attrs["val_accuracy"]

    if prefer == "accuracy":  # highest (re-scored) val accuracy; ties: smaller size, then lower number
        return lambda t: (-acc(t), t.user_attrs["size_fraction"], t.number)
    attr = _PREFER_ATTR[prefer]
    return lambda t: (t.user_attrs[attr], -acc(t), t.number)


def closest(trials: list[FrozenTrial], limits: Limits) -> FrozenTrial | None:
    """The trial with the smallest total violation of ``limits``."""
    def total(t):
        return sum(max(0.0, v) for v in limits.violations(t).values())

    return min(trials, key=lambda t: (total(t), t.number), default=None)


def pick(study: optuna.Study, config: StudyConfig, max_size: float | None = None,
         min_accuracy: float | None = None, max_macs: float | None = None, max_latency_ms: float | None = None,
         max_latency_fraction: float | None = None, prefer: str = "accuracy", require_weights: bool = False, runners_up: int = 3,
         ) -> tuple[FrozenTrial, list[FrozenTrial]]:
    """The best deployable COMPLETE trial meeting the limits, and up to ``runners_up`` next ones.

    ``prefer``: ``accuracy`` (highest validation accuracy), or ``size`` /
    ``macs`` / ``latency`` (smallest, ties by accuracy). Limits left None are
    the study's own constraints. ``require_weights``: only trials whose
    fine-tuned weights were kept (export needs them). Raises
    :class:`NothingQualifies` naming the closest trial when none qualifies.
    """
    if prefer not in PREFER:
        raise AutopruneError(f"--prefer must be one of {', '.join(PREFER)}, got {prefer!r}")
    if prefer == "latency" and not KINDS[config.study.kind].changes_shape:
        raise AutopruneError("--prefer latency needs a channel study: fine-grained trials record no latency")
    limits = study_limits(study, config, max_size, min_accuracy, max_macs, max_latency_ms, max_latency_fraction)
    name = study.study_name
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise NothingQualifies(f"study {name!r} has no complete trial yet; run autoprune search first")
    deployable = [t for t in complete if is_deployable(t, config)]
    pool = [t for t in deployable if has_weights(t)] if require_weights else deployable
    ok = sorted((t for t in pool if limits.met_by(t)), key=_sort_key(prefer, study_scores(study)))
    if ok:
        return ok[0], ok[1:1 + runners_up]
    near = closest(pool or complete, limits)
    v = {k: x for k, x in limits.violations(near).items() if x > 1e-12}
    misses = ", ".join(_miss(k, x, limits) for k, x in v.items()) or "meets the limits but is not deployable"
    what = "deployable trial with kept weights" if require_weights else "deployable trial"
    skipped = len(complete) - len(pool)
    raise NothingQualifies(
        f"no {what} in study {name!r} meets {limits.describe()} ({len(complete)} complete, "
        f"{skipped} not deployable{' or without weights' if require_weights else ''}); closest: trial "
        f"{near.number} (size_fraction {near.user_attrs['size_fraction']:.4f}, val "
        f"{near.user_attrs['val_accuracy']:.2f}%: {misses}); relax a limit or run more trials"
    )


def _miss(key: str, value: float, limits: Limits) -> str:
    if key == "accuracy":
        return f"accuracy short by {100 * value:.2f} points"
    if key == "latency":
        return "no latency recorded" if math.isinf(value) else f"latency over by {value * limits.max_latency_ms:.3g} ms"
    if key == "latency_fraction" and math.isinf(value):
        return "no latency_fraction recorded"
    return f"{key} over by {value:.4f}"


# --- presenting a trial --------------------------------------------------------


def trial_summary(trial: FrozenTrial, config: StudyConfig | None = None, score: Score | None = None) -> dict:
    """The figures of one trial that pick, report and export print (``score``: its re-scored figures)."""
    a = trial.user_attrs
    out = {"trial": trial.number, "state": trial.state.name}
    for key in ("size_fraction", "nonzero_size_mib", "macs_fraction", "latency_ms", "latency_fraction",
                "latency_predicted_ms", "val_accuracy",
                "test_accuracy", "val_accuracy_before_finetune", "params", "nonzero_params", "macs",
                "finetune_epochs_done", "stopped_early_at_epoch", "fidelity"):
        if key in a:
            out[key] = a[key]
    out["plan"] = dict(a.get("plan") or {})
    if "channels" in a:
        out["channels"] = list(a["channels"])
    if a.get("widths"):  # a channel-pruned model of another source: group -> channels kept
        out["widths"] = dict(a["widths"])
    out["feasible"] = is_feasible(trial)
    if config is not None:
        out["deployable"] = is_deployable(trial, config)
    out["has_weights"] = has_weights(trial)
    if score is not None:
        out["score"] = score.to_dict()
    return out


def pick_result(study: optuna.Study, config: StudyConfig, best: FrozenTrial, runners: list[FrozenTrial],
                limits: Limits, prefer: str) -> dict:
    score = study_scores(study)
    return {"study": study.study_name, "kind": config.study.kind, "prefer": prefer,
            "limits": limits.to_dict(), **trial_summary(best, config, score.get(best.number)),
            "runners_up": [trial_summary(t, config, score.get(t.number)) for t in runners]}


def format_score(s: dict | None) -> str:
    """``re-scored 68.10% ± 0.62 (2 fine-tunes, selection gap +1.20)``, or '' without re-scores."""
    if not s or not s.get("rescored"):
        return ""
    ci = f" ± {s['ci95']:.2f}" if s.get("ci95") is not None and math.isfinite(s["ci95"]) else ""
    return (f"re-scored {s['estimate']:.2f}%{ci} ({s['rescored']} fine-tunes, selection gap "
            f"{s['selection_gap']:+.2f})")


def format_pick(result: dict, cost_attr: str) -> str:
    def line(r):
        extra = f"  macs {r['macs_fraction']:.4f}" if cost_attr == "macs_fraction" else ""
        extra += f"  latency {r['latency_ms']:.2f} ms" if "latency_ms" in r else ""
        extra += f" ({r['latency_fraction']:.3f} of dense)" if "latency_fraction" in r else ""
        rescored = format_score(r.get("score"))
        return (f"trial {r['trial']:>4}  size {r['size_fraction']:.4f}{extra}  val {r['val_accuracy']:.2f}%  "
                f"test {r['test_accuracy']:.2f}%" + (f"  {rescored}" if rescored else ""))

    lim = Limits(*(result["limits"].get(k) for k in ("max_size_fraction", "min_val_accuracy", "max_macs_fraction",
                                                     "max_latency_ms", "max_latency_fraction")))
    lines = [f"picked from study {result['study']} ({result['kind']}), prefer {result['prefer']}, "
             f"limits: {lim.describe()}",
             "  " + line(result),
             "  plan: " + (", ".join(f"{k}={v:.3f}" for k, v in result["plan"].items()) or "dense"),
             "  val accuracy chose it (validation carved from training; the re-scored mean where the search "
             "re-scored the leaders); test accuracy is reported only"]
    if not result["has_weights"]:
        lines.append("  note: its weights were not kept (infeasible under the study's constraints); "
                     "export needs a trial with kept weights")
    if result["runners_up"]:
        lines.append("runners-up:")
        lines += ["  " + line(r) for r in result["runners_up"]]
    return "\n".join(lines)
