"""The search space: per-layer ratios bounded by priors, plus a budget, projected exactly.

Parameters of a trial:

* one float per prunable layer (its *preference*: the fraction removed, see
  :mod:`autoprune.plan`) in ``[0, upper]``, where ``upper`` comes from the
  sensitivity priors (or a wide default without them); a layer whose bound is
  0 is not searched;
* ``budget`` (multi-objective studies): the trial's cost as a fraction of the
  cap, in ``[budget_low, 1]``, so the study spreads its trials along the
  Pareto front instead of piling them at the cap. The parameter is sampled in
  ``[budget_low, 2 - budget_low]`` and values above 1 mean the cap: half the
  range stays at the cap, where the deployment pick is made (at 0.5 x the
  cap a config is not a candidate for it). Single-objective studies always
  spend the whole cap.

A *centred* space (``[priors] centre``, the default with priors) samples each
layer's preference as a deviation from a centre allocation (the best one-shot
rule's, chosen at setup) instead of anywhere in the box: the parameter is the
log of the layer's kept fraction relative to the centre's, in ``[-spread,
spread]`` (``spread`` ln 2: between half and twice the centre's kept weights),
so all parameters 0 is the centre itself, and a step means the same at 50%
as at 99% sparsity. The box ``[0, upper]`` still clips every preference.

Before any fine-tuning, the preferences are projected onto exactly that cost
(size for fine-grained; for channel, the first capped of predicted latency,
MACs, size) with :mod:`autoprune.budget`'s shift rule, which keeps their
per-layer shape; any other cap still broken (parameters, MACs) is then
enforced the same way. Channel costs are computed on the widths the plan
keeps, rounded to multiples of ``round_to``. A latency cap is a fraction of the
dense model's latency as the ``[latency]`` lookup table predicts it
(``max_latency_ms`` is turned into one: ms / the dense prediction). Optuna stores the proposal as the trial's params; the plan that
actually ran is recorded beside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import optuna

from . import budget
from .errors import AutopruneError
from .kinds import KINDS
from .plan import PruningPlan, check_kind

log = logging.getLogger("autoprune")

BUDGET = "budget"


@dataclass
class SearchSpace:
    kind: str
    channels: list | None  # the lab's VGG: conv widths of the dense model; other models: None (see ``costs``)
    upper: dict  # layer -> largest ratio searched
    max_size_fraction: float
    max_macs_fraction: float | None = None
    criterion: str = ""
    num_classes: int = 10
    budget_low: float | None = None  # lowest sampled budget (fraction of the cap); None: always the cap
    centre: dict | None = None  # layer -> ratio the deviations are from; None: the whole box
    spread: dict = field(default_factory=dict)  # layer -> (low, high) log kept-fraction deviation
    round_to: int = 1  # channel: kept channels rounded to multiples of this
    max_latency_fraction: float | None = None  # channel: cap on the predicted latency, fraction of dense
    latency: Callable | None = None  # kept widths -> predicted latency fraction (autoprune.latency.PredictedFraction)
    costs: budget.CostModel | None = None  # the model's layers, groups and costs (set by build)

    @classmethod
    def build(cls, kind, model, upper=None, *, max_size_fraction, max_macs_fraction=None,
              criterion="", num_classes=10, budget_low=None, centre=None, spread=math.log(2),
              starts=(), round_to=1, max_latency_fraction=None, latency=None) -> "SearchSpace":
        """``model``: a :class:`autoprune.budget.CostModel` (``prunable(model).cost_model()``) or the lab's
        VGG conv widths. ``centre``: sample deviations from this allocation (``spread``: half-range, log kept
        fraction), wide enough to hold each of ``starts`` (allocations enqueued as trials) exactly.
        ``latency``: the predictor a ``max_latency_fraction`` cap is repaired by."""
        check_kind(kind)
        costs = budget.as_cost_model(model, num_classes)
        default = KINDS[kind].default_upper
        hard = KINDS[kind].hard_upper(costs)
        bounds = {n: min(default if upper is None else upper[n], hard.get(n, 1.0)) for n in KINDS[kind].units(costs)}
        space = cls(kind, costs.channels, bounds, max_size_fraction, max_macs_fraction, criterion, num_classes,
                    round_to=round_to, max_latency_fraction=max_latency_fraction, latency=latency, costs=costs)
        if centre is not None:
            space.centre = {n: float(centre.get(n, 0.0)) for n in bounds}
            space.spread = {n: (-spread, spread) for n in bounds}
            for start in starts:
                for n, d in space.deviations(start).items():
                    lo, hi = space.spread[n]
                    space.spread[n] = (min(lo, d), max(hi, d))
        try:
            smallest = space.cost(bounds)[space.budget_metric] / space.cap
            space.repair({**bounds, BUDGET: 1.0})
        except AutopruneError as exc:
            raise AutopruneError(f"the search space cannot meet the caps: {exc}") from None
        if budget_low is not None:
            # Never sample a budget the bounds cannot reach (with a little room for rounding).
            space.budget_low = round(min(1.0, max(float(budget_low), smallest * 1.01)), 6)
        return space

    @classmethod
    def for_study(cls, config, model, upper=None, num_classes=10, centre=None, starts=(),
                  latency_budget=None, dense_figures=None) -> "SearchSpace":
        """The space a study config defines over a dense model (a CostModel, or the lab's VGG conv widths).

        ``latency_budget``: :func:`study_latency_budget`'s (cap, predictor) when the caller made it already;
        else made here, with the latency fit the study recorded in ``dense_figures`` (its ``dense`` attribute).
        """
        from .latency import LatencyFit

        multi = len(config.objectives) > 1
        costs = budget.as_cost_model(model, num_classes)
        cap, predictor = latency_budget or study_latency_budget(
            config, costs, num_classes, fit=LatencyFit.from_figures(dense_figures)) or (None, None)
        return cls.build(config.study.kind, costs, upper,
                         max_size_fraction=config.constraints.max_size_fraction,
                         max_macs_fraction=config.constraints.max_macs_fraction,
                         criterion=config.study.criterion, num_classes=num_classes,
                         budget_low=config.study.budget_low if multi else None,
                         centre=centre, spread=config.priors.spread, starts=starts,
                         round_to=config.pruning.round_to, max_latency_fraction=cap, latency=predictor)

    # --- what the budget is on ---------------------------------------------------

    def caps(self) -> dict[str, float]:
        """Cost -> cap (fraction of dense), the budget's own first: size (fine-grained); for channel the
        predicted latency, MACs and size caps that are set, in that order."""
        caps = ({"latency": self.max_latency_fraction, "macs": self.max_macs_fraction}
                if KINDS[self.kind].changes_shape else {})
        return {**{m: c for m, c in caps.items() if c is not None}, "size": self.max_size_fraction}

    @property
    def budget_metric(self) -> str:
        """The cost the budget sets: size (fine-grained), predicted latency, MACs or size (channel)."""
        return next(iter(self.caps()))

    @property
    def cap(self) -> float:
        return self.caps()[self.budget_metric]

    def signature(self) -> str:
        """A short hash of everything that defines the space (a study keeps one space).

        The latency cap is not in it: as a fraction of one machine's prediction it may differ
        between workers' machines (the config's constraints, which joiners must share, are).
        """
        # the lab's VGG: its conv widths, as before; other models: every layer's or group's dense size
        shape = {"kind": self.kind, "channels": self.channels if self.channels is not None else
                 KINDS[self.kind].units(self.costs),
                 "upper": {k: round(v, 6) for k, v in self.upper.items()},
                 "criterion": self.criterion, "budget_low": self.budget_low}
        if self.round_to > 1:  # absent at 1: a space's signature reads as before
            shape["round_to"] = self.round_to
        if self.centre is not None:
            shape["centre"] = {k: round(v, 6) for k, v in self.centre.items()}
            shape["spread"] = {k: [round(a, 6), round(b, 6)] for k, (a, b) in self.spread.items()}
        blob = json.dumps(shape, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # --- sampling and projection ---------------------------------------------------

    # Kept fractions below this are treated as this (a log needs > 0; 1e-6 of a layer is no weight).
    _MIN_KEPT = 1e-6

    def deviations(self, allocation: dict[str, float]) -> dict[str, float]:
        """A centred space's parameters for ``allocation``: log(kept / centre's kept), searched layers only."""
        keep = self._MIN_KEPT
        return {n: math.log(max(1.0 - float(allocation.get(n, 0.0)), keep) / max(1.0 - self.centre[n], keep))
                for n, hi in self.upper.items() if hi > 0}

    def suggest(self, trial: optuna.Trial) -> dict[str, float]:
        """The sampler's proposal: a preference per searched layer (others 0), and the budget."""
        if self.centre is None:
            proposal = {n: trial.suggest_float(n, 0.0, hi) if hi > 0 else 0.0 for n, hi in self.upper.items()}
        else:
            proposal = {n: 0.0 for n in self.upper}
            for n, hi in self.upper.items():
                if hi > 0:
                    d = trial.suggest_float(n, *self.spread[n])
                    kept = max(1.0 - self.centre[n], self._MIN_KEPT) * math.exp(d)
                    proposal[n] = min(max(1.0 - kept, 0.0), hi)
        if self.budget_low is not None and self.budget_low < 1.0:
            # Sampled in [low, 2 - low], everything >= 1 meaning the cap: half of the sampler's range
            # is the cap itself, where a deployment pick is made, the other half spreads the front.
            proposal[BUDGET] = min(1.0, trial.suggest_float(BUDGET, self.budget_low, 2.0 - self.budget_low))
        return proposal

    def perturb(self, ratios: dict[str, float], rng: np.random.Generator, spread: float) -> dict[str, float]:
        """Preferences near ``ratios``: each searched layer's kept fraction times exp(N(0, spread)).

        Relative to the kept fraction, not in ratio units: a layer keeping 4% of
        its weights moves as far in its own terms as one keeping 60% (an additive
        0.1 would wipe out the first and barely touch the second). No budget key:
        the caller adds the proposal's and repairs, so every draw costs the same.
        """
        noise = rng.standard_normal(len(self.upper))  # one draw per layer, searched or not: a stable stream
        return {n: min(max(1.0 - (1.0 - ratios.get(n, 0.0)) * math.exp(spread * z), 0.0), hi) if hi > 0 else 0.0
                for (n, hi), z in zip(self.upper.items(), noise)}

    def initial_params(self, allocation: dict[str, float]) -> dict[str, float]:
        """Trial params that reproduce a prior allocation at the full cap (for enqueue_trial)."""
        if self.centre is None:
            params = {n: min(v, self.upper[n]) for n, v in allocation.items() if self.upper.get(n, 0) > 0}
        else:
            params = {n: min(max(d, self.spread[n][0]), self.spread[n][1]) for n, d in self.deviations(allocation).items()}
        if self.budget_low is not None and self.budget_low < 1.0:
            params[BUDGET] = 1.0
        return params

    def cost(self, ratios: dict[str, float]) -> dict[str, float]:
        """Size (and, for channel plans, MACs and, with a predictor, predicted latency) as fractions of dense."""
        ratios = {n: r for n, r in ratios.items() if n != BUDGET}
        kind = KINDS[self.kind]
        metrics = {"size": "params"}
        if kind.changes_shape:  # zeros leave MACs and latency as dense
            metrics.update(macs="macs", **({"latency": "latency"} if self.latency else {}))
        return {m: kind.cost_fraction(self.costs, ratios, p, self.round_to, self.latency) for m, p in metrics.items()}

    def _project(self, ratios: dict[str, float], metric: str, target: float) -> dict[str, float]:
        return KINDS[self.kind].budget(self.costs, target, "params" if metric == "size" else metric, ratios,
                                       self.upper, self.round_to, self.latency)

    def repair(self, proposed: dict[str, float]) -> tuple[dict[str, float], list[str]]:
        """Project a proposal onto its budget, then onto any cap still broken.

        Returns the ratios to run and a note of each projection. Each later projection only
        prunes more, which keeps closed-form caps met; the predicted latency is a sum of timings
        and may tick up by noise, so the caps are checked again until a pass moves nothing.
        """
        ratios = {n: r for n, r in proposed.items() if n != BUDGET}
        target = self.cap * proposed.get(BUDGET, 1.0)
        before = self.cost(ratios)[self.budget_metric]
        ratios = self._project(ratios, self.budget_metric, target)
        notes = [f"{self.budget_metric} {before:.4f} -> budget {target:.4f} (shifted preferences: "
                 f"{self.cost(ratios)[self.budget_metric]:.4f})"]
        caps = {**self.caps(), self.budget_metric: target}
        for _ in range(len(caps) + 2):
            broken = [(m, c) for m, c in caps.items() if self.cost(ratios)[m] > c + 1e-9]  # float error is no break
            if not broken:
                return ratios, notes
            metric, cap = broken[0]
            cost = self.cost(ratios)[metric]
            ratios = self._project(ratios, metric, cap)
            notes.append(f"{metric} {cost:.4f} > cap {cap:.4f}: shifted onto the cap")
        raise AutopruneError(f"the budget repair did not settle on the caps {caps}; please report this")

    def plan(self, ratios: dict[str, float]) -> PruningPlan:
        """The plan :func:`autoprune.plan.prune` applies to the space's model (as :func:`autoprune.plan.plan_for`
        makes it: the lab's VGG records its conv widths, other models their layer or group names)."""
        ratios = {n: r for n, r in ratios.items() if r > 0}
        if self.channels is not None:
            return PruningPlan(self.kind, ratios, self.criterion, tuple(self.channels), self.round_to)
        return PruningPlan(self.kind, ratios, self.criterion, round_to=self.round_to,
                           layers=tuple(KINDS[self.kind].units(self.costs)))


