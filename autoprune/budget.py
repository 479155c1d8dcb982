"""Exact budgets: per-layer ratios that hit a size (or MACs) target.

Both kinds use one rule: ratio_l = clip(pref_l + t, lower_l, upper_l) with a
single shift t found by bisection, so the preferences keep their order and
spacing while the total meets the target. ``pref`` all equal gives uniform
pruning.

* Fine-grained: the target is the lab's nonzero size as a fraction of dense
  (BatchNorm and biases stay dense). Integer zero counts are then distributed
  so that the total is exact: the nonzero count is ``floor(target * params)``,
  at most the target and within one weight of it (a budget is a cap).
* Channel: the target is a fraction of dense parameters, MACs or predicted
  latency. Channel counts are integers (rounded to multiples of ``round_to``
  where set, and costed on those rounded widths), so the result is the
  reachable configuration closest to the target from below (a budget is a cap).

Budgets run over a :class:`CostModel`: a model's fine-grained layers (weight
elements), its channel groups (dense widths), its kept-width rule and its
closed-form cost (``Prunable.cost_model()`` of :mod:`autoprune.sources` gives
one for any model; the lab's VGG: :func:`vgg_cost_model`, and every function
here still takes the VGG's conv widths as a list).

Params and MACs are closed-form (no model is built), so a search can repair a
sampled point in microseconds before spending any fine-tuning on it. Latency
is a caller's function of the kept widths (:class:`autoprune.latency.PredictedFraction`,
the lookup table's sum and the study's latency fit, for any model with an
``arch``): not strictly monotone (each entry is a timing), but
the bisection keeps only shifts whose cost meets the target, so the cap holds
by the predictor whatever its noise.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Callable, Sequence, Union

from .channel import kept_channels
from .errors import AutopruneError
from .fine_grained import num_zeros
from .model import CONV_NAMES, VGG_PLAN

_BISECT_STEPS = 100
CHANNEL_METRICS = ("params", "macs", "latency")
# CostModel.widths(kept) (the lab's VGG: every conv's width; graph models: group -> kept) -> fraction of dense
WidthsCost = Callable[[object], float]


class CostModel:
    """What a budget needs of a model, whatever its source.

    ``layers``: fine-grained layer -> weight elements; ``params``: dense parameter count (the size a
    fine-grained fraction is of); ``groups``: called once, channel group -> dense width (a graph model
    traces on that call, so a fine-grained budget never needs Torch-Pruning); ``kept(ratios, round_to)``:
    channels each group keeps; ``cost(kept)``: exact ``{'params', 'macs'}`` with groups cut to ``kept``;
    ``widths(kept)``: what a latency predictor is given; ``channels``: the lab's VGG conv widths (its plans
    record them), None for other models; ``arch``: the dense model's architecture dict (``model.arch()``,
    ``sources.arch_of``), from which a latency predictor rebuilds the layers at any widths.
    """

    def __init__(self, layers: dict[str, int], params: int, groups: Callable[[], dict[str, int]],
                 kept: Callable[[dict, int], dict[str, int]], cost: Callable[[dict], dict[str, int]],
                 widths: Callable[[dict], object] = dict, channels: Sequence[int] | None = None,
                 arch: dict | None = None):
        self.layers, self.params = dict(layers), int(params)
        self._groups, self.kept, self.cost, self.widths = groups, kept, cost, widths
        self.channels = None if channels is None else [int(c) for c in channels]
        self.arch = arch

    @cached_property
    def groups(self) -> dict[str, int]:
        return dict(self._groups())

    @cached_property
    def dense(self) -> dict[str, int]:
        return self.cost({})


ModelCosts = Union[CostModel, Sequence[int]]  # a cost model, or the lab's VGG conv widths


def vgg_cost_model(channels: Sequence[int], num_classes: int = 10) -> CostModel:
    """The lab's VGG of these conv widths, in closed form: groups ``conv0``..``conv6``, latency on every
    conv's width (:class:`autoprune.latency.PredictedFraction`)."""
    channels = [int(c) for c in channels]
    groups = dict(zip(CONV_NAMES[:-1], channels))

    def kept(ratios, round_to=1):
        return dict(zip(groups, kept_channels(channels, ratios, round_to)))

    def widths(kept):
        return [int(kept.get(n, c)) for n, c in groups.items()] + [channels[-1]]

    return CostModel(layer_numels(channels, num_classes), vgg_cost(channels, num_classes)["params"],
                     lambda: groups, kept, lambda k: vgg_cost(widths(k), num_classes), widths, channels,
                     {"name": "vgg", "channels": channels, "num_classes": int(num_classes)})


