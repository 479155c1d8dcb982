"""Torch-Pruning's global channel pruning as one-shot channel rules, at a params or MACs target.

The baselines a user would reach for: Torch-Pruning's ``BasePruner`` with
``global_pruning=True`` (one importance threshold over all convs) and one of
its importances:

* ``tp_magnitude``: ``MagnitudeImportance(p=2)`` (group L2 norm, mean-normalised per layer),
* ``tp_lamp``: ``LAMPImportance(p=2)``,
* ``tp_bn_scale``: ``BNScaleImportance()`` (network slimming's |gamma|).

It runs on a deep copy of the dense VGG with conv7 and the classifier
ignored: conv7 feeds the classifier and autoprune never cuts it, so the result
is comparable with autoprune's channel plans (conv0..conv6 cut, conv7 whole).

Torch-Pruning's ``pruning_ratio`` is a fraction of channels, not of params
or MACs. A global threshold that removes ``n`` channels removes a superset of
those it removes at ``n - 1``, so the cost falls as ``n`` grows, and the
number removed at the smallest ``n`` whose cost meets the target gives the
largest reachable cost <= target; it is found by bisection on ``n``, each
step a fresh copy pruned by Torch-Pruning. Costs are autoprune's closed form
(:func:`autoprune.budget.vgg_cost` on the kept widths).

Torch-Pruning silently skips a layer that the threshold would empty (the
layer stays dense, so past that point the cost jumps back up); such outcomes
count as out of reach, and a target that needs one is an error.

``torch_pruning`` is an optional extra, imported only when a rule runs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
import torch
from torch import nn

from .budget import channel_cost_fraction
from .errors import AutopruneError
from .graph import IMPORTANCES
from .graph import require_torch_pruning as require
from .model import CONV_NAMES, VGG, build_model


def require_torch_pruning(rule: str):
    """The ``torch_pruning`` module, or a one-line error naming the extra to install."""
    return require(f"one-shot rule {rule!r}")


def _check_rule(rule: str) -> None:
    if rule not in IMPORTANCES:
        raise AutopruneError(f"unknown Torch-Pruning rule {rule!r}; use one of {', '.join(IMPORTANCES)}")


def prunable_channels(model: VGG) -> int:
    """Channels Torch-Pruning ranks globally: conv0..conv6 (conv7 is ignored)."""
    return sum(model.channels[:-1])


def ratio_for(removed: int, total: int) -> float:
    """The ``pruning_ratio`` that makes Torch-Pruning remove ``removed`` of ``total`` ranked channels.

    It removes ``total - int(total * (1 - ratio))``; half a channel below the
    count keeps float error away from ``int``'s rounding edge.
    """
    return 0.0 if removed <= 0 else (removed - 0.5) / total


@dataclass
class GlobalPruned:
    """Torch-Pruning's pruned copy and what it kept."""

    module: VGG  # the VGG object Torch-Pruning pruned in place (its ``channels`` attribute is stale)
    kept: list[int]  # conv widths after pruning, conv0..conv7
    emptied: list[str]  # layers the threshold would have emptied (Torch-Pruning left them dense)
    ratios: dict[str, float]  # conv0..conv6 -> 1 - kept / c: an autoprune plan keeping these widths


