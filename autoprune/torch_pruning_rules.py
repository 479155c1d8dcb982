"""Torch-Pruning's global channel pruning as one-shot channel rules, at a params or MACs target, for any model.

The baselines a user would reach for: Torch-Pruning's ``BasePruner`` with
``global_pruning=True`` (one importance threshold over all channel groups)
and one of its importances:

* ``tp_magnitude``: ``MagnitudeImportance(p=2)`` (group L2 norm, mean-normalised per layer),
* ``tp_lamp``: ``LAMPImportance(p=2)``,
* ``tp_bn_scale``: ``BNScaleImportance()`` (network slimming's |gamma|).

It runs on a deep copy of the dense model with the layers autoprune never
cuts ignored, so the result is comparable with autoprune's channel plans:

* the lab's VGG: conv7 (it feeds the classifier) and the classifier; the
  groups are ``conv0``..``conv6``;
* any other model :func:`autoprune.sources.prunable` accepts: every layer
  outside the channel groups of :class:`autoprune.graph.ChannelGraph` (the
  classifier and the groups that reach the output, the arch's ``exclude``);
  the groups are named as ``ChannelGraph`` names them.

Torch-Pruning's ``pruning_ratio`` is a fraction of channels, not of params
or MACs. A global threshold that removes ``n`` channels removes a superset of
those it removes at ``n - 1``, so the cost falls as ``n`` grows, and the
number removed at the smallest ``n`` whose cost meets the target gives the
largest reachable cost <= target; it is found by bisection on ``n``, each
step a fresh copy pruned by Torch-Pruning. Costs are the model's own cost
model (``prunable(model).cost_model()``: the lab's VGG in closed form,
:func:`autoprune.budget.vgg_cost`; other models :meth:`ChannelGraph.cost`) on
the kept widths.

Torch-Pruning silently skips a group that the threshold would empty (the
group stays dense, so past that point the cost jumps back up); such outcomes
count as out of reach, and a target that needs one is an error.

``torch_pruning`` is an optional extra, imported only when a rule runs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .budget import CostModel
from .errors import AutopruneError
from .graph import IMPORTANCES
from .graph import require_torch_pruning as require
from .model import ARCH_ATTR, CONV_NAMES, VGG, arch_of, build_model
from .sources import prunable


def require_torch_pruning(rule: str):
    """The ``torch_pruning`` module, or a one-line error naming the extra to install."""
    return require(f"one-shot rule {rule!r}")


def _check_rule(rule: str) -> None:
    if rule not in IMPORTANCES:
        raise AutopruneError(f"unknown Torch-Pruning rule {rule!r}; use one of {', '.join(IMPORTANCES)}")


@dataclass(frozen=True)
class Target:
    """What Torch-Pruning prunes of a model: its channel groups by root layer, and the layers it leaves whole."""

    groups: dict[str, int]  # channel group -> dense width (autoprune's names)
    roots: dict[str, str]  # channel group -> the module name whose output width is the group's
    members: dict[str, str]  # module name -> its group (a Torch-Pruning group is named by any of its layers)
    ignored: tuple[str, ...]  # module names Torch-Pruning must leave whole


def target_of(model: nn.Module, view=None) -> Target:
    """The lab's VGG: groups conv0..conv6, conv7 and the classifier ignored; any other model: the groups of
    its :class:`autoprune.graph.ChannelGraph`, every conv / linear outside them ignored. ``view``:
    ``prunable(model)`` when the caller has it (a graph model is traced once per view)."""
    if isinstance(model, VGG):
        groups = dict(zip(CONV_NAMES[:-1], model.channels))
        roots = {n: f"backbone.{n}" for n in groups}
        ignored = (f"backbone.{CONV_NAMES[-1]}", "classifier")
        return Target(groups, roots, {r: n for n, r in roots.items()}, ignored)
    graph = (view or prunable(model)).graph
    members = {layer: g.name for g in graph.groups.values() for layer in g.layers}
    ignored = tuple(n for n, m in model.named_modules()
                    if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and n not in members)
    return Target({n: g.width for n, g in graph.groups.items()}, {n: n for n in graph.groups}, members, ignored)


def prunable_channels(model: nn.Module) -> int:
    """Channels Torch-Pruning ranks globally: every group's (VGG: conv0..conv6; conv7 is ignored)."""
    return sum(target_of(model).groups.values())


def ratio_for(removed: int, total: int) -> float:
    """The ``pruning_ratio`` that makes Torch-Pruning remove ``removed`` of ``total`` ranked channels.

    It removes ``total - int(total * (1 - ratio))``; half a channel below the
    count keeps float error away from ``int``'s rounding edge.
    """
    return 0.0 if removed <= 0 else (removed - 0.5) / total


@dataclass
class GlobalPruned:
    """Torch-Pruning's pruned copy and what it kept."""

    module: nn.Module  # the copy Torch-Pruning pruned in place (a VGG's ``channels`` attribute is stale)
    kept: list[int]  # widths after pruning: the VGG's conv0..conv7, other models' groups in order
    emptied: list[str]  # groups the threshold would have emptied (Torch-Pruning left them dense)
    ratios: dict[str, float]  # group -> 1 - kept / width: an autoprune plan keeping these widths
    widths: dict[str, int]  # group -> channels kept


