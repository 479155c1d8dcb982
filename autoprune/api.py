"""The Python API for notebooks: search a model you hold, on tensors you hold, and get the pruned model back.

>>> result = autoprune.prune(model, train=(x_train, y_train), val=(x_val, y_val), test=(x_test, y_test),
...                          kind="channel", max_size=0.25, trials=20)
>>> result.model          # the picked config, fine-tuned, ready to use
>>> result.export("out")  # model.pt (+ model.ts / model.onnx or sparse.npz); autoprune.load("out")

The same study as ``autoprune search`` underneath (its storage, report, pick
and export commands all work on it): the model is saved as the study's dense
checkpoint with its architecture, the images as an ``npz`` data file with the
validation split you gave, both in the study's folder. Images are uint8
(N, 32, 32, 3) or (N, 3, 32, 32), or floats in [0, 1] (``ToTensor`` without
``Normalize``: autoprune scales and augments them itself); a torch ``Dataset``
or ``DataLoader`` yielding such ``(image, label)`` pairs works too.

A model built by :func:`autoprune.build_model` carries its source; another
``nn.Module`` is rebuilt as ``module:<its module>:<its class>`` called with
``model_kwargs`` (or name a ``source``), so its class must be importable (a
class defined in the notebook itself is, in that notebook).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import StudyConfig, config_from_tables
from .errors import AutopruneError
from .model import ARCH_ATTR, VGG, arch_of, check_state_dict, width_of

log = logging.getLogger("autoprune")


@dataclass
class PruneResult:
    """What :func:`prune` found: the picked model and where its study lives."""

    model: nn.Module  # the picked trial's pruned, fine-tuned model (eval mode, CPU)
    trial: Any  # its optuna FrozenTrial (user_attrs: val_accuracy, size_fraction, macs_fraction, plan, ...)
    study: Any  # the optuna Study
    config: StudyConfig

    @property
    def storage_url(self) -> str:
        return self.config.storage_url

    def export(self, out_dir, force: bool = False) -> dict:
        """Write the picked trial's deployable files (see :func:`autoprune.export.export`)."""
        from .export import export

        return export(self.storage_url, self.config.study.name, out_dir, trial=self.trial.number, force=force)

    def report(self, out_dir=None) -> Path:
        """Write the study's report (figures, trials table, HTML); returns its folder."""
        from .report import write_report

        return write_report(self.storage_url, self.config.study.name, out_dir)


def prune(model: nn.Module, train, val, test=None, *, kind: str = "channel", max_size: float = 0.25,
          max_macs: float | None = None, min_accuracy: float | None = None, max_accuracy_drop: float | None = None,
          trials: int = 20, name: str | None = None, out_dir=None, storage: str | None = None,
          source: str | None = None, model_kwargs: dict | None = None, device="auto", progress: bool = True,
          **tables: dict) -> PruneResult:
    """Search per-layer pruning ratios for ``model`` under the caps; the picked config's model and its study.

    ``max_size`` / ``max_macs``: fractions of the dense model's size / MACs; ``min_accuracy`` (percent) or
    ``max_accuracy_drop`` (points below the dense model's validation accuracy; default: the config's 92.5%
    floor unless one is given). ``tables``: any other study config tables as dicts, e.g.
    ``finetune={"epochs": 5}``, ``priors={"enabled": False}`` (see ``studies/*.toml``). ``name``: the
    study (default ``prune-<hash of the weights, images and settings>``: the same call again resumes it).
    """
    from .export import load_trial_weights
    from .pick import pick
    from .search import run_search
    from .sources import model_from_checkpoint, save_checkpoint
    from .study import open_existing

    model = model.cpu().eval()
    arch = described_arch(model, source, model_kwargs)
    splits = {"train": images_and_labels(train, "train"), "val": images_and_labels(val, "val")}
    if test is None:
        log.warning("no test split given: the test accuracy reported is the validation accuracy")
    splits["test"] = images_and_labels(test, "test") if test is not None else splits["val"]
    constraints = {"max_size_fraction": max_size, "max_macs_fraction": max_macs, "min_accuracy": min_accuracy,
                   "max_accuracy_drop": max_accuracy_drop}
    settings = {"kind": kind, "constraints": constraints, "trials": trials, "tables": tables}
    digest = hashlib.sha256()  # the weights, the images and the settings: other data is another study
    for t in model.state_dict().values():
        digest.update(t.detach().cpu().numpy().tobytes())
    for x, y in splits.values():
        digest.update(x.tobytes()), digest.update(y.tobytes())
    digest.update(json.dumps([arch, settings], sort_keys=True, default=str).encode())
    name = name or f"prune-{digest.hexdigest()[:10]}"
    folder = Path(out_dir or f"reports/{name}")
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint, data_file = folder / "dense.pt", folder / "data.npz"
    if not checkpoint.is_file():  # written once: a resumed study keeps the file its digest recorded
        save_checkpoint(_with_arch(model, arch), checkpoint, made_by="autoprune.prune (the dense model)")
    if not data_file.is_file():
        np.savez(data_file, **{f"{k}_{s}": v for s, (x, y) in splits.items() for k, v in (("x", x), ("y", y))})
    raw = {**tables, "study": {"name": name, "kind": kind, "trials": trials, **tables.get("study", {})},
           "model": {**model_table(arch), "checkpoint": str(checkpoint), **tables.get("model", {})},
           "data": {"spec": f"npz:{data_file}", **tables.get("data", {})},
           "constraints": {**{k: v for k, v in constraints.items() if v is not None},
                           **tables.get("constraints", {})}}
    config = config_from_tables(raw, "autoprune.prune()")
    config.study.out_dir = str(folder)
    if storage:
        config.study.storage = storage
    config.validate()
    run_search(config, device=device, progress=progress)
    study, _ = open_existing(config.storage_url, name)
    best, _ = pick(study, config, require_weights=True)
    # the trial's kept weights, checked like any checkpoint
    picked, _ = model_from_checkpoint(load_trial_weights(study, best), config.model.source)
    return PruneResult(picked.eval(), best, study, config)


