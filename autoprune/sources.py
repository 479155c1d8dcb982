"""Model sources, the plain architecture description, checkpoints of any source, and one pruning interface.

A **source** names where a dense model comes from:

* ``vgg``: the lab's VGG (:mod:`autoprune.model`), every figure as before;
* ``torchvision:NAME``: a torchvision classifier, built with ``weights=None``
  (nothing is downloaded); the option ``cifar_stem`` adapts the stem to 32x32
  inputs as usual for CIFAR (ResNet: conv1 3x3 stride 1 and no maxpool; other
  families: the first conv at stride 1);
* ``cifar:resnet20`` (``resnet32``, ``resnet44``, ``resnet56``, ``resnet110``):
  He et al.'s CIFAR ResNets (:mod:`autoprune.cifar_resnet`), option ``width``;
* ``module:package.module:factory``: a user's own ``nn.Module`` factory,
  called with the source's kwargs (and ``num_classes`` when given).

A model's **arch** is a JSON-able dict that rebuilds it: ``source``,
``kwargs``, ``num_classes``, ``input_size`` (C, H, W of one example),
``exclude`` (layers whose groups stay dense; optional) and, once
channel-pruned, ``widths`` (channel group -> channels kept). A pruned model is
rebuilt by building the dense model on the meta device, pruning each group to
its recorded width (the first channels: the weights come next) and loading the
``weights_only`` state dict after its shapes are checked. The lab's VGG keeps
its own arch (``name``, ``channels``, ``num_classes``) and checkpoint format.

A ``module:`` source imports user code, so a checkpoint that names one loads
only when the caller names the same source (``autoprune.load(path,
source=...)``): a file alone never makes autoprune import code.

:func:`prunable` gives the **pruning interface** of a model, the same for
every source: its fine-grained layers, its channel groups, the exact cost of a
channel plan and the plan applied. The lab's VGG keeps its own rules there
(names ``conv0``..., the closed-form :func:`autoprune.budget.vgg_cost`).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import reprlib
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
from torch import nn

from . import model as lab
from .budget import CostModel, vgg_cost, vgg_cost_model
from .channel import kept_channels
from .channel import prune_channels as prune_vgg_channels
from .errors import AutopruneError
from .graph import ChannelGraph, kept_width
from .graph import prune_channels as prune_graph_channels

INPUT_SIZE = (3, 32, 32)  # one CIFAR image: what costs and traces are measured on by default


class Source(Protocol):
    """Where a dense model comes from (a registry entry of :data:`SOURCES`)."""

    imports_user_code: bool

    def build(self, name: str, kwargs: dict, num_classes: int | None) -> nn.Module:
        """The dense model ``name`` (the text after ``prefix:``), untrained."""

    def prunable(self, model: nn.Module) -> "Prunable":
        """The model's pruning interface."""


# --- the pruning interface -----------------------------------------------------


class Prunable(Protocol):
    """What the pipeline needs of a model, the same for every source."""

    model: nn.Module

    def example_input(self) -> torch.Tensor:
        """One zero example (batch 1) on the model's device."""

    def fine_layers(self) -> dict[str, str]:
        """Fine-grained layer name -> its weight's parameter name (every conv and linear layer)."""

    def channel_groups(self) -> dict[str, int]:
        """Channel group name -> its current width (the prunable groups only)."""

    def kept(self, ratios: dict[str, float], round_to: int = 1) -> dict[str, int]:
        """Channels each group keeps at prune ratios ``ratios`` (fraction removed; absent = 0)."""

    def cost(self, kept: dict[str, int] | None = None) -> dict[str, int]:
        """Exact ``{'params', 'macs'}`` (conv + linear MACs, one example) with groups cut to ``kept``."""

    def prune_channels(self, ratios: dict[str, float], criterion: str, round_to: int = 1) -> nn.Module:
        """A channel-pruned copy (the model is untouched); its arch records the kept widths."""

    def cost_model(self) -> CostModel:
        """What a budget (:mod:`autoprune.budget`) needs of this model."""

    def describe(self) -> dict:
        """JSON-able widths for reports: ``channels`` (VGG) or ``widths`` (group -> kept; {} when dense)."""