def global_prune(rule: str, model: nn.Module, pruning_ratio: float, target: Target | None = None) -> GlobalPruned:
    """Torch-Pruning's global channel pruning of a deep copy of ``model`` at ``pruning_ratio``."""
    _check_rule(rule)
    tp = require_torch_pruning(rule)
    target = target or target_of(model)
    # eval: the graph trace runs a forward pass, which in train mode would move the BN running stats
    # (Torch-Pruning 1.6 sets eval itself and leaves it; the caller's mode is restored below)
    pruned = copy.deepcopy(model).eval().requires_grad_(True)
    modules = dict(pruned.named_modules())
    names = {m: n for n, m in modules.items()}
    example = prunable(pruned).example_input()
    with torch.enable_grad():  # Torch-Pruning traces the autograd graph
        pruner = tp.pruner.BasePruner(
            pruned, example, IMPORTANCES[rule](tp), global_pruning=True, pruning_ratio=pruning_ratio,
            ignored_layers=[modules[n] for n in target.ignored])
    # Torch-Pruning skips, without a word, a group whose pruning would empty a layer: record it.
    emptied, check = [], pruner.DG.check_pruning_group

    def recording_check(group) -> bool:
        ok = check(group)
        if not ok:
            root = group[0].dep.target.module
            name = names.get(root)
            emptied.append(target.members.get(name, name or str(root)))
        return ok

    pruner.DG.check_pruning_group = recording_check
    pruner.step()
    pruned.train(model.training)
    widths = {g: int(pruner.DG.get_out_channels(modules[target.roots[g]])) for g in target.groups}
    ratios = {g: 1.0 - widths[g] / c for g, c in target.groups.items()}
    if isinstance(model, VGG):
        kept = [getattr(pruned.backbone, n).out_channels for n in CONV_NAMES]
    else:
        kept = list(widths.values())
        setattr(pruned, ARCH_ATTR, {**arch_of(model), "widths": {**arch_of(model).get("widths", {}), **widths}})
    return GlobalPruned(pruned, kept, emptied, ratios, widths)


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


def search(rule: str, model: nn.Module, target_fraction: float, metric: str = "params") -> GlobalSearch:
    """Smallest number of globally ranked channels to remove so that ``metric`` <= target (bisection)."""
    _check_rule(rule)
    if metric not in ("params", "macs"):
        raise AutopruneError(f"channel metric must be params or macs, got {metric!r}")
    if not 0.0 < float(target_fraction) <= 1.0:
        raise AutopruneError(f"target {metric} fraction must be in (0, 1], got {target_fraction}")
    require_torch_pruning(rule)
    view = prunable(model)
    target = target_of(model, view)
    costs: CostModel = view.cost_model()
    total = sum(target.groups.values())
    cache: dict[int, GlobalPruned] = {}

    def at(n: int) -> GlobalPruned:
        if n not in cache:
            cache[n] = global_prune(rule, model, ratio_for(n, total), target)
        return cache[n]

    def cost(n: int) -> float:
        return costs.cost(at(n).widths)[metric] / costs.dense[metric]

    def first(done) -> int:
        """Smallest n in [0, total] with done(n), for done monotone in n; done(total) is taken as true."""
        lo, hi = -1, total
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if done(mid) else (mid, hi)
        return hi

    # An emptied group stays emptied as n grows, so "emptied or cheap enough" is monotone too.
    n = first(lambda n: bool(at(n).emptied) or cost(n) <= target_fraction)
    if at(n).emptied:
        smallest = cost(first(lambda n: bool(at(n).emptied)) - 1)
        raise AutopruneError(
            f"{rule} cannot reach {metric} {target_fraction:g}: its global threshold empties {at(n).emptied[0]} "
            f"first (the smallest {metric} it reaches is {smallest:.4f}); use a larger target"
        )
    return GlobalSearch(rule, n, ratio_for(n, total), cost(n), at(n))


def allocation(rule: str, model: nn.Module, target_fraction: float, metric: str = "params") -> dict[str, float]:
    """Channel group -> ``1 - kept / width`` of Torch-Pruning's result (a plan that keeps the same widths)."""
    return search(rule, model, target_fraction, metric).pruned.ratios


def pruned_model(rule: str, model: nn.Module, target_fraction: float,
                 metric: str = "params") -> tuple[nn.Module, dict[str, float]]:
    """Torch-Pruning's pruned network, and its allocation: the lab's VGG as an autoprune VGG; other models
    as Torch-Pruning left them, their arch recording the kept widths (so they save and reload)."""
    found = search(rule, model, target_fraction, metric).pruned
    if isinstance(model, VGG):
        return to_vgg(found.module, found.kept, model.num_classes), found.ratios
    return found.module, found.ratios
