"""The lab's VGG, built by name, and its checkpoint format.

A checkpoint is a file for ``torch.load`` holding ``{'state_dict': ...}`` (the
lab's format); autoprune adds ``'autoprune'``: a dict of plain metadata (the
conv widths, class count, data spec, accuracies, how it was made). Files are
loaded with ``weights_only=True`` because a checkpoint is untrusted input, and
checked before a model is built from them (:func:`model_from_checkpoint`).
"""

from __future__ import annotations

import copy
import operator
import os
import reprlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .errors import AutopruneError
from .files import atomic_path

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
        if not _is_int_list(channels, NUM_CONVS) or min(channels) < 1:
            raise AutopruneError(f"a VGG needs {NUM_CONVS} positive integer conv widths, got {reprlib.repr(channels)}")
        channels = [int(c) for c in channels]
        num_classes = _check_num_classes(num_classes)
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


# The plain architecture description of a model from another source (autoprune.sources) rides on it here.
ARCH_ATTR = "autoprune_arch"


def arch_of(model: nn.Module) -> dict:
    """The plain, JSON-able description that rebuilds ``model``'s architecture (a copy)."""
    if isinstance(model, VGG):
        return model.arch()
    arch = getattr(model, ARCH_ATTR, None)
    if not isinstance(arch, dict):
        raise AutopruneError(f"this {type(model).__name__} carries no autoprune architecture description; build it "
                             "with autoprune.build_model(source, ...) (a module:package.module:factory source for "
                             "your own class)")
    return copy.deepcopy(arch)


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
    if not isinstance(name, str) or name not in MODELS:
        raise AutopruneError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return MODELS[name](channels if channels is not None else vgg_channels(width), num_classes)


def is_int(value: Any) -> bool:
    """An integer (Python or numpy), not a bool, float or string."""
    try:
        operator.index(value)
    except TypeError:
        return False
    return not isinstance(value, bool)


def _is_int_list(values: Any, length: int) -> bool:
    return isinstance(values, (list, tuple)) and len(values) == length and all(is_int(v) for v in values)


def _check_num_classes(num_classes: Any) -> int:
    if not is_int(num_classes) or num_classes < 2:
        raise AutopruneError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return int(num_classes)


def width_of(channels: Sequence[int]) -> float | None:
    """The width multiplier that gives ``channels``, or None if none does."""
    width = channels[-1] / 512
    return width if vgg_channels(width) == list(channels) else None


# --- checkpoints -------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> dict:
    """``{'state_dict', 'autoprune'?}`` of a checkpoint file or export directory, read weights-only."""
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


_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_tensors(state_dict: dict) -> None:
    """Every entry is a dense tensor whose shape the file really stores, under a string key.

    Runs before any shape is trusted: a sparse tensor, or a view expanded with
    stride 0, declares a shape far larger than its bytes (a 2 KB file can declare
    14 GB), and a model built from that shape would allocate all of it.
    """
    for key, t in state_dict.items():
        if not isinstance(key, str):
            raise AutopruneError(f"checkpoint state dict has a non-string key {key!r}; expected the lab's VGG names")
        if not isinstance(t, torch.Tensor):
            raise AutopruneError(f"checkpoint entry {key!r} is a {type(t).__name__}, not a tensor; "
                                 "a state dict holds tensors only")
        if t.layout != torch.strided or t.is_quantized:
            raise AutopruneError(f"checkpoint tensor {key!r} is not a plain dense tensor ({t.layout}, {t.dtype}); "
                                 "save dense tensors (tensor.to_dense())")
        if t.numel() * t.element_size() > t.untyped_storage().nbytes():
            raise AutopruneError(f"checkpoint tensor {key!r} declares shape {tuple(t.shape)} but the file stores "
                                 f"only {t.untyped_storage().nbytes()} bytes of it (an expanded view); "
                                 "save tensor.contiguous()")


def infer_arch(state_dict: dict) -> dict:
    """Conv widths and class count from a state dict with the lab's names (the shapes decide)."""
    check_tensors(state_dict)
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