class LabVGG:
    """The lab's VGG: layers ``conv0``... and ``classifier``, groups ``conv0``..``conv6`` (conv7 feeds the head)."""

    def __init__(self, model: lab.VGG):
        self.model = model

    def example_input(self) -> torch.Tensor:
        p = next(self.model.parameters())
        return torch.zeros(1, *INPUT_SIZE, device=p.device, dtype=p.dtype)

    def fine_layers(self) -> dict[str, str]:
        return {n: lab.param_name(n) for n in lab.PRUNABLE_LAYERS}

    def channel_groups(self) -> dict[str, int]:
        return dict(zip(lab.CONV_NAMES[:-1], self.model.channels))

    def kept(self, ratios: dict[str, float], round_to: int = 1) -> dict[str, int]:
        """The lab's rule (:func:`autoprune.channel.kept_channels`: a ratio that leaves no channel is an error)."""
        _check_names(ratios, self.channel_groups(), "channel group")
        groups = self.channel_groups()
        return dict(zip(groups, kept_channels(list(self.model.channels), ratios, round_to)))

    def cost(self, kept: dict[str, int] | None = None) -> dict[str, int]:
        widths = [int((kept or {}).get(n, c)) for n, c in self.channel_groups().items()]
        return vgg_cost(widths + [self.model.channels[-1]], self.model.num_classes)

    def prune_channels(self, ratios: dict[str, float], criterion: str, round_to: int = 1) -> nn.Module:
        _check_names(ratios, self.channel_groups(), "channel group")
        return prune_vgg_channels(self.model, ratios, criterion, round_to)

    def cost_model(self) -> CostModel:
        return vgg_cost_model(self.model.channels, self.model.num_classes)  # the closed form

    def describe(self) -> dict:
        return {"channels": list(self.model.channels)}


# architectures (arch + exclude, as JSON) whose groups passed ChannelGraph.check in this process:
# the check depends on the structure only, so it runs once per architecture
_CHECKED: set[str] = set()