def study_latency_budget(config, costs, num_classes=10, table=None, fit=None):
    """(cap as a fraction of the dense model's predicted latency, the predictor) for a study with a latency
    cap, else None. ``costs``: the dense model's :class:`autoprune.budget.CostModel` (or the lab's VGG conv
    widths); ``table``: the study's :class:`autoprune.latency.LatencyTable` (made from ``[latency]`` when not
    given); ``fit``: the study's :class:`autoprune.latency.LatencyFit` (None: the table's share alone).
    ``max_latency_ms`` becomes ms / the dense prediction (at most 1: a cap above the dense model's latency
    holds everywhere)."""
    if not config.latency_budget:
        return None
    from .latency import Meter, PredictedFraction

    if table is None:
        table = Meter.from_config(config.latency, config.latency_cache_dir).table
    predictor = PredictedFraction(table, budget.as_cost_model(costs, num_classes), num_classes, fit)
    c = config.constraints
    cap = c.max_latency_fraction if c.max_latency_fraction is not None else min(
        1.0, c.max_latency_ms / predictor.dense_ms)
    if cap <= predictor.fixed_fraction:  # no widths reach it: say why, not only that the bounds cannot
        raise AutopruneError(f"latency cap {cap:.4f} of the dense model's latency is at or below the fixed share "
                             f"{predictor.fixed_fraction:.4f} that the setup's latency fit measured (latency no "
                             f"channel pruning removes); raise the cap, or set the study up again on a quieter "
                             f"machine if that share looks wrong")
    log.info("latency budget: predicted latency <= %.4f of the dense model's %.3f ms (%s, %d thread(s), batch %d; "
             "fixed share %.2f)", cap, predictor.dense_ms, table.runtime.name, table.threads, table.batch_size,
             predictor.fixed_fraction)
    return cap, predictor