def check_arch(arch: Any, state_dict: dict) -> dict:
    """The architecture of a checkpoint: its metadata ``arch`` (optional) checked against the shapes.

    The tensor shapes are the truth; metadata of the wrong type, or that
    disagrees with them, is an error naming the first mismatch.
    """
    if isinstance(arch, dict) and "source" in arch:
        raise AutopruneError(f"checkpoint holds a {reprlib.repr(arch['source'])} model, not the lab's VGG; load it "
                             "with autoprune.load_checkpoint (or autoprune.load)")
    inferred = infer_arch(state_dict)
    if arch is None:  # the lab's format: no metadata
        return inferred
    fix = "fix or drop the checkpoint's 'autoprune' metadata (the lab's format needs none)"
    if not isinstance(arch, dict):
        raise AutopruneError(f"checkpoint metadata 'arch' must be a dict like {inferred}, got "
                             f"{reprlib.repr(arch)}; {fix}")
    name, channels, num_classes = arch.get("name", "vgg"), arch.get("channels"), arch.get("num_classes")
    if not isinstance(name, str) or name not in MODELS:
        raise AutopruneError(f"checkpoint metadata arch.name {reprlib.repr(name)} is not a known model "
                             f"({', '.join(MODELS)}); {fix}")
    if not _is_int_list(channels, NUM_CONVS):
        raise AutopruneError(f"checkpoint metadata arch.channels must be {NUM_CONVS} integers, got "
                             f"{reprlib.repr(channels)}; {fix}")
    if not is_int(num_classes):
        raise AutopruneError(f"checkpoint metadata arch.num_classes must be an integer, got "
                             f"{reprlib.repr(num_classes)}; {fix}")
    for layer, said, has in zip(CONV_NAMES, channels, inferred["channels"]):
        if said != has:
            shape = tuple(state_dict[param_name(layer)].shape)
            raise AutopruneError(f"checkpoint metadata says {layer} has {said} channels, but "
                                 f"{param_name(layer)!r} has shape {shape}; {fix}")
    if num_classes != inferred["num_classes"]:
        shape = tuple(state_dict["classifier.weight"].shape)
        raise AutopruneError(f"checkpoint metadata says num_classes {num_classes}, but 'classifier.weight' "
                             f"has shape {shape}; {fix}")
    return inferred


def check_state_dict(expected: dict, state_dict: dict) -> None:
    """``state_dict`` fits ``expected`` (a model's state dict, meta tensors will do): keys, shapes,
    dtypes and finite values, or an error naming the first problem in one line."""
    check_tensors(state_dict)
    for key, want in expected.items():
        if key not in state_dict:
            raise AutopruneError(f"checkpoint is missing key {key!r} (wrong model or names)")
        got = state_dict[key]
        if tuple(got.shape) != tuple(want.shape):
            raise AutopruneError(
                f"checkpoint key {key!r} has shape {tuple(got.shape)}, model expects {tuple(want.shape)}"
            )
        # Floats load into floats (any precision); integer counters into integers.
        ok = got.is_floating_point() if want.is_floating_point() else got.dtype in _INT_DTYPES
        if not ok:
            raise AutopruneError(f"checkpoint key {key!r} has dtype {got.dtype}, model expects {want.dtype}; "
                                 "save the model's own state_dict()")
    extra = [k for k in state_dict if k not in expected]
    if extra:
        raise AutopruneError(f"checkpoint has unexpected key {extra[0]!r} (wrong model or names)")
    for key, t in state_dict.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise AutopruneError(f"checkpoint tensor {key!r} holds {bad} NaN/Inf values (the training that made it "
                                 f"diverged); use an earlier checkpoint or retrain with a lower learning rate")


def load_state_dict_strict(model: nn.Module, state_dict: dict) -> None:
    """Load ``state_dict`` into ``model``, naming the first mismatch in one line."""
    check_state_dict(model.state_dict(), state_dict)
    model.load_state_dict(state_dict)


def model_from_checkpoint(
    obj: dict, width: float | None = None, num_classes: int | None = None
) -> tuple[VGG, dict]:
    """The model of a loaded checkpoint ``{'state_dict', 'autoprune'?}``, checked before it is built.

    Returns ``(model, meta)``. The architecture comes from the tensor shapes
    (metadata must agree); ``width`` / ``num_classes`` when given must match it
    (the error names the first mismatched key and shapes).
    """
    state_dict = obj["state_dict"]
    meta = obj.get("autoprune") or {}
    if not isinstance(meta, dict):
        raise AutopruneError(f"checkpoint metadata 'autoprune' must be a dict, got {type(meta).__name__}; "
                             "fix or drop it (the lab's format needs none)")
    arch = check_arch(meta.get("arch"), state_dict)
    channels = arch["channels"] if width is None else vgg_channels(width)
    num_classes = arch["num_classes"] if num_classes is None else num_classes
    with torch.device("meta"):  # shapes and dtypes only: nothing is allocated before the check
        expected = build_model(arch["name"], channels=channels, num_classes=num_classes).state_dict()
    check_state_dict(expected, state_dict)
    model = build_model(arch["name"], channels=channels, num_classes=num_classes)
    model.load_state_dict(state_dict)
    return model.eval(), {**meta, "arch": model.arch()}


def load_checkpoint(
    path: str | os.PathLike, width: float | None = None, num_classes: int | None = None
) -> tuple[VGG, dict]:
    """Load a checkpoint (lab format, bare state dict, or an export directory).

    Returns ``(model, meta)``; see :func:`model_from_checkpoint` for the checks.
    """
    return model_from_checkpoint(read_checkpoint(path), width, num_classes)


def save_checkpoint(model: nn.Module, path: str | os.PathLike, **meta: Any) -> Path:
    """Save in the lab's format plus plain metadata (JSON-able values only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {"state_dict": state_dict, "autoprune": {"arch": arch_of(model), **meta}}
    with atomic_path(path) as tmp:  # never leave a half-written checkpoint behind
        torch.save(payload, tmp)
    return path