def as_cost_model(model: ModelCosts, num_classes: int = 10) -> CostModel:
    """``model`` itself, or the lab's VGG of these conv widths."""
    return model if isinstance(model, CostModel) else vgg_cost_model(model, num_classes)


# --- closed-form costs ---------------------------------------------------------


def vgg_cost(channels: Sequence[int], num_classes: int = 10) -> dict[str, int]:
    """Parameters and conv+linear MACs (one 32x32 image) of a VGG with these widths."""
    params = macs = 0
    size, c_in, widths = 32, 3, iter(channels)
    for v in VGG_PLAN:
        if v == "M":
            size //= 2
            continue
        c_out = next(widths)
        params += c_in * c_out * 9 + 2 * c_out  # conv weight (no bias) + BatchNorm weight, bias
        macs += c_in * c_out * 9 * size * size
        c_in = c_out
    params += c_in * num_classes + num_classes
    macs += c_in * num_classes
    return {"params": params, "macs": macs}


def layer_numels(channels: Sequence[int], num_classes: int = 10) -> dict[str, int]:
    """Elements of each prunable tensor (conv weights, classifier weight)."""
    numels, c_in = {}, 3
    for name, c_out in zip(CONV_NAMES, channels):
        numels[name] = c_in * c_out * 9
        c_in = c_out
    numels["classifier"] = c_in * num_classes
    return numels


def fine_size_fraction(model: ModelCosts, sparsities: dict[str, float], num_classes: int = 10) -> float:
    """Nonzero size / dense size of a fine-grained plan (the lab's convention)."""
    costs = as_cost_model(model, num_classes)
    zeros = sum(num_zeros(n, sparsities.get(layer, 0.0)) for layer, n in costs.layers.items())
    return (costs.params - zeros) / costs.params


def channel_cost_fraction(
    model: ModelCosts, ratios: dict[str, float], metric: str = "params", num_classes: int = 10,
    round_to: int = 1, latency: WidthsCost | None = None,
) -> float:
    """Params, MACs or (with ``latency``, the predictor) latency of the channel-pruned model as a fraction of
    dense, on the widths the plan keeps (rounded to multiples of ``round_to``)."""
    costs = as_cost_model(model, num_classes)
    kept = costs.kept(ratios, round_to)  # checks round_to (kept_channels / kept_width)
    if metric == "latency":
        if latency is None:
            raise AutopruneError("a latency budget needs the latency predictor; set [latency] predict = true")
        return float(latency(costs.widths(kept)))
    return costs.cost(kept)[metric] / costs.dense[metric]


# --- the shared shift rule -----------------------------------------------------


def _bounds(layers, lower, upper, default_upper):
    lower = dict(lower or {})
    upper = dict(upper or {})
    for layer in list(lower) + list(upper):
        if layer not in layers:
            raise AutopruneError(f"unknown layer {layer!r} in bounds; valid layers: {', '.join(layers)}")
    lo = {n: float(lower.get(n, 0.0)) for n in layers}
    hi = {n: min(float(upper.get(n, default_upper[n])), default_upper[n]) for n in layers}
    for n in layers:
        if not 0.0 <= lo[n] <= hi[n] <= 1.0:
            raise AutopruneError(f"bounds for {n} must satisfy 0 <= lower <= upper <= 1, got [{lo[n]}, {hi[n]}]")
    return lo, hi


def _shifted(prefs, lo, hi, t):
    return {n: min(max(prefs[n] + t, lo[n]), hi[n]) for n in prefs}


def _solve_shift(prefs, lo, hi, cost, target) -> float:
    """Smallest shift t with cost(ratios(t)) <= target (cost falls as t grows)."""
    a = -1.0 - max(prefs.values())
    b = 1.0 - min(prefs.values())
    for _ in range(_BISECT_STEPS):
        mid = (a + b) / 2
        if cost(_shifted(prefs, lo, hi, mid)) <= target:
            b = mid
        else:
            a = mid
    return b


def _prefs(layers, preferences):
    preferences = dict(preferences or {})
    for layer in preferences:
        if layer not in layers:
            raise AutopruneError(f"unknown layer {layer!r} in preferences; valid layers: {', '.join(layers)}")
    return {n: float(preferences.get(n, 0.0)) for n in layers}


def _check_target(target: float, what: str) -> None:
    if not 0.0 < target <= 1.0:
        raise AutopruneError(f"target {what} fraction must be in (0, 1], got {target}")


# --- fine-grained --------------------------------------------------------------


