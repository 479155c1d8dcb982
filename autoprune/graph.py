"""Channel pruning of any graph through Torch-Pruning's DependencyGraph.

A **channel group** is a set of channels that must be removed together:
the output channels of a conv, its BatchNorm and the input channels of its
consumers, plus everything coupled to them by residual adds, depthwise convs
or concatenation. Torch-Pruning's DependencyGraph finds the groups; a group is
named by its root, the first of its conv / linear layers whose output channels
it prunes in ``model.named_modules()`` order (``layer1.0.conv1``; the stem and
the first stage's residual adds of a ResNet form the group ``conv1``).

Left out: groups that reach the model's output (the classifier's output
channels), groups that name a layer in ``exclude``, and layers Torch-Pruning
has no pruner for (it never lists them). Torch-Pruning does not track ops
that move channels without a module, such as a channel shuffle
(view-transpose-view) or ``torch.roll`` over channels: it then prunes the
wrong channels without a word. :class:`ChannelGraph` checks every group once
(zero the channels to remove, prune them, compare the outputs) and raises a
one-line error naming the group and the fix (``exclude``).

Criteria (higher is kept; summed over the group's layers, each channel mapped
to the group's own index through concatenations and flattens):

* ``l1``: L1 norm of the conv / linear filters that produce the channel (a
  depthwise conv, which only filters it, does not count);
* ``bn_scale``: |gamma| of its BatchNorm(s) (network slimming);
* ``norm``: L2 norm of the weights that read it in the next conv / linear
  layers (the lab's criterion, generalised);
* ``none``: keep the first channels;
* ``tp_magnitude``, ``tp_lamp``, ``tp_bn_scale``: Torch-Pruning's group importances.

A channel plan is one ratio (fraction of channels *removed*) per group;
:func:`kept_width` turns it into a kept width. :meth:`ChannelGraph.cost` is
the exact params and conv+linear MACs of the pruned graph in closed form (no
model is pruned), so a budget can be repaired in microseconds.

``torch_pruning`` is the optional extra ``pruning``; it is imported only when
a graph is built.
"""

from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from .channel import check_round_to, rounded_width
from .errors import AutopruneError

# criterion -> Torch-Pruning group importance (given the torch_pruning module)
IMPORTANCES: dict[str, Callable] = {
    "tp_magnitude": lambda tp: tp.importance.MagnitudeImportance(p=2),
    "tp_lamp": lambda tp: tp.importance.LAMPImportance(p=2),
    "tp_bn_scale": lambda tp: tp.importance.BNScaleImportance(),
}
# criteria computed here from the group's own tensors; ``none`` keeps the first channels
OWN_CRITERIA = ("norm", "none", "bn_scale", "l1")
CRITERIA = OWN_CRITERIA + tuple(IMPORTANCES)


def require_torch_pruning(what: str):
    """The ``torch_pruning`` module, or a one-line error naming the extra to install."""
    try:
        import torch_pruning
    except ImportError:
        raise AutopruneError(
            f"{what} needs Torch-Pruning, which is not installed; pip install 'autoprune[pruning]'"
        ) from None
    return torch_pruning


def kept_width(width: int, ratio: float, round_to: int = 1) -> int:
    """Channels a group of ``width`` keeps at prune ratio ``ratio`` (fraction removed).

    ``[pruning] round_to``'s rounding (:func:`autoprune.channel.rounded_width`: the lab's
    ``round((1 - ratio) * width)`` at 1, else the nearest multiple, or the whole width when that
    is nearer), and never 0.
    """
    check_round_to(round_to)
    ratio = float(ratio)
    if not 0.0 <= ratio <= 1.0:
        raise AutopruneError(f"prune ratio must be in [0, 1], got {ratio}")
    return max(1, rounded_width((1 - ratio) * width, width, round_to))


@dataclass(frozen=True)
class Group:
    """One channel group: its name (root layer), dense width and the layers it touches."""

    name: str
    width: int
    layers: tuple  # module names whose output channels it prunes (conv, linear, norms), named_modules order


@dataclass(frozen=True)
class _Term:
    """One parameterised module's share of the cost, as a function of the groups' removed channels."""

    shapes: tuple  # per parameter, weight first: (dense shape, dim 0 follows out, dim 1 follows in)
    out: tuple  # ((group, channels removed per channel of the group), ...) for dim 0
    inp: tuple  # the same for the input dim
    out_dense: int
    in_dense: int
    macs_per_weight: int  # conv / linear: MACs per weight element in one forward (positions x calls); else 0


