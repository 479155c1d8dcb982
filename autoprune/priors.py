"""Priors for the search, read off a sensitivity scan.

In the lab a student looks at the sensitivity curves and picks, by hand, a
sparsity per layer: as much as the layer tolerates (its accuracy stays within a
point or two of dense), more where the layer is large because that is where the
size goes. This module makes that reading systematic and explicit:

* **Upper bounds.** A layer's upper bound is the largest grid ratio up to which
  every scanned point stays within ``tolerance`` points of the dense accuracy
  (a prefix of the curve: a noisy recovery after a large drop is not trusted).
  A layer that already loses more at the first grid ratio gets 0. If the bounds
  cannot reach the target size, no search inside them can, so they are
  loosened one layer and one grid step at a time, always the step with the
  least scanned drop per parameter (or MAC) it frees: the budget's large,
  robust layers open first, and a small, sensitive layer (conv0: under 0.1% of
  the weights) is never opened for a budget it cannot serve. Each step is
  logged.
* **Allocation.** Each layer's drop is modelled as the piecewise-linear
  interpolation of its scanned drop (dense minus scanned accuracy, points) with
  drop(0) = 0, negatives clamped to 0 and made non-decreasing (pruning more is
  never predicted to help; the scan's small recoveries are noise). Assuming
  that the drops of layers pruned together add up, the allocation that meets
  the target with the least predicted loss is found greedily: repeatedly take
  the step (1% of a layer's weights; one channel of a conv) with the least
  predicted drop per parameter (or MAC) saved, within the upper bounds, until
  the target is met. The budget functions of :mod:`autoprune.budget` then make
  it exact (fine-grained) or the largest reachable configuration under the
  target (channel).

Additivity is an approximation: pruning several layers together usually costs
more than the sum of the single-layer drops, and fine-tuning recovers much of
it. The allocation is therefore a starting point (a first trial, a prior
centre) for a search that measures real accuracy, not an answer.

* **Warm starts.** :func:`one_shot_allocation` gives the one-shot rules'
  allocations (uniform, global magnitude, LAMP; channel: uniform ratios and
  Torch-Pruning's global channel pruning), :func:`one_shot_pruned` their
  pruned networks (the benchmark's baselines); the rules are a registry
  (:func:`register_one_shot_rule`). A study enqueues the prior allocation and
  these (``[priors] warm_start``) as its first trials at the cap, so it starts
  from the best one-shot answer and searches for better ones; every later
  trial is the sampler's.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from .budget import (
    CostModel,
    ModelCosts,
    as_cost_model,
    channel_budget,
    fine_grained_budget,
)
from .errors import AutopruneError
from .fine_grained import global_magnitude_sparsities, lamp_sparsities
from .model import VGG
from .kinds import KINDS, Pruned
from .plan import check_kind, plan_for, prune
from .sources import prunable

log = logging.getLogger("autoprune")

DEFAULT_TOLERANCE = 2.0  # accuracy points, the lab's "within a couple of points"
RULE = ("greedy marginal drop per {unit} saved on piecewise-linear sensitivity curves "
        "(drop(0)=0, clamped to >= 0, non-decreasing), within the upper bounds, then made exact "
        "by the budget's shift rule; assumes the drops of layers pruned together add up")


@dataclass
class Priors:
    """Per-layer upper bounds and a starting allocation for one pruning kind.

    ``upper`` and ``allocation`` map layer -> ratio (fraction removed). For
    channel pruning a ratio ``u`` keeps ``int(round((1 - u) * c))`` channels,
    so an allocation may read slightly above its bound (``1 - kept / c``) while
    keeping exactly the channels the bound allows.
    """

    kind: str
    upper: dict
    allocation: dict
    tolerance: float
    rule: str
    log: list = field(default_factory=list)
    target_fraction: float = 1.0
    predicted_drop: float = 0.0

    def to_dict(self) -> dict:
        return {"kind": self.kind, "upper": dict(self.upper), "allocation": dict(self.allocation),
                "tolerance": self.tolerance, "rule": self.rule, "log": list(self.log),
                "target_fraction": self.target_fraction, "predicted_drop": self.predicted_drop}


def _note(messages: list[str], text: str) -> None:
    messages.append(text)
    log.info("%s", text)


def _drops(scan_df: pd.DataFrame, dense_accuracy: float, kind: str,
           layers: Sequence[str]) -> dict[str, list[tuple[float, float]]]:
    """layer -> [(grid ratio, drop in points)], ratios ascending; checks the scan has exactly ``layers``."""
    missing = [c for c in ("layer", "ratio", "accuracy") if c not in scan_df.columns]
    if missing:
        raise AutopruneError(f"a sensitivity scan needs columns layer, ratio, accuracy; missing {missing[0]}")
    if dense_accuracy is None or not math.isfinite(float(dense_accuracy)):
        raise AutopruneError("dense_accuracy must be a number (the scan's dense accuracy, percent)")
    seen = set(scan_df["layer"].astype(str))
    extra = sorted(seen - set(layers))
    if extra:
        raise AutopruneError(f"scan has layer {extra[0]!r}, not a {kind} layer; use a {kind} scan "
                             f"(layers {', '.join(layers)})")
    absent = [n for n in layers if n not in seen]
    if absent:
        raise AutopruneError(f"scan has no rows for {absent[0]}; rescan with --kind {KINDS[kind].scan_flag}")
    out = {}
    for layer in layers:
        sub = scan_df[scan_df["layer"].astype(str) == layer].sort_values("ratio")
        out[layer] = [(float(r), float(dense_accuracy) - float(a)) for r, a in zip(sub["ratio"], sub["accuracy"])]
    return out


def _upper_bounds(drops, tolerance: float) -> tuple[dict[str, float], dict[str, str]]:
    """Largest grid ratio up to which every scanned drop is within ``tolerance``."""
    upper, why = {}, {}
    for layer, points in drops.items():
        bound, first_bad = 0.0, None
        for i, (r, d) in enumerate(points):
            if d <= tolerance:
                bound = r
            else:
                first_bad = i
                break
        upper[layer] = bound
        if first_bad is None:
            r, d = points[-1]
            why[layer] = f"drop {d:.1f} points at {r:g}, the largest scanned"
        elif first_bad == 0:
            r, d = points[0]
            why[layer] = f"drop {d:.1f} points already at {r:g}"
        else:
            (r0, d0), (r1, d1) = points[first_bad - 1], points[first_bad]
            why[layer] = f"drop {d0:.1f} points at {r0:g}, {d1:.1f} at {r1:g}"
    return upper, why


def _budget(kind, costs: CostModel, target, metric, preferences=None, upper=None):
    return KINDS[kind].budget(costs, target, metric, preferences=preferences, upper=upper)


class _Curve:
    """Piecewise-linear predicted drop of one layer (x: fraction removed)."""

    def __init__(self, points: Sequence[tuple[float, float]]):
        xs = [0.0] + [x for x, _ in points]
        ys = [0.0] + [max(0.0, d) for _, d in points]
        order = np.argsort(xs, kind="stable")
        xs, ys = np.asarray(xs)[order], np.maximum.accumulate(np.asarray(ys)[order])
        # equal x (channel rounding can map two grid ratios to one width): keep the larger drop
        ux = np.unique(xs)
        self.x = ux
        self.y = np.array([ys[xs == v].max() for v in ux])

    def __call__(self, r: float) -> float:
        return float(np.interp(r, self.x, self.y))


def _greedy(kind, costs: CostModel, curves, upper, target, metric):
    """Raise the cheapest layer (predicted drop per unit saved) one step of its kind at a time until the cost
    meets the target."""
    layers = list(curves)
    k = KINDS[kind]
    ratios = {n: 0.0 for n in layers}
    current = k.greedy_cost(costs, ratios, metric)
    while current > target:
        best = None
        for i, n in enumerate(layers):
            r = k.next_ratio(costs, n, ratios[n], upper[n])
            if r is None:
                continue
            saved = current - k.greedy_cost(costs, {**ratios, n: r}, metric)
            if saved <= 0:
                continue
            price = (curves[n](r) - curves[n](ratios[n])) / saved
            key = (price, -saved, i)
            if best is None or key < best[0]:
                best = (key, n, r, current - saved)
        if best is None:  # every layer at its bound; the budget below reports it
            break
        _, n, r, current = best
        ratios[n] = r
    return ratios


def _loosen(kind, costs: CostModel, drops, curve, upper, target, metric, messages) -> None:
    """Open ``upper`` (in place) one grid step at a time, cheapest step first, until it reaches ``target``."""
    what = KINDS[kind].cost_name(metric)

    def cost(bounds):
        return KINDS[kind].cost_fraction(costs, bounds, metric)

    def reachable():
        try:
            _budget(kind, costs, target, metric, upper=upper)
            return True
        except AutopruneError:
            return False

    while not reachable():
        best = None
        current = cost(upper)
        for i, (n, pts) in enumerate(drops.items()):
            # the next scanned ratio that frees something: a narrow layer rounds neighbouring ratios to one width
            # (8 channels keep 6 at 0.2 and at 0.3), and a step that frees nothing must not stop the layer there
            steps = ((r, current - cost({**upper, n: r})) for r, _ in pts if r > upper[n] + 1e-12)
            nxt, saved = next(((r, s) for r, s in steps if s > 0), (None, 0.0))
            if nxt is None:
                continue
            price = (curve[n](nxt) - curve[n](upper[n])) / saved
            if best is None or (price, -saved, i) < best[0]:
                best = ((price, -saved, i), n, nxt)
        if best is None:  # every layer at the largest scanned ratio, and still too little
            largest = max(pts[-1][0] for pts in drops.values())
            raise AutopruneError(
                f"{what} target {target:g} cannot be reached within the scanned grid (largest ratio {largest:g}: "
                f"the smallest reachable {what} fraction is {cost(upper):.4f}); scan a grid with larger ratios"
            )
        _, n, nxt = best
        _note(messages, f"prior: {n} upper {upper[n]:.2f} -> {nxt:.2f} (scanned drop {curve[n](nxt):.1f} points): "
                        f"the bounds could not reach {what} {target:g}; this step costs the least drop per "
                        f"{'parameter' if what != 'macs' else 'MAC'} freed")
        upper[n] = nxt


def compute_priors(
    scan_df: pd.DataFrame,
    dense_accuracy: float,
    model: ModelCosts,
    kind: str,
    target_fraction: float,
    tolerance: float = DEFAULT_TOLERANCE,
    metric: str = "params",
    num_classes: int = 10,
) -> Priors:
    """Upper bounds and a least-predicted-loss allocation meeting ``target_fraction``.

    ``model``: a :class:`autoprune.budget.CostModel` (``prunable(model).cost_model()``) or the lab's
    VGG conv widths; the scan has one curve per fine-grained layer or channel group of it.
    ``target_fraction`` is the nonzero size fraction of dense (fine-grained) or
    the ``metric`` (params or MACs) fraction (channel). See the module doc for
    the rules.
    """
    kind = {"fine": "fine_grained"}.get(kind, kind)
    check_kind(kind)
    if not 0.0 < float(target_fraction) <= 1.0:
        raise AutopruneError(f"target fraction must be in (0, 1], got {target_fraction}")
    if not float(tolerance) >= 0.0:
        raise AutopruneError(f"tolerance must be >= 0 accuracy points, got {tolerance}")
    if kind == "channel" and metric not in ("params", "macs"):
        raise AutopruneError(f"channel metric must be params or macs, got {metric!r}")
    costs = as_cost_model(model, num_classes)
    what = KINDS[kind].cost_name(metric)
    drops = _drops(scan_df, dense_accuracy, kind, tuple(KINDS[kind].units(costs)))
    messages: list[str] = []
    tol = float(tolerance)
    curve = {n: _Curve(KINDS[kind].scan_points(costs, n, pts)) for n, pts in drops.items()}
    upper, why = _upper_bounds(drops, tol)
    for layer in drops:
        _note(messages, f"prior: {layer} upper {upper[layer]:.2f} ({why[layer]})")
    _loosen(kind, costs, drops, curve, upper, float(target_fraction), metric, messages)
    greedy = _greedy(kind, costs, curve, upper, float(target_fraction), metric)
    allocation = _budget(kind, costs, target_fraction, metric, preferences=greedy, upper=upper)
    reached = KINDS[kind].cost_fraction(costs, allocation, metric)
    unit = "MAC" if what == "macs" else "parameter"
    predicted = sum(curve[n](allocation[n]) for n in allocation)
    caveat = ""
    if predicted >= float(dense_accuracy):
        caveat = "; more than the dense accuracy, so additivity has broken down: expect a near-chance start"
    _note(messages, "prior: allocation " + ", ".join(f"{n} {r:.3f}" for n, r in allocation.items())
          + f" ({what} {reached:.4f} of dense, predicted drop {predicted:.1f} points if drops add up{caveat})")
    return Priors(kind=kind, upper=upper, allocation=allocation, tolerance=tol, rule=RULE.format(unit=unit),
                  log=messages, target_fraction=float(target_fraction), predicted_drop=predicted)


# --- one-shot rules: a registry, kind -> rule name -> how to compute it ---------------------------


@dataclass(frozen=True)
class OneShotRule:
    """A one-shot rule of one pruning kind.

    ``allocation(dense, target_fraction, metric)`` gives layer -> ratio.
    ``pruned(dense, target_fraction, metric)``, when set, gives the rule's own
    ``(Pruned, allocation)``; unset, the allocation is applied as a
    :class:`PruningPlan` with the kind's default criterion. ``check()``, when
    set, raises a one-line error if the rule cannot run here (a missing
    optional extra), so a config is refused before any work is done.
    """

    allocation: Callable[[VGG, float, str], dict]
    pruned: Callable[[VGG, float, str], tuple[Pruned, dict]] | None = None
    check: Callable[[], object] | None = None


_ONE_SHOT: dict[str, dict[str, OneShotRule]] = {kind: {} for kind in KINDS}
ONE_SHOT_RULES: dict[str, tuple[str, ...]] = {kind: () for kind in KINDS}  # kind -> rule names, in order


def register_one_shot_rule(kind: str, name: str, rule: OneShotRule) -> None:
    """Add (or replace) a one-shot rule; config validation and warm starts see it at once."""
    check_kind(kind)
    _ONE_SHOT[kind][name] = rule
    ONE_SHOT_RULES[kind] = tuple(_ONE_SHOT[kind])


def one_shot_rule(rule: str, kind: str) -> OneShotRule:
    """The registered rule, or a one-line error listing the rules of ``kind``."""
    check_kind(kind)
    if rule not in _ONE_SHOT[kind]:
        raise AutopruneError(f"unknown one-shot rule {rule!r} for {kind}; use one of {', '.join(ONE_SHOT_RULES[kind])}")
    return _ONE_SHOT[kind][rule]


def one_shot_allocation(rule: str, model, kind: str, target_fraction: float, metric: str = "params") -> dict:
    """A one-shot rule's per-layer ratios at ``target_fraction`` (the baselines a search must beat).

    Fine-grained (``target_fraction`` of the nonzero size; ``metric`` unused):
    ``uniform`` (one sparsity everywhere), ``global`` (one |w| threshold over
    all layers), ``lamp`` (one threshold on LAMP scores), all with the
    budget's nonzero count (``floor(target * params)``). Channel (largest
    configuration <= target in ``metric``): ``uniform`` (one prune ratio per
    conv), and Torch-Pruning's global channel pruning ``tp_magnitude``,
    ``tp_lamp``, ``tp_bn_scale`` (see :mod:`autoprune.torch_pruning_rules`):
    their kept widths as ratios ``1 - kept / c``, so that a plan keeps the
    same widths (autoprune's criterion then picks which channels).
    """
    return one_shot_rule(rule, kind).allocation(model, target_fraction, metric)


def one_shot_pruned(rule: str, dense, kind: str, target_fraction: float,
                    metric: str = "params") -> tuple[Pruned, dict]:
    """A one-shot rule applied to a copy of ``dense``: ``(Pruned, allocation)``, ready to fine-tune.

    Fine-grained rules and channel ``uniform`` apply their allocation as a plan
    (fine-grained: with its masks). The Torch-Pruning rules return Torch-Pruning's
    own pruned network (its choice of channels), masks None: the lab's VGG as an
    autoprune VGG, other models with their arch recording the kept widths.
    """
    chosen = one_shot_rule(rule, kind)
    if chosen.pruned is not None:
        return chosen.pruned(dense, target_fraction, metric)
    ratios = chosen.allocation(dense, target_fraction, metric)
    return prune(dense, plan_for(dense, kind, ratios)), ratios


def _fine_zeros(model, target_fraction: float) -> int:
    total = prunable(model).cost_model().params
    return total - math.floor(target_fraction * total + 1e-6)  # the budget's cap


def _fine_uniform(model, target_fraction, metric):
    return fine_grained_budget(prunable(model).cost_model(), target_fraction)


def _fine_global(model, target_fraction, metric):
    return global_magnitude_sparsities(model, _fine_zeros(model, target_fraction), prunable(model).fine_layers())


def _fine_lamp(model, target_fraction, metric):
    return lamp_sparsities(model, _fine_zeros(model, target_fraction), prunable(model).fine_layers())


def _channel_uniform(model, target_fraction, metric):
    return channel_budget(prunable(model).cost_model(), target_fraction, metric)


def _torch_pruning_rule(name: str) -> OneShotRule:
    # Imported when the rule runs: Torch-Pruning is an optional extra.
    def check():
        from .torch_pruning_rules import require_torch_pruning
        return require_torch_pruning(name)

    def allocation(model, target_fraction, metric):
        from .torch_pruning_rules import allocation
        return allocation(name, model, target_fraction, metric)

    def pruned(model, target_fraction, metric):
        from .torch_pruning_rules import pruned_model
        net, ratios = pruned_model(name, model, target_fraction, metric)
        return Pruned(net, None), ratios

    return OneShotRule(allocation, pruned, check)


register_one_shot_rule("fine_grained", "uniform", OneShotRule(_fine_uniform))
register_one_shot_rule("fine_grained", "global", OneShotRule(_fine_global))
register_one_shot_rule("fine_grained", "lamp", OneShotRule(_fine_lamp))
register_one_shot_rule("channel", "uniform", OneShotRule(_channel_uniform))
register_one_shot_rule("channel", "tp_magnitude", _torch_pruning_rule("tp_magnitude"))
register_one_shot_rule("channel", "tp_lamp", _torch_pruning_rule("tp_lamp"))
register_one_shot_rule("channel", "tp_bn_scale", _torch_pruning_rule("tp_bn_scale"))


def by_hand_rule(
    scan_df: pd.DataFrame,
    dense_accuracy: float,
    model: ModelCosts,
    kind: str,
    target_fraction: float,
    drop: float = 2.0,
    metric: str = "params",
    num_classes: int = 10,
) -> dict[str, float]:
    """The lab's rule: each layer's largest ratio within ``drop`` points, scaled to the target.

    The per-layer ratios become preferences of the budget's shift rule
    (:func:`autoprune.budget.fine_grained_budget` or ``channel_budget``), which
    moves them together until the target is met, no layer beyond the largest
    scanned ratio (past it the person has seen nothing; at 1.0 a layer is gone).
    """
    kind = {"fine": "fine_grained"}.get(kind, kind)
    check_kind(kind)
    costs = as_cost_model(model, num_classes)
    drops = _drops(scan_df, dense_accuracy, kind, tuple(KINDS[kind].units(costs)))
    prefs, why = _upper_bounds(drops, float(drop))
    for layer in drops:
        log.info("by hand: %s prefers %.2f (%s)", layer, prefs[layer], why[layer])
    upper = {layer: max(r for r, _ in points) for layer, points in drops.items()}
    return _budget(kind, costs, target_fraction, metric, preferences=prefs, upper=upper)