def described_arch(model: nn.Module, source: str | None, model_kwargs: dict | None) -> dict:
    """The arch that rebuilds ``model``: its own (built by autoprune), or ``source`` / its class with kwargs."""
    from .sources import build_model

    if isinstance(model, VGG) or hasattr(model, ARCH_ATTR):
        if source is not None or model_kwargs:
            raise AutopruneError("this model was built by autoprune.build_model and knows its source; drop "
                                 "source= and model_kwargs=")
        return arch_of(model)
    cls = type(model)
    source = source or f"module:{cls.__module__}:{cls.__qualname__}"
    head = [m for m in model.modules() if isinstance(m, nn.Linear)]
    num_classes = head[-1].out_features if head else None
    try:
        with torch.device("meta"):
            skeleton = build_model(source, num_classes, **(model_kwargs or {}))
        check_state_dict(skeleton.state_dict(), model.state_dict())
    except AutopruneError as exc:
        raise AutopruneError(f"cannot rebuild your model as {source} with model_kwargs={model_kwargs or {}} "
                             f"({exc}); pass the source= and model_kwargs= that build it") from None
    return arch_of(skeleton)


def _with_arch(model: nn.Module, arch: dict) -> nn.Module:
    if "source" in arch and not hasattr(model, ARCH_ATTR):
        setattr(model, ARCH_ATTR, arch)
    return model


def model_table(arch: dict) -> dict:
    """The study config's ``[model]`` table for an arch."""
    if "source" not in arch:  # the lab's VGG
        return {"width": width_of(arch["channels"]) or 1.0, "num_classes": arch["num_classes"]}
    kwargs = dict(arch.get("kwargs", {}))
    table = {"source": arch["source"], "num_classes": arch.get("num_classes") or 10}
    if kwargs.pop("cifar_stem", False):
        table["cifar_stem"] = True
    if "width" in kwargs and arch["source"].startswith("cifar:"):
        table["width"] = kwargs.pop("width")
    if kwargs:
        table["kwargs"] = kwargs
    if arch.get("exclude"):
        table["exclude"] = list(arch["exclude"])
    return table


def images_and_labels(split, what: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NHWC images and int64 labels from ``(images, labels)``, a Dataset or a DataLoader."""
    if isinstance(split, (tuple, list)) and len(split) == 2:
        x, y = split
    elif isinstance(split, (torch.utils.data.Dataset, torch.utils.data.DataLoader)):
        xs, ys = [], []
        for x, y in split:
            xs.append(torch.as_tensor(x)), ys.append(torch.as_tensor(y))
        batched = isinstance(split, torch.utils.data.DataLoader)
        x = torch.cat(xs) if batched else torch.stack(xs)
        y = torch.cat(ys) if batched else torch.stack(ys)
    else:
        raise AutopruneError(f"{what} must be (images, labels), a Dataset or a DataLoader, got "
                             f"{type(split).__name__}")
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().cpu()
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).detach().cpu()
    if x.ndim == 4 and x.shape[1] == 3 and x.shape[-1] != 3:
        x = x.permute(0, 2, 3, 1)  # NCHW -> NHWC
    if x.ndim != 4 or tuple(x.shape[1:]) != (32, 32, 3):
        raise AutopruneError(f"{what} images must be 32x32 RGB, (N, 32, 32, 3) or (N, 3, 32, 32), got "
                             f"{list(x.shape)}")
    if x.is_floating_point():
        if len(x) and (float(x.min()) < 0 or float(x.max()) > 1):
            raise AutopruneError(f"{what} images are floats outside [0, 1] (normalized?); pass uint8 images or "
                                 "ToTensor's [0, 1] floats: autoprune scales and augments them itself")
        x = (x * 255).round()
    elif x.dtype != torch.uint8:
        raise AutopruneError(f"{what} images must be uint8 or floats in [0, 1], got {x.dtype}")
    if y.ndim != 1 or len(y) != len(x) or y.is_floating_point():
        raise AutopruneError(f"{what} labels must be one integer class per image, got {y.dtype} {list(y.shape)} "
                             f"for {len(x)} images")
    return x.to(torch.uint8).contiguous().numpy(), y.to(torch.int64).numpy()