def fine_grained_budget(
    model: ModelCosts,
    target_fraction: float,
    preferences: dict[str, float] | None = None,
    lower: dict[str, float] | None = None,
    upper: dict[str, float] | None = None,
    num_classes: int = 10,
) -> dict[str, float]:
    """Per-layer sparsities whose nonzero size is ``target_fraction`` of dense, exactly."""
    _check_target(target_fraction, "size")
    costs = as_cost_model(model, num_classes)
    numels, total = costs.layers, costs.params
    layers = tuple(numels)
    lo, hi = _bounds(layers, lower, upper, {n: 1.0 for n in layers})
    # A budget is a cap: round the nonzero count down (the 1e-6 absorbs float error).
    zeros_wanted = total - math.floor(target_fraction * total + 1e-6)
    zmin = sum(math.ceil(numels[n] * lo[n]) for n in layers)
    zmax = sum(math.floor(numels[n] * hi[n]) for n in layers)
    if zeros_wanted > zmax:
        raise AutopruneError(
            f"size target {target_fraction:.4f} is below what the bounds allow; the smallest "
            f"reachable size fraction is {(total - zmax) / total:.4f}"
        )
    if zeros_wanted < zmin:
        raise AutopruneError(
            f"size target {target_fraction:.4f} is above what the lower bounds allow; the largest "
            f"reachable size fraction is {(total - zmin) / total:.4f}"
        )
    prefs = _prefs(layers, preferences)

    def kept_fraction(sp):
        return (total - sum(numels[n] * sp[n] for n in layers)) / total

    t = _solve_shift(prefs, lo, hi, kept_fraction, (total - zeros_wanted) / total)
    exact = {n: numels[n] * s for n, s in _shifted(prefs, lo, hi, t).items()}
    # Integer zero counts within each layer's bounds, then hand out the remainder
    # one zero per layer per pass, by largest fractional part, so that the total is
    # exact and every layer stays within one weight of its exact share.
    zeros = {n: min(max(math.floor(exact[n]), math.ceil(numels[n] * lo[n])), math.floor(numels[n] * hi[n]))
             for n in layers}
    remainder = zeros_wanted - sum(zeros.values())
    step = 1 if remainder > 0 else -1
    order = sorted(layers, key=lambda n: exact[n] - zeros[n], reverse=step > 0)
    while remainder:
        moved = False
        for n in order:
            room = (math.floor(numels[n] * hi[n]) - zeros[n]) if step > 0 else (zeros[n] - math.ceil(numels[n] * lo[n]))
            if remainder and room > 0:
                take = 1
                zeros[n] += step * take
                remainder -= step * take
                moved = True
        if not moved:  # cannot happen after the reachability checks above
            raise AutopruneError("internal error: cannot distribute the zero budget")
    return {n: zeros[n] / numels[n] for n in layers}


# --- channel -------------------------------------------------------------------


def channel_upper_bounds(model: ModelCosts) -> dict[str, float]:
    """Largest prune ratio of each channel group that still keeps one channel."""
    return {n: 1.0 - 1.0 / c for n, c in as_cost_model(model).groups.items()}


def channel_budget(
    model: ModelCosts,
    target_fraction: float,
    metric: str = "params",
    preferences: dict[str, float] | None = None,
    lower: dict[str, float] | None = None,
    upper: dict[str, float] | None = None,
    num_classes: int = 10,
    round_to: int = 1,
    latency: WidthsCost | None = None,
) -> dict[str, float]:
    """Per-group prune ratios whose params, MACs or predicted latency (``latency``) are the largest reachable
    <= target, on widths rounded to multiples of ``round_to``.

    Ratios are returned as ``1 - kept / width``, so the plan keeps exactly
    the channel counts found.
    """
    if metric not in CHANNEL_METRICS:
        raise AutopruneError(f"channel budget metric must be one of {', '.join(CHANNEL_METRICS)}, got {metric!r}")
    _check_target(target_fraction, metric)
    costs = as_cost_model(model, num_classes)
    layers = tuple(costs.groups)
    lo, hi = _bounds(layers, lower, upper, channel_upper_bounds(costs))

    def cost(ratios):
        return channel_cost_fraction(costs, ratios, metric, num_classes, round_to, latency)

    smallest = cost(hi)
    if smallest > target_fraction:
        raise AutopruneError(
            f"{metric} target {target_fraction:.4f} is below what the bounds allow; the smallest "
            f"reachable {metric} fraction is {smallest:.4f}"
        )
    t = _solve_shift(_prefs(layers, preferences), lo, hi, cost, target_fraction)
    ratios = _shifted(_prefs(layers, preferences), lo, hi, t)
    kept = costs.kept(ratios, round_to)
    return {n: 1.0 - kept[n] / c for n, c in costs.groups.items()}