class ChannelGraph:
    """The channel groups of ``model`` (traced once on ``example_input``) and their surgery.

    ``model`` is pruned in place by :meth:`prune_to`; callers give it a copy.
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor, exclude: Iterable[str] = (),
                 check: bool = True):
        tp = require_torch_pruning("channel pruning")
        self.tp, self.model, self.example_input = tp, model, example_input
        names = {m: n for n, m in model.named_modules()}
        self._names = names
        modules = dict(model.named_modules())
        exclude = list(exclude)
        for name in exclude:
            if name not in modules:
                raise AutopruneError(f"exclude names no layer {name!r} of this model; use module names "
                                     f"such as {next(n for n in modules if n)!r}")
        was_training = model.training
        model.eval()  # the trace runs a forward pass: keep BatchNorm's running stats as they are
        with _recording_macs(model) as macs, torch.enable_grad():  # Torch-Pruning traces the autograd graph
            self.dg = tp.DependencyGraph().build_dependency(model, (example_input,), verbose=False)
        model.train(was_training)
        order = {n: i for i, n in enumerate(modules)}
        self.groups: dict[str, Group] = {}
        self._roots: dict[str, nn.Module] = {}
        found = []
        for group in self.dg.get_all_groups(root_module_types=(nn.modules.conv._ConvNd, nn.Linear)):
            layers = self._out_layers(group)
            roots = [n for n in layers if isinstance(modules[n], (nn.modules.conv._ConvNd, nn.Linear))]
            if not roots or self._reaches_output(group) or any(n in exclude for n in layers):
                continue
            root = min(roots, key=order.__getitem__)
            found.append(Group(root, int(self.dg.get_out_channels(modules[root])), tuple(layers)))
        for g in sorted(found, key=lambda g: order[g.name]):
            self.groups[g.name] = g
            self._roots[g.name] = modules[g.name]
        self._terms = self._cost_terms(macs)
        if check:
            self.check()

    # --- structure -------------------------------------------------------------

    def _out_layers(self, group) -> list[str]:
        """Named modules whose output channels the group prunes, in named_modules order."""
        seen = []
        for dep, _ in group:
            m = dep.target.module
            if m in self._names and self.dg.is_out_channel_pruning_fn(dep.handler) and self._names[m] not in seen:
                seen.append(self._names[m])
        order = {n: i for i, n in enumerate(self._names.values())}
        return sorted(seen, key=order.__getitem__)

    def _reaches_output(self, group) -> bool:
        """Whether the group's channels are the model's output channels (the classifier's output)."""
        OPTYPE = self.tp.ops.OPTYPE
        passes = (OPTYPE.CONV, OPTYPE.LINEAR)  # these map channels to new ones: the walk stops there
        stack = [dep.target for dep, _ in group if self.dg.is_out_channel_pruning_fn(dep.handler)]
        seen = set()
        while stack:
            node = stack.pop()
            if not node.outputs or node.type == OPTYPE.OUTPUT:  # the node that made the model's output
                return True
            for out in node.outputs:
                if out.type not in passes and id(out) not in seen:
                    seen.add(id(out))
                    stack.append(out)
        return False

    def _group(self, name: str, idxs: list[int]):
        root = self._roots[name]
        return self.dg.get_pruning_group(root, self.dg.get_pruner_of_module(root).prune_out_channels, idxs)

    # --- exact cost ------------------------------------------------------------

    def _cost_terms(self, macs: dict[nn.Module, int]) -> list[_Term]:
        """Per parameterised module: how its tensors shrink as groups lose channels, and its MACs."""
        out_of: dict[nn.Module, list] = {}
        in_of: dict[nn.Module, list] = {}
        for name in self.groups:
            for dep, idxs in self._group(name, [0]):  # one channel removed: entries each module loses
                m = dep.target.module
                if not isinstance(m, nn.Module) or m not in self._names:
                    continue
                if self.dg.is_out_channel_pruning_fn(dep.handler):
                    out_of.setdefault(m, []).append((name, len(idxs)))
                elif self.dg.is_in_channel_pruning_fn(dep.handler):
                    in_of.setdefault(m, []).append((name, len(idxs)))
        terms = []
        for m in self.model.modules():
            params = list(m.parameters(recurse=False))
            if not params:
                continue
            conv, linear = isinstance(m, nn.modules.conv._ConvNd), isinstance(m, nn.Linear)
            out_dense = m.out_channels if conv else m.out_features if linear else params[0].shape[0]
            in_dense = m.in_channels if conv else m.in_features if linear else 0
            depthwise = _is_depthwise(m)
            shapes = tuple((tuple(p.shape), m in out_of and p.dim() >= 1 and p.shape[0] == out_dense,
                            m in in_of and (conv or linear) and p.dim() >= 2 and not depthwise) for p in params)
            terms.append(_Term(shapes, tuple(out_of.get(m, ())), tuple(in_of.get(m, ())),
                               out_dense, in_dense, macs.get(m, 0)))
        return terms

    def cost(self, kept: dict[str, int] | None = None) -> dict[str, int]:
        """Exact ``{'params', 'macs'}`` of the model pruned to widths ``kept`` (group -> channels kept).

        MACs are conv + linear multiply-accumulates for one example input (the
        lab's convention; biases, norms and activations are not counted).
        """
        kept = kept or {}
        unknown = [n for n in kept if n not in self.groups]
        if unknown:
            raise AutopruneError(f"unknown channel group {unknown[0]!r}; groups: {', '.join(self.groups)}")
        removed = {n: g.width - int(kept.get(n, g.width)) for n, g in self.groups.items()}
        params = macs = 0
        for t in self._terms:
            out = t.out_dense - sum(k * removed[g] for g, k in t.out)
            inp = t.in_dense - sum(k * removed[g] for g, k in t.inp)
            for i, (shape, from_out, from_in) in enumerate(t.shapes):
                dims = list(shape)
                if from_out:
                    dims[0] = out
                if from_in:
                    dims[1] = inp * shape[1] // t.in_dense  # in per group: groups stay fixed
                n = 1
                for d in dims:
                    n *= d
                params += n
                if i == 0:  # the weight
                    macs += n * t.macs_per_weight
        return {"params": params, "macs": macs}

    # --- importance and surgery --------------------------------------------------

    def importance(self, name: str, criterion: str) -> torch.Tensor | None:
        """Importance of each channel of group ``name`` (higher is kept); None for ``none``."""
        if criterion == "none":
            return None
        group = self._group(name, list(range(self.groups[name].width)))
        if criterion in IMPORTANCES:
            with torch.no_grad():
                return IMPORTANCES[criterion](self.tp)(group).detach().double()
        if criterion not in OWN_CRITERIA:
            raise AutopruneError(f"unknown channel criterion {criterion!r}; use one of {', '.join(CRITERIA)}")
        width = self.groups[name].width
        score = torch.zeros(width, dtype=torch.float64)
        used = False
        for item in group.items:
            dep, idxs, root_idxs = item.dep, item.idxs, item.root_idxs
            m = dep.target.module
            out = self.dg.is_out_channel_pruning_fn(dep.handler)
            inp = self.dg.is_in_channel_pruning_fn(dep.handler)
            weighted = isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
            idx, root = torch.as_tensor(idxs), torch.as_tensor(root_idxs)
            if criterion == "l1" and out and weighted and not _is_depthwise(m):
                w = m.weight.detach().double()
                score.index_add_(0, root, w.abs().flatten(1).sum(1)[idx])
                used = True
            elif criterion == "bn_scale" and out and isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                score.index_add_(0, root, m.weight.detach().double().abs()[idx])
                used = True
            elif criterion == "norm" and inp and weighted and not _is_depthwise(m):
                w = m.weight.detach().double().transpose(0, 1)  # input channels first
                score.index_add_(0, root, (w.flatten(1) ** 2).sum(1)[idx])
                used = True
        if not used:
            need = {"l1": "a conv or linear layer producing its channels", "bn_scale": "a BatchNorm",
                    "norm": "a conv or linear layer reading its channels"}[criterion]
            raise AutopruneError(f"channel criterion {criterion!r} needs {need} in group {name!r}, which has "
                                 f"none; use criterion l1 or tp_magnitude")
        return score.sqrt() if criterion == "norm" else score

    def prune_to(self, kept: dict[str, int], importances: dict[str, torch.Tensor | None] | None = None) -> nn.Module:
        """Prune ``self.model`` in place to the widths ``kept``, keeping the most important channels.

        Without an importance for a group its first ``kept`` channels stay (a
        rebuild: the weights are loaded afterwards). Importances must come from
        the unpruned model (see :func:`prune_channels`).
        """
        importances = importances or {}
        for name, keep in kept.items():
            if name not in self.groups:
                raise AutopruneError(f"unknown channel group {name!r}; groups: {', '.join(self.groups)}")
            width = self.groups[name].width
            if not (isinstance(keep, int) and not isinstance(keep, bool) and 1 <= keep <= width):
                raise AutopruneError(f"group {name!r} has {width} channels; its kept width must be an integer "
                                     f"in [1, {width}], got {keep!r}")
        for name, keep in kept.items():
            width = self.groups[name].width
            if keep == width:
                continue
            imp = importances.get(name)
            if imp is None:
                drop = list(range(keep, width))
            else:
                order = torch.argsort(imp, descending=True, stable=True)
                drop = sorted(order[keep:].tolist())
            self._group(name, drop).prune(record_history=False)
        return self.model

    def check(self) -> None:
        """Every group is pruned exactly by Torch-Pruning, or a one-line error names the first that is not.

        Removing a channel whose weights are zero must not change the
        outputs; an op that moves channels without Torch-Pruning seeing it
        (channel shuffle, ``torch.roll``) breaks that for its group.
        """
        candidates = [n for n, g in self.groups.items() if g.width > 2]
        if not candidates or _on_meta(self.model):
            return
        if _prunes_exactly(self.model, self.example_input, candidates):
            return
        for name in candidates:
            if not _prunes_exactly(self.model, self.example_input, [name]):
                raise AutopruneError(
                    f"Torch-Pruning cannot prune channel group {name!r} of this model: an op it does not track "
                    f"(such as a channel shuffle or torch.roll over channels) moves its channels; leave it "
                    f"dense: build_model(..., exclude=[{name!r}]) (profile: --exclude {name})")
        raise AutopruneError("Torch-Pruning cannot prune these channel groups together (an op it does not track "
                             "moves channels between them); exclude the layers around that op")


def torch_pruning_count(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Torch-Pruning's own count, ``tp.utils.count_ops_and_params``: ``{'params', 'ops'}``.

    Its ops count every op it knows (convs and linear layers with their
    biases, BatchNorm, activations, pooling), so it is larger than the
    conv + linear MACs that autoprune's budgets use.
    """
    tp = require_torch_pruning("Torch-Pruning's op count")
    with contextlib.redirect_stdout(io.StringIO()):  # it may print; a --json stdout holds one object only
        ops, params = tp.utils.count_ops_and_params(model, example_input)
    return {"params": int(params), "ops": int(ops)}


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.groups == m.in_channels


def _on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


@contextlib.contextmanager
def _recording_macs(model: nn.Module):
    """Records, during one forward, conv / linear module -> MACs per weight element (summed over calls)."""
    found: dict[nn.Module, int] = {}

    def hook(m, args, out):
        if isinstance(m, nn.modules.conv._ConvNd):
            per = out.numel() // out.shape[0] // m.out_channels  # output positions of one example
        else:
            per = args[0].numel() // args[0].shape[0] // m.in_features if args[0].dim() > 1 else 1
        found[m] = found.get(m, 0) + per

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def _prunes_exactly(model: nn.Module, example_input: torch.Tensor, names: list[str]) -> bool:
    """Zero channel 1 of each named group in a copy, prune it there, and compare the outputs."""
    dense = copy.deepcopy(model).eval()
    graph = ChannelGraph(dense, example_input, check=False)
    with torch.no_grad():
        for name in names:
            for dep, idxs in graph._group(name, [1]):
                m = dep.target.module
                if isinstance(m, nn.Module) and graph.dg.is_out_channel_pruning_fn(dep.handler):
                    out = graph.dg.get_out_channels(m)
                    for p in m.parameters(recurse=False):
                        if p.dim() >= 1 and p.shape[0] == out:
                            p[list(idxs)] = 0
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(example_input.shape, generator=generator).to(example_input)
        want = dense(x)
        pruned = copy.deepcopy(dense)
    pruned_graph = ChannelGraph(pruned, example_input, check=False)
    last = {n: torch.ones(pruned_graph.groups[n].width).index_fill_(0, torch.tensor([1]), 0.0) for n in names}
    pruned_graph.prune_to({n: pruned_graph.groups[n].width - 1 for n in names}, last)  # channel 1 goes
    try:
        with torch.no_grad():
            got = pruned.eval()(x)
    except Exception:  # the pruned graph does not even run (e.g. a reshape into fixed channel groups)
        return False
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return False
    scale = float(want.abs().max()) or 1.0
    return bool((got - want).abs().max() <= 1e-4 * scale)


def prune_channels(model: nn.Module, example_input: torch.Tensor, ratios: dict[str, float],
                   criterion: str = "l1", round_to: int = 1, exclude: Iterable[str] = (),
                   check: bool = True) -> tuple[nn.Module, dict]:
    """A pruned copy of ``model`` (``model`` is untouched) and the kept width of every group.

    Importances are computed on the dense copy before any group is pruned, so
    the order in which groups are cut does not matter. ``check=False`` skips
    :meth:`ChannelGraph.check` (for an architecture already checked).
    """
    if criterion not in CRITERIA:
        raise AutopruneError(f"unknown channel criterion {criterion!r}; use one of {', '.join(CRITERIA)}")
    graph = ChannelGraph(copy.deepcopy(model), example_input, exclude, check)
    unknown = [n for n in ratios if n not in graph.groups]
    if unknown:
        raise AutopruneError(f"unknown channel group {unknown[0]!r}; groups: {', '.join(graph.groups)}")
    kept = {n: kept_width(g.width, ratios.get(n, 0.0), round_to) for n, g in graph.groups.items()}
    importances = {n: graph.importance(n, criterion) for n in graph.groups if kept[n] < graph.groups[n].width}
    pruned = graph.prune_to(kept, importances)
    return pruned.train(model.training), kept
