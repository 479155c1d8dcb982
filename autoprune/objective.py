"""One trial: proposal -> repaired plan -> pruned model -> fine-tune -> metrics.

Each trial stores its figures as user attributes (names that scripts read):
``size_fraction``, ``nonzero_size_mib``, ``params``, ``macs``,
``macs_fraction``, ``val_accuracy``, ``val_accuracy_before_finetune``,
``test_accuracy`` (for reports only; never used to choose), ``finetune_seconds``,
``plan`` (layer -> ratio that ran), ``proposed`` (what the sampler asked for),
``finetune_epochs_done``, for channel trials ``latency_ms`` with the figures
of :meth:`autoprune.latency.Meter.figures` (``[latency]``: runtime, threads,
batch, spread, the dense model's latency measured in the same run and
``latency_fraction``, the lookup table's ``latency_predicted_ms`` and
``latency_prediction_error``) and, for screened
trials (``[fidelity] screen``), ``screen_plans``, ``screen_scores`` (BN-recal
validation accuracy; index 0 is the proposal), ``screen_chosen`` (the index
that ran as ``plan``) and ``screen_seconds``.
Feasibility is Optuna's constraint list (system attr ``constraints``, <= 0 is
feasible; in the order size, accuracy, fidelity, then macs and latency when the
study constrains them), named by the user attr ``constraint_names``: Optuna's
samplers, ``study.best_trials``, ``plot_pareto_front`` and optuna-dashboard read
that list (the dashboard reads no named constraints); autoprune reads them by
name with :func:`autoprune.pick.named_constraints`.

Early stop of hopeless trials: after fine-tune epoch e of E (e < E) a trial
stops when its validation accuracy is below ``floor - margin * (E - e)``: even
recovering ``margin`` points per remaining epoch (more than a short cosine
fine-tune recovers late in its schedule) would not reach the floor. Such a
trial is stored complete but infeasible, with ``stopped_early_at_epoch`` and
the fine-tune epochs and seconds it saved.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import torch
from optuna.trial import TrialState
from torch import nn

from . import metrics
from .baseline import finetune
from .config import StudyConfig
from .data import Data
from .kinds import KINDS
from .latency import Meter
from .model import arch_of
from .plan import prune
from .sources import prunable
from .space import BUDGET, SearchSpace
from .storage import set_user_attrs, worker_id
from .train import evaluate, recalibrate_bn

log = logging.getLogger("autoprune")

WEIGHTS_ARTIFACT = "weights_artifact_id"
# A trial's constraint values are Optuna's list (system attr "constraints", what optuna-dashboard
# shows); this user attr names them, in the same order (autoprune.pick.named_constraints reads both).
CONSTRAINT_NAMES_ATTR = "constraint_names"


@dataclass
class TrialContext:
    """Everything a trial needs, prepared once per worker."""

    config: StudyConfig
    space: SearchSpace
    dense: nn.Module  # any source's dense model (autoprune.sources)
    data: Data
    floor: float  # accuracy floor, percent
    dense_figures: dict  # params, macs, latency_ms of the dense model
    artifact_store: object | None = None
    progress: bool = True
    latency: Meter | None = None  # made from [latency] at the first channel trial
    extras: dict = field(default_factory=dict)

    def latency_meter(self) -> Meter:
        if self.latency is None:
            self.latency = Meter.from_config(self.config.latency, self.config.latency_cache_dir, self.dense_figures)
        return self.latency


def cheap_score(dense: nn.Module, plan, data: Data, config: StudyConfig) -> float:
    """Validation accuracy (percent) of ``dense`` pruned by ``plan`` after BatchNorm recalibration, no fine-tune.

    EagleEye's adaptive-BN score: it ranks fine-grained configs like the fine-tune
    (Spearman 0.92 on the subset), channel configs hardly (0.22); benchmarks/fidelity.py.
    """
    fid = config.fidelity
    model = prune(dense, plan).model
    recalibrate_bn(model, data.train, max(1, fid.bn_recal_batches), fid.bn_recal_batch_size, config.study.seed)
    return evaluate(model, data.val)


class Objective:
    def __init__(self, ctx: TrialContext):
        self.ctx = ctx

    def __call__(self, trial: optuna.Trial):
        ctx, cfg = self.ctx, self.ctx.config
        proposed = ctx.space.suggest(trial)
        ratios, notes = ctx.space.repair(proposed)
        for note in notes:
            log.info("trial %d: %s", trial.number, note)
        ratios = self.screen(trial, proposed, ratios)
        plan = ctx.space.plan(ratios)
        # Attributes go in batches (one transaction each on a database): see storage.set_user_attrs.
        set_user_attrs(trial, {"worker": worker_id(), "proposed": proposed, "plan": dict(plan.ratios),
                               "repaired": bool(notes)})

        pruned = prune(ctx.dense, plan)
        model = pruned.model
        attrs = {"val_accuracy_before_finetune": evaluate(model, ctx.data.val)}
        if ctx.space.latency is not None:  # what the latency budget was repaired on (the measured one comes later)
            attrs["latency_predicted_fraction"] = ctx.space.cost(ratios)["latency"]
        fid = cfg.fidelity
        # The BN-recalibrated score ranks fine-grained configs like the full fine-tune (Spearman 0.92
        # on the subset) but not channel configs (0.22; benchmarks/fidelity.py): channel studies fall
        # back to the early-stop rule alone.
        ladder = fid.ladder and KINDS[plan.kind].cheap_score_ranks
        stage = "full"  # how far this trial got: bn_recal, epoch1, stopped_early or full
        if fid.bn_recal_batches > 0:
            t0 = time.perf_counter()
            recalibrate_bn(model, ctx.data.train, fid.bn_recal_batches, fid.bn_recal_batch_size, cfg.study.seed)
            attrs["bn_recal_seconds"] = time.perf_counter() - t0
            attrs["val_accuracy_bn_recal"] = evaluate(model, ctx.data.val)
            if ladder and not self.promoted(trial, "val_accuracy_bn_recal", attrs["val_accuracy_bn_recal"],
                                                ratios, fid.promote_top):
                stage = "bn_recal"
        ft = cfg.finetune
        epochs = ft.epochs
        train_cfg = cfg.finetune_recipe()

        def on_epoch(epoch: int, val_acc: float) -> bool:
            nonlocal stage
            if len(cfg.objectives) == 1:  # Optuna's pruners work on single-objective studies only
                trial.report(val_acc, epoch)
            if epoch == 1:
                trial.set_user_attr("val_accuracy_epoch1", val_acc)
                if ladder and epoch < epochs and not self.promoted(trial, "val_accuracy_epoch1", val_acc,
                                                                       ratios, fid.full_top):
                    stage = "epoch1"
                    return True
            if ft.early_stop and epoch < epochs and val_acc < ctx.floor - ft.early_stop_margin * (epochs - epoch):
                stage = "stopped_early"
                attrs["stopped_early_at_epoch"] = epoch
                log.info("trial %d: stopped after epoch %d/%d: val %.2f%% < floor %.2f%% - %.1f x %d epochs left",
                         trial.number, epoch, epochs, val_acc, ctx.floor, ft.early_stop_margin, epochs - epoch)
                return True
            return False

        start = time.perf_counter()
        history = []
        if stage == "full":
            history = finetune(pruned, ctx.dense, ctx.data, cfg, train_cfg.seed, on_epoch=on_epoch,
                               progress=ctx.progress, desc=f"trial {trial.number}")
        seconds = time.perf_counter() - start
        if stage != "full":
            done = len(history)
            attrs["finetune_epochs_saved"] = epochs - done
            attrs["finetune_seconds_saved"] = (seconds / done if done else ctx.extras.get("epoch_seconds", 0.0)) * (
                epochs - done)
            log.info("trial %d: stopped at fidelity %s (%d of %d fine-tune epochs)", trial.number, stage, done, epochs)
        else:
            ctx.extras["epoch_seconds"] = seconds / max(1, len(history))
        last_val = history[-1]["val_accuracy"] if history else attrs.get("val_accuracy_bn_recal",
                                                                          attrs["val_accuracy_before_finetune"])
        attrs.update({
            **metrics.pruned_figures(model, ctx.dense_figures),
            "val_accuracy": last_val,
            "test_accuracy": evaluate(model, ctx.data.test),
            "finetune_seconds": seconds,
            "finetune_epochs_done": len(history),
            "fidelity": stage,
            **prunable(model).describe(),  # channels (the lab's VGG) or widths (group -> channels kept)
        })
        if KINDS[plan.kind].changes_shape:  # the dense model in the same run: a latency ratio from one load level
            attrs.update(ctx.latency_meter().figures(model, ctx.dense))
        constraints = self.constraints(attrs)
        set_user_attrs(trial, {**attrs, CONSTRAINT_NAMES_ATTR: list(constraints)})
        # The list format, not trial.set_constraint: optuna-dashboard shows only the list, and both
        # would make Optuna count every constraint twice.
        trial.storage.set_trial_system_attr(trial._trial_id, "constraints", [float(v) for v in constraints.values()])
        if all(v <= 0 for v in constraints.values()) and ctx.artifact_store is not None:
            self.save_weights(trial, model, plan, attrs)
        return self.values(attrs)

    def screen(self, trial: optuna.Trial, proposed: dict, ratios: dict) -> dict:
        """Screen many, fine-tune few: the ratios of the best of ``[fidelity] screen`` candidates.

        Candidate 0 is the repaired proposal; the others perturb its per-layer
        kept fractions (:meth:`SearchSpace.perturb`, seeded by the study seed and
        the trial number) and are repaired onto the proposal's budget, so all
        cost the same. Each is scored by BN recalibration + validation accuracy
        (the trial's own cheap score); the first best runs. The sampler keeps the
        proposal as the trial's params: it learns the value of the best of its
        neighbourhood. Off (``ratios`` unchanged) for screen <= 1 and for
        enqueued warm starts, which run their rule's allocation as it is.
        """
        ctx, cfg = self.ctx, self.ctx.config
        fid = cfg.fidelity
        if fid.screen <= 1:
            return ratios
        if "warm_start" in trial.user_attrs:
            log.info("trial %d: warm start %r runs as enqueued, not screened", trial.number,
                     trial.user_attrs["warm_start"])
            return ratios
        start = time.perf_counter()
        rng = np.random.default_rng([cfg.study.seed, trial.number])
        budget = {k: v for k, v in proposed.items() if k == BUDGET}
        candidates = [ratios] + [ctx.space.repair({**ctx.space.perturb(ratios, rng, fid.screen_spread), **budget})[0]
                                 for _ in range(fid.screen - 1)]
        plans = [ctx.space.plan(c) for c in candidates]
        scores, seen = [], {}
        for plan in plans:
            key = tuple(plan.ratios.items())
            if key not in seen:  # a perturbation that rounds back onto an earlier plan needs no second score
                seen[key] = cheap_score(ctx.dense, plan, ctx.data, cfg)
            scores.append(seen[key])
        best = int(np.argmax(scores))  # the first maximum: ties go to the proposal
        seconds = time.perf_counter() - start
        set_user_attrs(trial, {"screen_plans": [{n: round(r, 6) for n, r in p.ratios.items()} for p in plans],
                               "screen_scores": scores, "screen_chosen": best, "screen_seconds": seconds})
        log.info("trial %d: screened %d candidates (%d distinct) at one budget by BN-recal val accuracy "
                 "%.2f-%.2f%% in %.1fs; fine-tuning candidate %d (%.2f%%; the proposal scored %.2f%%)",
                 trial.number, len(plans), len(seen), min(scores), max(scores), seconds, best, scores[best],
                 scores[0])
        return candidates[best]

    def promoted(self, trial: optuna.Trial, attr: str, score: float, ratios: dict, top: float) -> bool:
        """Ladder gate: is ``score`` within the ``top`` fraction of earlier trials at equal cost?

        Earlier trials sit at different budgets, and a smaller config scores lower
        for that alone, so each score is compared as its residual from a line
        fitted to (cost, score) over the earlier trials that recorded ``attr``.
        The first ``warmup_trials`` trials are always promoted.
        """
        fid = self.ctx.config.fidelity
        cost_key = self.ctx.config.cost_attr
        earlier = [(t.user_attrs[cost_key], t.user_attrs[attr])
                   for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                   if attr in t.user_attrs and cost_key in t.user_attrs]
        if len(earlier) < max(2, fid.warmup_trials):  # a line needs two points
            return True
        costs, scores = np.array(earlier).T
        slope, intercept = np.polyfit(costs, scores, 1) if np.ptp(costs) > 1e-9 else (0.0, scores.mean())
        cost = self.ctx.space.cost(ratios)[cost_key.removesuffix("_fraction")]
        residuals = scores - (slope * costs + intercept)
        mine = score - (slope * cost + intercept)
        threshold = float(np.quantile(residuals, 1.0 - top))
        log.info("trial %d: %s %.2f%% (residual %+.2f at equal cost; promotion needs >= %+.2f, top %.0f%% of %d)",
                 trial.number, attr, score, mine, threshold, 100 * top, len(earlier))
        return mine >= threshold

    def constraints(self, attrs: dict) -> dict[str, float]:
        """Constraint values, <= 0 feasible. A trial that was not fully fine-tuned is never feasible."""
        c = self.ctx.config.constraints
        out = {
            "size": attrs["size_fraction"] - c.max_size_fraction,
            "accuracy": self.ctx.floor - attrs["val_accuracy"],
            "fidelity": 0.0 if attrs["fidelity"] == "full" else 1.0,
        }
        if c.max_macs_fraction is not None:
            out["macs"] = attrs["macs_fraction"] - c.max_macs_fraction
        # Checked on the measured latency: the repair held the prediction to the cap, this checks the truth.
        if c.max_latency_ms is not None and "latency_ms" in attrs:
            out["latency"] = attrs["latency_ms"] - c.max_latency_ms
        if c.max_latency_fraction is not None and "latency_fraction" in attrs:
            out["latency"] = attrs["latency_fraction"] - c.max_latency_fraction
        return out

    def values(self, attrs: dict):
        # latency: measured beside the dense model in the same run (a ratio that machine load cancels out of)
        names = {"size": "size_fraction", "macs": "macs_fraction", "latency": "latency_fraction",
                 "accuracy": "val_accuracy"}
        values = [attrs[names[o]] for o in self.ctx.config.objectives]
        return values[0] if len(values) == 1 else tuple(values)

    def save_weights(self, trial: optuna.Trial, model: nn.Module, plan, attrs: dict) -> None:
        """Keep the fine-tuned weights so that export needs no retraining."""
        from optuna.artifacts import upload_artifact

        out = self.ctx.config.out_dir
        out.mkdir(parents=True, exist_ok=True)
        # A fresh name (mkstemp): a link planted at a predictable name is never followed.
        fd, name = tempfile.mkstemp(dir=out, prefix=f".trial-{trial.number}-", suffix=".pt")
        os.close(fd)
        path = Path(name)
        try:
            torch.save({"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                        "autoprune": {"arch": arch_of(model), "plan": plan.to_dict(), "trial": trial.number}}, path)
            artifact_id = upload_artifact(artifact_store=self.ctx.artifact_store, file_path=str(path),
                                          study_or_trial=trial)
        finally:
            path.unlink(missing_ok=True)
        trial.set_user_attr(WEIGHTS_ARTIFACT, artifact_id)
