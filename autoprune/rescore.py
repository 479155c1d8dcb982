"""Re-scoring the leading trials, so that a pick survives noise.

A trial's validation accuracy is one fine-tune with one seed, scored on a
validation split of ~1,000 images (a standard error of ~1.4 points). The best
of many such figures is biased upwards: the more trials, the luckier the
leader, and on the subset the pick of a 40-trial study tested 2 points below
its validation figure while unselected configs tested ~1 point below theirs.
So, at the end of a search, the leading trials (``[select] top_k`` feasible,
fully fine-tuned trials with the highest first scores) are fine-tuned again
from the dense model with ``[select] seeds`` other seeds, by the same recipe,
and scored on the same validation split. Their re-scored mean is free of the
seed luck they were selected for (not of the validation images themselves:
every score sees the same images).

Ranking (pick, export, report, the end-of-search summary): a re-scored trial
ranks by its re-scored mean; any other trial by its first score minus the
mean selection gap (first score minus re-scored mean) of the re-scored ones,
so a lucky first score cannot jump a steadier, re-scored config. The sampler
keeps seeing the first score: re-scores change what is picked, not what is
learnt.

Records are study user attributes, one per trial (``rescore:<number>``):
Optuna does not let a finished trial's attributes change, and a study
attribute is visible to every reader of the study (pick, report, export,
workers, optuna-dashboard).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial

from .baseline import finetune
from .data import MAX_SEED
from .objective import TrialContext
from .plan import prune
from .train import evaluate

log = logging.getLogger("autoprune")

RECORD_PREFIX = "rescore:"
# Two-sided 95% quantiles of Student's t by degrees of freedom (scipy is not a dependency).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t975(dof: int) -> float:
    """Student's t quantile for a two-sided 95% interval (the table's next smaller dof: conservative)."""
    if dof < 1:
        return math.inf
    return _T975[max(d for d in _T975 if d <= dof)] if dof <= 120 else 1.960


def rescore_seed(study_seed: int, j: int) -> int:
    """The j-th re-score's fine-tune seed (j >= 1): never the trials' own seed."""
    return (int(study_seed) + 7919 * j) % (MAX_SEED + 1)


def rescores(study: optuna.Study) -> dict[int, dict]:
    """Trial number -> its re-score record (``n``, ``mean``, ``sd``, ``scores``, ``seeds``, ``first``, ``gap``)."""
    out = {}
    for key, value in study.user_attrs.items():
        if key.startswith(RECORD_PREFIX) and isinstance(value, dict) and value.get("n"):
            try:
                out[int(key[len(RECORD_PREFIX):])] = value
            except ValueError:
                continue
    return out


@dataclass(frozen=True)
class Score:
    """What a trial ranks by, and how sure that is (accuracy in percent)."""

    first: float  # the trial's own validation accuracy (what the sampler saw)
    estimate: float  # re-scored mean, or first minus the study's mean selection gap
    rescored: int = 0  # number of re-score fine-tunes
    sd: float | None = None  # of the re-scores
    half_width: float | None = None  # 95% interval of the mean, with the study's pooled spread
    gap: float | None = None  # first minus re-scored mean (selection gap)

    def to_dict(self) -> dict:
        return {"first": self.first, "estimate": self.estimate, "rescored": self.rescored, "sd": self.sd,
                "ci95": self.half_width, "selection_gap": self.gap}


def scores(trials: list[FrozenTrial], records: dict[int, dict]) -> dict[int, Score]:
    """Trial number -> :class:`Score` for each trial with a validation accuracy."""
    used = {n: r for n, r in records.items() if r.get("n")}
    gaps = [r["first"] - r["mean"] for r in used.values()]
    mean_gap = statistics.fmean(gaps) if gaps else 0.0
    # Pooled within-config spread: each trial has only a few re-scores, the study has many.
    dof = sum(r["n"] - 1 for r in used.values())
    pooled = math.sqrt(sum((r["n"] - 1) * r["sd"] ** 2 for r in used.values() if r["n"] > 1) / dof) if dof else None
    out = {}
    for t in trials:
        if "val_accuracy" not in t.user_attrs:
            continue
        first = float(t.user_attrs["val_accuracy"])
        r = used.get(t.number)
        if r is None:
            out[t.number] = Score(first, first - mean_gap)
        else:
            half = t975(dof) * pooled / math.sqrt(r["n"]) if pooled is not None else None
            out[t.number] = Score(first, float(r["mean"]), int(r["n"]), r.get("sd"), half, first - r["mean"])
    return out


def rescore_trials(study: optuna.Study, ctx: TrialContext, trials: list[FrozenTrial], seeds: int) -> list[int]:
    """Fine-tune each trial's plan again with ``seeds`` other seeds; store the records. Returns the trials done.

    A trial already holding ``seeds`` re-scores is skipped (a resumed search
    re-scores only what is new). Each re-score starts from the dense model,
    as the trial did, and uses the study's fine-tune recipe.
    """
    cfg = ctx.config
    done = []
    for i, t in enumerate(trials, 1):
        old = rescores(study).get(t.number)
        if old is not None and old["n"] >= seeds:
            continue
        plan = ctx.space.plan(dict(t.user_attrs["plan"]))
        vals, tests, used = [], [], []
        start = time.perf_counter()
        for j in range(1, seeds + 1):
            seed = rescore_seed(cfg.study.seed, j)
            pruned = prune(ctx.dense, plan)
            history = finetune(pruned, ctx.dense, ctx.data, cfg, seed, progress=ctx.progress,
                               desc=f"re-score {i}/{len(trials)}: trial {t.number} seed {seed}")
            vals.append(history[-1]["val_accuracy"])
            tests.append(evaluate(pruned.model, ctx.data.test))
            used.append(seed)
        first = float(t.user_attrs["val_accuracy"])
        record = {"n": len(vals), "mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                  "scores": vals, "seeds": used, "first": first, "gap": first - statistics.fmean(vals),
                  "test_mean": statistics.fmean(tests), "seconds": time.perf_counter() - start}
        study.set_user_attr(f"{RECORD_PREFIX}{t.number}", record)
        log.info("re-score %d/%d: trial %d: first %.2f%%, re-scored %s -> mean %.2f%% (selection gap %+.2f)",
                 i, len(trials), t.number, first, ", ".join(f"{v:.2f}%" for v in vals), record["mean"], record["gap"])
        done.append(t.number)
    return done