def global_prune(rule: str, model: VGG, pruning_ratio: float) -> GlobalPruned:
    """Torch-Pruning's global channel pruning of a deep copy of ``model`` at ``pruning_ratio``."""
    _check_rule(rule)
    tp = require_torch_pruning(rule)
    # eval: the graph trace runs a forward pass, which in train mode would move the BN running stats
    # (Torch-Pruning 1.6 sets eval itself and leaves it; the caller's mode is restored below)
    pruned = copy.deepcopy(model).eval().requires_grad_(True)
    convs = {getattr(pruned.backbone, n): n for n in CONV_NAMES}
    device = next(pruned.parameters()).device
    with torch.enable_grad():  # Torch-Pruning traces the autograd graph
        pruner = tp.pruner.BasePruner(
            pruned, torch.zeros(1, 3, 32, 32, device=device), IMPORTANCES[rule](tp), global_pruning=True,
            pruning_ratio=pruning_ratio, ignored_layers=[getattr(pruned.backbone, CONV_NAMES[-1]), pruned.classifier])
    # Torch-Pruning skips, without a word, a group whose pruning would empty a layer: record it.
    emptied, check = [], pruner.DG.check_pruning_group

    def recording_check(group) -> bool:
        ok = check(group)
        if not ok:
            emptied.append(convs.get(group[0].dep.target.module, str(group[0].dep.target.module)))
        return ok

    pruner.DG.check_pruning_group = recording_check
    pruner.step()
    pruned.train(model.training)
    kept = [getattr(pruned.backbone, n).out_channels for n in CONV_NAMES]
    ratios = {n: 1.0 - k / c for n, k, c in zip(CONV_NAMES[:-1], kept, model.channels)}
    return GlobalPruned(pruned, kept, emptied, ratios)


def to_vgg(module: nn.Module, channels: list[int], num_classes: int) -> VGG:
    """A fresh autoprune VGG of these widths holding a pruned VGG's weights (loaded strictly)."""
    vgg = build_model("vgg", channels=channels, num_classes=num_classes)
    vgg.load_state_dict(module.state_dict())
    return vgg.to(next(module.parameters()).device).train(module.training)


@dataclass
class GlobalSearch:
    """The result of :func:`search`: the most channels kept with the cost <= target."""

    rule: str
    removed: int  # channels Torch-Pruning removed (its ranking's count; ties may remove more)
    pruning_ratio: float  # Torch-Pruning's ratio that gives it
    fraction: float  # params or MACs of the pruned model / dense
    pruned: GlobalPruned


def search(rule: str, model: VGG, target_fraction: float, metric: str = "params") -> GlobalSearch:
    """Smallest number of globally ranked channels to remove so that ``metric`` <= target (bisection)."""
    _check_rule(rule)
    if metric not in ("params", "macs"):
        raise AutopruneError(f"channel metric must be params or macs, got {metric!r}")
    if not 0.0 < float(target_fraction) <= 1.0:
        raise AutopruneError(f"target {metric} fraction must be in (0, 1], got {target_fraction}")
    total = prunable_channels(model)
    cache: dict[int, GlobalPruned] = {}

    def at(n: int) -> GlobalPruned:
        if n not in cache:
            cache[n] = global_prune(rule, model, ratio_for(n, total))
        return cache[n]

    def cost(n: int) -> float:
        return channel_cost_fraction(model.channels, at(n).ratios, metric, model.num_classes)

    def first(done) -> int:
        """Smallest n in [0, total] with done(n), for done monotone in n; done(total) is taken as true."""
        lo, hi = -1, total
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if done(mid) else (mid, hi)
        return hi

    # An emptied layer stays emptied as n grows, so "emptied or cheap enough" is monotone too.
    n = first(lambda n: bool(at(n).emptied) or cost(n) <= target_fraction)
    if at(n).emptied:
        smallest = cost(first(lambda n: bool(at(n).emptied)) - 1)
        raise AutopruneError(
            f"{rule} cannot reach {metric} {target_fraction:g}: its global threshold empties {at(n).emptied[0]} "
            f"first (the smallest {metric} it reaches is {smallest:.4f}); use a larger target"
        )
    return GlobalSearch(rule, n, ratio_for(n, total), cost(n), at(n))


def allocation(rule: str, model: VGG, target_fraction: float, metric: str = "params") -> dict[str, float]:
    """conv0..conv6 -> ``1 - kept / c`` of Torch-Pruning's result (a plan that keeps the same widths)."""
    return search(rule, model, target_fraction, metric).pruned.ratios


def pruned_vgg(rule: str, model: VGG, target_fraction: float, metric: str = "params") -> tuple[VGG, dict[str, float]]:
    """Torch-Pruning's pruned network as an autoprune VGG, and its allocation."""
    found = search(rule, model, target_fraction, metric).pruned
    return to_vgg(found.module, found.kept, model.num_classes), found.ratios
