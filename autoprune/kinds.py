"""Pruning kinds as one interface: fine-grained (weights zeroed) and channel (channels removed).

A kind says which layers a plan of it sets on a model, which criteria choose
what goes, how a plan is applied, what a budget is on and how it is met, and
whether the result is a physically smaller network (then it is timed, costs
fewer MACs and exports as TorchScript and ONNX). Modules ask ``KINDS[name]``
instead of branching on the name; a new kind is one class in :data:`KINDS`.
Ratios are the fraction *removed* for both kinds (see :mod:`autoprune.plan`).
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import nn

from . import budget
from .channel import rounded_width
from .errors import AutopruneError
from .fine_grained import magnitude_masks
from .graph import CRITERIA as GRAPH_CRITERIA
from .train import apply_masks


class Pruned(NamedTuple):
    """A pruned model and, for fine-grained plans, its masks (param name -> 0/1)."""

    model: nn.Module
    masks: dict[str, torch.Tensor] | None


class FineGrained:
    name = "fine_grained"
    title = "fine-grained"
    ratio_label = "sparsity (fraction of weights zeroed)"
    scan_label = "sparsity of the pruned layer (% of its weights zeroed)"
    changes_shape = False  # zeros in dense tensors: same shapes, MACs and latency
    # the BN-recalibrated score ranks configs like the fine-tune (Spearman 0.92 on the subset;
    # benchmarks/fidelity.py): the ladder and a centre chosen by it are worth it
    cheap_score_ranks = True
    default_upper = 0.99  # without priors a layer may go up to 0.99 sparsity

    def layers(self, view) -> tuple[str, ...]:
        """The names a plan of this kind sets on a model's pruning interface (:func:`autoprune.sources.prunable`)."""
        return tuple(view.fine_layers())

    def units(self, costs) -> dict[str, int]:
        """What a plan of this kind sets on a :class:`autoprune.budget.CostModel`: each layer's weights."""
        return costs.layers

    def criteria(self, lab_vgg: bool) -> tuple[str, ...]:
        return ("magnitude",)

    def apply(self, model: nn.Module, view, ratios: dict, criterion: str, round_to: int) -> Pruned:
        pruned = copy.deepcopy(model)
        masks = magnitude_masks(pruned, ratios, view.fine_layers())
        apply_masks(pruned, masks)
        return Pruned(pruned, masks)

    def cost_name(self, metric: str) -> str:
        return "size"  # the nonzero size, whatever the study's metric

    def cost_fraction(self, costs, ratios: dict, metric: str = "params", round_to: int = 1, latency=None) -> float:
        return budget.fine_size_fraction(costs, ratios)

    def budget(self, costs, target: float, metric: str = "params", preferences=None, upper=None, round_to: int = 1,
               latency=None) -> dict[str, float]:
        return budget.fine_grained_budget(costs, target, preferences=preferences, upper=upper)

    def hard_upper(self, costs) -> dict[str, float]:
        return {}

    # The priors' greedy allocation (autoprune.priors): a layer's scanned curve, its next step, and the cost
    # the steps are priced by.
    scan_flag = "fine"  # `autoprune sensitivity --kind`
    greedy_step = 0.01  # 1% of a layer's weights

    def scan_points(self, costs, name: str, points: list) -> list:
        return points

    def next_ratio(self, costs, name: str, ratio: float, upper: float) -> float | None:
        return None if ratio >= upper - 1e-12 else min(ratio + self.greedy_step, upper)

    def greedy_cost(self, costs, ratios: dict, metric: str = "params") -> float:
        """Continuous (no rounding of zero counts): the budget rounds later."""
        return 1.0 - sum(costs.layers[n] * r for n, r in ratios.items()) / costs.params


class Channel:
    name = "channel"
    title = "channel"
    ratio_label = "channel prune ratio"
    scan_label = "channel prune ratio of the pruned conv (% of its channels removed)"
    changes_shape = True
    cheap_score_ranks = False  # Spearman 0.22 against the fine-tune (benchmarks/fidelity.py)
    default_upper = 0.9  # capped where one channel is left; beyond 0.9 a VGG is gone

    def layers(self, view) -> tuple[str, ...]:
        return tuple(view.channel_groups())

    def units(self, costs) -> dict[str, int]:
        """Each channel group's dense width."""
        return costs.groups

    def criteria(self, lab_vgg: bool) -> tuple[str, ...]:
        return ("norm", "none", "bn_scale", "l1") if lab_vgg else GRAPH_CRITERIA

    def apply(self, model: nn.Module, view, ratios: dict, criterion: str, round_to: int) -> Pruned:
        return Pruned(view.prune_channels(ratios, criterion, round_to), None)

    def cost_name(self, metric: str) -> str:
        return metric

    def cost_fraction(self, costs, ratios: dict, metric: str = "params", round_to: int = 1, latency=None) -> float:
        return budget.channel_cost_fraction(costs, ratios, metric, round_to=round_to, latency=latency)

    def budget(self, costs, target: float, metric: str = "params", preferences=None, upper=None, round_to: int = 1,
               latency=None) -> dict[str, float]:
        return budget.channel_budget(costs, target, metric, preferences=preferences, upper=upper, round_to=round_to,
                                     latency=latency)

    def hard_upper(self, costs) -> dict[str, float]:
        return budget.channel_upper_bounds(costs)

    scan_flag = "channel"

    def scan_points(self, costs, name: str, points: list) -> list:
        """Grid ratios -> the fractions the scan actually removed (``1 - kept / width``)."""
        c = costs.groups[name]
        return [(1.0 - rounded_width((1 - r) * c, c) / c, d) for r, d in points]

    def next_ratio(self, costs, name: str, ratio: float, upper: float) -> float | None:
        """One channel fewer, down to the bound's width (at least one channel)."""
        width = costs.groups[name]
        kept = rounded_width((1 - ratio) * width, width)
        return None if kept - 1 < max(1, rounded_width((1 - upper) * width, width)) else 1.0 - (kept - 1) / width

    def greedy_cost(self, costs, ratios: dict, metric: str = "params") -> float:
        return budget.channel_cost_fraction(costs, ratios, metric)


KINDS = {k.name: k for k in (FineGrained(), Channel())}


def get_kind(name: str):
    """The kind called ``name``, or a one-line error."""
    if name not in KINDS:
        raise AutopruneError(f"unknown pruning kind {name!r}; use fine_grained or channel")
    return KINDS[name]
