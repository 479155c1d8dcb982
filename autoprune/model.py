"""The lab's VGG, built by name, and its checkpoint format.

A checkpoint is a file for ``torch.load`` holding ``{'state_dict': ...}`` (the
lab's format); autoprune adds ``'autoprune'``: a dict of plain metadata (the
conv widths, class count, data spec, accuracies, how it was made). Files are
loaded with ``weights_only=True`` because a checkpoint is untrusted input.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .errors import AutopruneError

# The lab's layer plan: a number is a 3x3 conv (no bias) + BatchNorm + ReLU.
VGG_PLAN: tuple = (64, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
NUM_CONVS = sum(1 for v in VGG_PLAN if v != "M")
CONV_NAMES = tuple(f"conv{i}" for i in range(NUM_CONVS))
# Tensors that pruning touches: every parameter with more than one dimension.
PRUNABLE_LAYERS = CONV_NAMES + ("classifier",)


def param_name(layer: str) -> str:
    """Weight parameter of a prunable layer (``conv3`` -> ``backbone.conv3.weight``)."""
    return "classifier.weight" if layer == "classifier" else f"backbone.{layer}.weight"


class VGG(nn.Module):
    """The lab's VGG with explicit conv widths (``channels``, one per conv)."""

    def __init__(self, channels: Sequence[int], num_classes: int = 10):
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) != NUM_CONVS or min(channels) < 1:
            raise AutopruneError(
                f"a VGG needs {NUM_CONVS} positive conv widths, got {channels}"
            )
        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        counts = {"conv": 0, "bn": 0, "relu": 0, "pool": 0}

        def add(kind: str, module: nn.Module) -> None:
            layers[f"{kind}{counts[kind]}"] = module
            counts[kind] += 1

        widths = iter(channels)
        in_channels = 3
        for v in VGG_PLAN:
            if v == "M":
                add("pool", nn.MaxPool2d(2))
                continue
            out_channels = next(widths)
            add("conv", nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False))
            add("bn", nn.BatchNorm2d(out_channels))
            add("relu", nn.ReLU(inplace=True))
            in_channels = out_channels
        self.backbone = nn.Sequential(layers)
        self.classifier = nn.Linear(in_channels, num_classes)
        self.channels = channels
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.backbone(x)
        x = x.mean([2, 3])  # global average pooling over the 2x2 map
        return self.classifier(x)

    def arch(self) -> dict:
        """Plain description that rebuilds this architecture (see build_model)."""
        return {"name": "vgg", "channels": list(self.channels), "num_classes": self.num_classes}


def vgg_channels(width: float = 1.0) -> list[int]:
    """Conv widths of the lab's VGG scaled by ``width`` (rounded, at least 1)."""
    if not width > 0:
        raise AutopruneError(f"width must be > 0, got {width}; use e.g. --width 0.25")
    return [max(1, int(round(v * width))) for v in VGG_PLAN if v != "M"]


MODELS = {"vgg": VGG}


def build_model(
    name: str = "vgg",
    width: float = 1.0,
    num_classes: int = 10,
    channels: Sequence[int] | None = None,
) -> VGG:
    """Build a model by name; ``channels`` (explicit widths) overrides ``width``."""
    if name not in MODELS:
        raise AutopruneError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    if num_classes < 2:
        raise AutopruneError(f"num_classes must be >= 2, got {num_classes}")
    return MODELS[name](channels if channels is not None else vgg_channels(width), num_classes)


def width_of(channels: Sequence[int]) -> float | None:
    """The width multiplier that gives ``channels``, or None if none does."""
    width = channels[-1] / 512
    return width if vgg_channels(width) == list(channels) else None


# --- checkpoints -------------------------------------------------------------


def _read(path: str | os.PathLike) -> dict:
    path = Path(path)
    if path.is_dir():  # an export directory holds model.pt
        path = path / "model.pt"
    if not path.is_file():
        raise AutopruneError(f"checkpoint not found: {path}; check the path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or holds pickled code
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AutopruneError(
            f"{path} is not a readable checkpoint (truncated, not a torch file, or not "
            f"weights-only): {reason[:160]}"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"state_dict": obj}  # a bare state dict
    raise AutopruneError(
        f"{path} holds no state dict; expected {{'state_dict': ...}} (the lab's format) "
        "or a bare state dict"
    )


def infer_arch(state_dict: dict) -> dict:
    """Conv widths and class count from a state dict with the lab's names."""
    channels = []
    for name in CONV_NAMES:
        w = state_dict.get(f"backbone.{name}.weight")
        if not isinstance(w, torch.Tensor) or w.dim() != 4:
            raise AutopruneError(
                f"state dict has no 4-d 'backbone.{name}.weight'; expected the lab's VGG "
                f"names (backbone.conv0.weight, ..., classifier.weight)"
            )
        channels.append(int(w.shape[0]))
    w = state_dict.get("classifier.weight")
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise AutopruneError("state dict has no 2-d 'classifier.weight'; expected the lab's VGG names")
    return {"name": "vgg", "channels": channels, "num_classes": int(w.shape[0])}


def load_state_dict_strict(model: nn.Module, state_dict: dict) -> None:
    """Load ``state_dict`` into ``model``, naming the first mismatch in one line."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state_dict:
            raise AutopruneError(f"checkpoint is missing key {key!r} (wrong model or names)")
        got = state_dict[key]
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(tensor.shape):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise AutopruneError(
                f"checkpoint key {key!r} has shape {shape}, model expects {tuple(tensor.shape)}"
            )
    extra = [k for k in state_dict if k not in expected]
    if extra:
        raise AutopruneError(f"checkpoint has unexpected key {extra[0]!r} (wrong model or names)")
    model.load_state_dict(state_dict)


def load_checkpoint(
    path: str | os.PathLike, width: float | None = None, num_classes: int | None = None
) -> tuple[VGG, dict]:
    """Load a checkpoint (lab format, bare state dict, or an export directory).

    Returns ``(model, meta)``. The architecture comes from the metadata or, for
    the lab's format, from the tensor shapes; ``width`` / ``num_classes`` when
    given must match it (the error names the first mismatched key and shapes).
    """
    obj = _read(path)
    state_dict = obj["state_dict"]
    meta = dict(obj.get("autoprune") or {})
    arch = dict(meta.get("arch") or infer_arch(state_dict))
    if width is not None:  # the caller's expectation wins; a mismatch is reported below
        arch["channels"] = vgg_channels(width)
    if num_classes is not None:
        arch["num_classes"] = num_classes
    model = build_model(arch.get("name", "vgg"), channels=arch["channels"], num_classes=arch["num_classes"])
    load_state_dict_strict(model, state_dict)
    meta["arch"] = model.arch()
    return model.eval(), meta


def save_checkpoint(model: VGG, path: str | os.PathLike, **meta: Any) -> Path:
    """Save in the lab's format plus plain metadata (JSON-able values only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {"state_dict": state_dict, "autoprune": {"arch": model.arch(), **meta}}
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # two searches may cache the same dense model at once
    torch.save(payload, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind
    return path