class GraphModel:
    """Any model Torch-Pruning can trace: layers and groups named by module names (:mod:`autoprune.graph`)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.arch = lab.arch_of(model)
        self.exclude = tuple(self.arch.get("exclude", ()))
        self._graph: ChannelGraph | None = None

    @property
    def graph(self) -> ChannelGraph:
        if self._graph is None:  # traced on first use: fine-grained pruning needs no graph
            self._graph = ChannelGraph(self.model, self.example_input(), self.exclude, self._unchecked())
            _CHECKED.add(self._key())
        return self._graph

    def _key(self) -> str:
        return json.dumps([self.arch, self.exclude], sort_keys=True)

    def _unchecked(self) -> bool:
        return self._key() not in _CHECKED

    def example_input(self) -> torch.Tensor:
        p = next(self.model.parameters())
        return torch.zeros(1, *self.arch.get("input_size", INPUT_SIZE), device=p.device, dtype=p.dtype)

    def fine_layers(self) -> dict[str, str]:
        return {n: f"{n}.weight" for n, m in self.model.named_modules()
                if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}

    def channel_groups(self) -> dict[str, int]:
        return {n: g.width for n, g in self.graph.groups.items()}

    def kept(self, ratios: dict[str, float], round_to: int = 1) -> dict[str, int]:
        _check_names(ratios, self.channel_groups(), "channel group")
        return {n: kept_width(c, ratios.get(n, 0.0), round_to) for n, c in self.channel_groups().items()}

    def cost(self, kept: dict[str, int] | None = None) -> dict[str, int]:
        return self.graph.cost(kept)

    def prune_channels(self, ratios: dict[str, float], criterion: str, round_to: int = 1) -> nn.Module:
        # prune_graph_channels checks the group names on its own trace
        pruned, kept = prune_graph_channels(self.model, self.example_input(), ratios, criterion, round_to,
                                            self.exclude, self._unchecked())
        _CHECKED.add(self._key())
        widths = {**self.arch.get("widths", {}), **kept}
        setattr(pruned, lab.ARCH_ATTR, {**self.arch, "widths": widths})
        return pruned

    def cost_model(self) -> CostModel:
        params = dict(self.model.named_parameters())
        layers = {n: params[p].numel() for n, p in self.fine_layers().items()}
        return CostModel(layers, sum(p.numel() for p in params.values()), self.channel_groups, self.kept, self.cost,
                         arch=self.arch)

    def describe(self) -> dict:
        return {"widths": dict(self.arch.get("widths", {}))}  # as recorded: no trace (nor Torch-Pruning) needed


def _check_names(ratios: dict, valid: dict, what: str) -> None:
    for name in ratios:
        if name not in valid:
            raise AutopruneError(f"unknown {what} {name!r}; valid: {', '.join(valid)}")


# --- the sources -----------------------------------------------------------------


class VGGSource:
    imports_user_code = False

    def build(self, name: str, kwargs: dict, num_classes: int | None) -> nn.Module:
        _check_kwargs(kwargs, {"width", "channels"}, "vgg")
        return lab.build_model("vgg", width=kwargs.get("width", 1.0), num_classes=num_classes or 10,
                               channels=kwargs.get("channels"))

    def prunable(self, model: nn.Module) -> Prunable:
        return LabVGG(model)


def _resnet_stem(model: nn.Module) -> None:
    """CIFAR ResNet stem: conv1 3x3 stride 1 padding 1, no maxpool."""
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()


def _first_conv_stride_one(model: nn.Module) -> None:
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    conv.stride = (1, 1)


# model class name -> how its stem is adapted to 32x32 inputs (others: the first conv at stride 1)
CIFAR_STEMS = {"ResNet": _resnet_stem}


class TorchvisionSource:
    imports_user_code = False

    def build(self, name: str, kwargs: dict, num_classes: int | None) -> nn.Module:
        import torchvision

        known = torchvision.models.list_models(module=torchvision.models)  # classifiers only
        if name not in known:
            raise AutopruneError(f"unknown torchvision model {name!r}; use a classifier such as resnet18, resnet50, "
                                 f"mobilenet_v2, mobilenet_v3_small or efficientnet_b0")
        if "weights" in kwargs:
            raise AutopruneError("torchvision models are built untrained (weights=None); drop 'weights' and "
                                 "train or load a checkpoint instead")
        kwargs = dict(kwargs)
        cifar_stem = bool(kwargs.pop("cifar_stem", False))
        try:
            model = torchvision.models.get_model(name, weights=None, num_classes=num_classes or 1000, **kwargs)
        except TypeError as exc:
            raise AutopruneError(f"torchvision:{name} does not take these options ({exc}); check the kwargs") from None
        if cifar_stem:
            CIFAR_STEMS.get(type(model).__name__, _first_conv_stride_one)(model)
        return model

    def prunable(self, model: nn.Module) -> Prunable:
        return GraphModel(model)


class CifarSource:
    imports_user_code = False

    def build(self, name: str, kwargs: dict, num_classes: int | None) -> nn.Module:
        from .cifar_resnet import DEPTHS, CifarResNet

        if name not in DEPTHS:
            raise AutopruneError(f"unknown CIFAR model {name!r}; use one of {', '.join(DEPTHS)}")
        _check_kwargs(kwargs, {"width"}, f"cifar:{name}")
        width = kwargs.get("width", 1.0)
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= 64:
            raise AutopruneError(f"cifar:{name} width is a channel multiplier in (0, 64], got {width!r}")
        return CifarResNet(DEPTHS[name], num_classes or 10, float(width))

    def prunable(self, model: nn.Module) -> Prunable:
        return GraphModel(model)


class ModuleSource:
    imports_user_code = True

    def build(self, name: str, kwargs: dict, num_classes: int | None) -> nn.Module:
        module_name, _, factory_name = name.partition(":")
        if not module_name or not factory_name:
            raise AutopruneError(f"model source module:{name} must be module:package.module:factory "
                                 "(e.g. module:mymodels.nets:small_resnet)")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise AutopruneError(f"cannot import {module_name!r} for model source module:{name} ({exc}); check the "
                                 "name and that its folder is on PYTHONPATH") from None
        factory = getattr(module, factory_name, None)
        if not callable(factory):
            raise AutopruneError(f"module {module_name!r} has no factory {factory_name!r}; name a function or "
                                 "class in it that returns an nn.Module")
        kwargs = dict(kwargs)
        if num_classes is not None and _takes(factory, "num_classes"):
            kwargs["num_classes"] = num_classes
        try:
            model = factory(**kwargs)
        except TypeError as exc:
            raise AutopruneError(f"factory {module_name}:{factory_name} does not take these options ({exc}); "
                                 "check [model] kwargs") from None
        if not isinstance(model, nn.Module):
            raise AutopruneError(f"factory {module_name}:{factory_name} returned a {type(model).__name__}, not an "
                                 "nn.Module; return the model")
        return model

    def prunable(self, model: nn.Module) -> Prunable:
        return GraphModel(model)


def _takes(factory, name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind == p.VAR_KEYWORD for p in params)


SOURCES: dict[str, Source] = {"vgg": VGGSource(), "torchvision": TorchvisionSource(), "cifar": CifarSource(),
                               "module": ModuleSource()}


def split_source(source: Any) -> tuple[Source, str]:
    """``'torchvision:resnet18'`` -> (its Source, ``'resnet18'``), or a one-line error."""
    if not isinstance(source, str):
        raise AutopruneError(f"model source must be a string such as 'vgg' or 'torchvision:resnet18', got "
                             f"{reprlib.repr(source)}")
    prefix, _, name = source.partition(":")
    if prefix not in SOURCES:
        raise AutopruneError(f"unknown model source {source!r}; use vgg, torchvision:NAME, cifar:resnet20 or "
                             "module:package.module:factory")
    if prefix != "vgg" and not name:
        raise AutopruneError(f"model source {source!r} needs a name: {prefix}:NAME")
    return SOURCES[prefix], name


def _check_kwargs(kwargs: dict, allowed: set, source: str) -> None:
    extra = sorted(set(kwargs) - allowed)
    if extra:
        raise AutopruneError(f"source {source} takes no option {extra[0]!r}; options: {', '.join(sorted(allowed))}")


# --- building and rebuilding -------------------------------------------------------


def build_model(source: str = "vgg", num_classes: int | None = 10, input_size=INPUT_SIZE,
                exclude: Sequence[str] = (), **kwargs: Any) -> nn.Module:
    """A dense, untrained model from ``source`` with its arch attached (kwargs go to the source).

    ``exclude`` names layers whose channel groups stay dense (e.g. around a
    channel shuffle, which Torch-Pruning cannot prune); it is kept in the arch.
    """
    src, name = split_source(source)
    if exclude and isinstance(src, VGGSource):
        raise AutopruneError("exclude is for graph models (torchvision:, module:); the lab's VGG prunes conv0-conv6")
    try:
        json.dumps(kwargs)
    except (TypeError, ValueError):
        raise AutopruneError(f"model kwargs must be plain JSON values (numbers, strings, lists, dicts), got "
                             f"{reprlib.repr(kwargs)}") from None
    model = src.build(name, kwargs, num_classes)
    if not isinstance(model, lab.VGG):
        arch = {"source": source, "kwargs": dict(kwargs), "num_classes": num_classes,
                "input_size": [int(v) for v in input_size]}
        if exclude:
            modules = dict(model.named_modules())
            unknown = [n for n in exclude if n not in modules]
            if unknown:
                raise AutopruneError(f"exclude names no layer {unknown[0]!r} of this model; use module names such "
                                     f"as {next(n for n in modules if n)!r}")
            arch["exclude"] = [str(n) for n in exclude]
        setattr(model, lab.ARCH_ATTR, arch)
    return model


def prunable(model: nn.Module) -> Prunable:
    """The pruning interface of a model built by :func:`build_model` (or the lab's VGG)."""
    arch = lab.arch_of(model)
    return split_source(arch.get("source", arch.get("name")))[0].prunable(model)


def check_generic_arch(arch: Any, trusted_source: str | None = None) -> dict:
    """A non-VGG arch dict, checked field by field (one-line errors); user code only when named."""
    fix = "fix or drop the checkpoint's 'autoprune' metadata"
    if not isinstance(arch, dict):
        raise AutopruneError(f"architecture must be a dict, got {reprlib.repr(arch)}; {fix}")
    src, _ = split_source(arch.get("source"))
    if src.imports_user_code and trusted_source != arch["source"]:
        raise AutopruneError(f"this checkpoint's model comes from user code ({arch['source']}); autoprune imports "
                             f"it only when you name it: autoprune.load(path, source={arch['source']!r})")
    if not isinstance(arch.get("kwargs", {}), dict):
        raise AutopruneError(f"arch.kwargs must be a dict, got {reprlib.repr(arch.get('kwargs'))}; {fix}")
    num_classes = arch.get("num_classes")
    if num_classes is not None and not (lab.is_int(num_classes) and num_classes >= 1):
        raise AutopruneError(f"arch.num_classes must be a positive integer, got {reprlib.repr(num_classes)}; {fix}")
    size = arch.get("input_size", list(INPUT_SIZE))
    if not (isinstance(size, (list, tuple)) and size and all(lab.is_int(v) and 0 < v <= 4096 for v in size)):
        raise AutopruneError(f"arch.input_size must be positive integers (C, H, W), got {reprlib.repr(size)}; {fix}")
    exclude = arch.get("exclude", [])
    if not (isinstance(exclude, list) and all(isinstance(n, str) for n in exclude)):
        raise AutopruneError(f"arch.exclude must be a list of layer names, got {reprlib.repr(exclude)}; {fix}")
    widths = arch.get("widths", {})
    if not (isinstance(widths, dict) and all(isinstance(k, str) and lab.is_int(v) for k, v in widths.items())):
        raise AutopruneError(f"arch.widths must map group names to integers, got {reprlib.repr(widths)}; {fix}")
    return arch


def from_arch(arch: dict, trusted_source: str | None = None, device: str = "cpu") -> nn.Module:
    """The model described by ``arch`` (weights uninitialised: load them next).

    Built on the meta device (nothing allocated), pruned to the recorded
    widths there, then given real (empty) storage on ``device`` (``meta``
    leaves it without storage: shapes to check a state dict against).
    """
    if "source" not in arch:
        return lab.build_model(arch.get("name", "vgg"), channels=arch["channels"], num_classes=arch["num_classes"])
    arch = check_generic_arch(arch, trusted_source)
    with torch.device("meta"):
        model = build_model(arch["source"], arch.get("num_classes"), arch.get("input_size", INPUT_SIZE),
                            arch.get("exclude", ()), **arch.get("kwargs", {}))
        widths = {k: int(v) for k, v in arch.get("widths", {}).items()}
        if widths:
            graph = ChannelGraph(model, torch.zeros(1, *arch.get("input_size", INPUT_SIZE)), check=False)
            unknown = [n for n in widths if n not in graph.groups]
            if unknown:
                raise AutopruneError(f"arch.widths names no channel group {unknown[0]!r} of {arch['source']}; "
                                     f"groups: {', '.join(graph.groups)}")
            graph.prune_to(widths)
    if device != "meta":
        model = model.to_empty(device=device)
    setattr(model, lab.ARCH_ATTR, {**arch, "widths": widths} if widths else dict(arch))
    return model


# --- checkpoints of any source -------------------------------------------------------


def model_from_checkpoint(obj: dict, source: str | None = None) -> tuple[nn.Module, dict]:
    """The model of a loaded checkpoint, checked before any tensor is trusted; ``(model, meta)``."""
    meta = obj.get("autoprune") or {}
    arch = meta.get("arch") if isinstance(meta, dict) else None
    if not (isinstance(arch, dict) and "source" in arch):
        return lab.model_from_checkpoint(obj)  # the lab's VGG, its format and errors
    state_dict = obj["state_dict"]
    lab.check_tensors(state_dict)
    skeleton = from_arch(arch, source, device="meta")  # shapes only: nothing allocated before the check
    lab.check_state_dict(skeleton.state_dict(), state_dict)
    model = skeleton.to_empty(device="cpu")
    model.load_state_dict(state_dict)
    return model.eval(), {**meta, "arch": lab.arch_of(model)}


def load_checkpoint(path: str | os.PathLike, source: str | None = None) -> tuple[nn.Module, dict]:
    """Load a checkpoint of any source (file or export directory): ``(model, meta)``.

    ``source`` must name the checkpoint's ``module:`` source for user code to be imported.
    """
    return model_from_checkpoint(lab.read_checkpoint(path), source)


def save_checkpoint(model: nn.Module, path: str | os.PathLike, **meta: Any) -> Path:
    """Save weights-only in the lab's format with the model's arch (any source)."""
    return lab.save_checkpoint(model, path, **meta)
