"""Training, fine-tuning with masks kept, and evaluation: one readable loop.

Data stays on the device as uint8 tensors (see :mod:`autoprune.data`); on CUDA
the loop runs under bf16 autocast with channels_last. On the CPU a seed fixes
the result: initial weights, batch order and augmentation all come from it.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import Data, Split, batches
from .errors import AutopruneError
from .model import is_int

log = logging.getLogger("autoprune")


@dataclass
class TrainConfig:
    """One optimisation recipe. Defaults are the lab's fine-tuning recipe."""

    epochs: int = 5
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 512
    schedule: str = "cosine"  # "cosine" (per step, to zero) or "onecycle"
    augment: bool = True
    seed: int = 0
    # Knowledge distillation, used only when fit() is given a teacher (see distillation_loss).
    distill_temperature: float = 4.0  # softens both models' logits; > 0
    distill_weight: float = 0.5  # weight of the distillation term in [0, 1]; 1 - weight for the labels' CE

    def __post_init__(self):
        # The library's own guard: NaN or Inf here would train to NaN weights without a word.
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise AutopruneError(f"{name} must be an integer >= 1, got {value!r}")
        # Finite as float32 weights see it: a larger lr makes SGD's update overflow with a RuntimeError.
        top = torch.finfo(torch.float32).max
        bounds = {"lr": (f"a finite number > 0 (at most {top:.3g})", lambda v: 0 < v <= top),
                  "momentum": ("in [0, 1)", lambda v: 0 <= v < 1),
                  "weight_decay": (f"a finite number >= 0 (at most {top:.3g})", lambda v: 0 <= v <= top),
                  # T^2 scales the distillation term: it must stay finite in float32 too
                  "distill_temperature": (f"a finite number > 0 (at most {math.sqrt(top):.3g})",
                                          lambda v: 0 < v <= math.sqrt(top)),
                  "distill_weight": ("in [0, 1]", lambda v: 0 <= v <= 1)}
        for name, (text, within) in bounds.items():
            value = getattr(self, name)
            if not (_is_real(value) and within(value)):  # NaN fails every comparison
                raise AutopruneError(f"{name} must be {text}, got {value!r}")
        if self.schedule not in ("cosine", "onecycle"):
            raise AutopruneError(f"schedule must be 'cosine' or 'onecycle', got {self.schedule!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# Training a dense model from scratch: a one-cycle schedule converges in few epochs.
DENSE_RECIPE = dict(lr=0.05, weight_decay=5e-4, batch_size=128, schedule="onecycle")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; checked here, not at first use."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise AutopruneError(f"unknown device {str(device)!r}; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise AutopruneError(f"device {str(device)!r} asked for, but torch finds no CUDA GPU here; "
                                 f"use device auto or cpu")
        if (dev.index or 0) >= count:
            raise AutopruneError(f"device {str(device)!r} asked for, but torch finds {count} CUDA GPU(s) "
                                 f"(cuda:0 to cuda:{count - 1}); pick one of those or use auto")
    return dev


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      temperature: float, weight: float) -> torch.Tensor:
    """Hinton et al.'s loss: ``(1 - w) CE(logits, y) + w T^2 KL(softmax(teacher/T) || softmax(logits/T))``.

    KL is averaged over the batch (batchmean, the true KL per example); the T^2
    keeps its gradients on the CE term's scale whatever the temperature. In
    float32 whatever autocast made the logits: the KL of two near-equal
    softmaxes is a small difference of large terms.
    """
    logits, teacher_logits = logits.float(), teacher_logits.float()
    ce = nn.functional.cross_entropy(logits, targets)
    kl = nn.functional.kl_div(nn.functional.log_softmax(logits / temperature, dim=1),
                              nn.functional.log_softmax(teacher_logits / temperature, dim=1),
                              reduction="batchmean", log_target=True)
    return (1.0 - weight) * ce + weight * temperature ** 2 * kl


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor] | None) -> None:
    """Zero the pruned weights: ``masks`` maps parameter names to 0/1 tensors."""
    if not masks:
        return
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].device, params[name].dtype))


def fit(
    model: nn.Module,
    data: Data,
    config: TrainConfig,
    *,
    masks: dict[str, torch.Tensor] | None = None,
    on_epoch: Callable[[int, float], bool] | None = None,
    progress: bool = True,
    desc: str = "train",
    teacher: nn.Module | None = None,
) -> list[dict]:
    """Train ``model`` in place on ``data.train``; returns one record per epoch.

    ``masks`` (parameter name -> 0/1 tensor) are re-applied after every
    optimizer step, so pruned weights stay exactly zero. After each epoch the
    validation accuracy (percent) is measured and ``on_epoch(epoch, val_acc)``
    may return True to stop early. The final epoch's weights are kept (the
    cosine schedule ends at zero; picking the best epoch would bias the
    validation figure upwards).

    With a ``teacher`` (on the same device), the loss is
    :func:`distillation_loss` with ``config.distill_temperature`` and
    ``config.distill_weight``: the teacher sees each augmented batch in eval
    mode, without gradients; its train/eval mode is restored afterwards.
    """
    device = next(model.parameters()).device
    if teacher is not None:
        teacher_device = next(teacher.parameters()).device
        if teacher_device != device:
            raise AutopruneError(f"the teacher is on {teacher_device} but the model on {device}; "
                                 f"move the teacher to {device}")
    with _eval_mode(teacher):  # running BN stats: the teacher's own predictions, its stats left as they were
        return _fit(model, data, config, masks, on_epoch, progress, desc, teacher)


@contextmanager
def _eval_mode(model: nn.Module | None):
    """``model`` (if any) in eval mode inside, its train/eval mode restored after."""
    if model is None:
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _fit(model, data, config, masks, on_epoch, progress, desc, teacher) -> list[dict]:
    device = next(model.parameters()).device
    channels_last = device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() > 1 else no_decay).append(p)
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        momentum=config.momentum,
        nesterov=True,
    )
    steps_per_epoch = math.ceil(len(data.train) / config.batch_size)
    total = config.epochs * steps_per_epoch
    if config.schedule == "onecycle":
        # torch's OneCycleLR divides by zero when its warm-up phase is exactly one step
        # (pct_start * total == 1, e.g. 4 steps in all); warm up a little longer then.
        pct_start = 0.25 if 0.25 * total != 1 else 0.3
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=total, pct_start=pct_start)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    loss_fn = nn.CrossEntropyLoss()
    apply_masks(model, masks)
    history = []
    bar = tqdm(total=total, desc=desc, disable=None if progress else True, leave=False, unit="step")  # None: only on a terminal
    for epoch in range(1, config.epochs + 1):
        model.train()
        start, loss_sum, seen = time.perf_counter(), torch.zeros((), device=device), 0
        for x, y in batches(data.train, config.batch_size, shuffle=True, augment=config.augment,
                            generator=gen, channels_last=channels_last):
            with _autocast(device):
                if teacher is None:
                    loss = loss_fn(model(x), y)
                else:
                    with torch.no_grad():
                        teacher_logits = teacher(x)
                    loss = distillation_loss(model(x), teacher_logits, y, config.distill_temperature,
                                             config.distill_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            apply_masks(model, masks)
            loss_sum += loss.detach() * len(y)
            seen += len(y)
            bar.update()
        train_loss = float(loss_sum) / seen  # the epoch's one sync; NaN once any step's loss was
        if not math.isfinite(train_loss):
            bar.close()
            raise AutopruneError(f"training diverged: loss became {train_loss} in epoch {epoch} of {config.epochs}; "
                                 f"lower the learning rate (lr {config.lr:g})")
        val_acc = evaluate(model, data.val)
        record = {"epoch": epoch, "train_loss": train_loss, "val_accuracy": val_acc,
                  "seconds": time.perf_counter() - start}
        history.append(record)
        bar.set_postfix(epoch=f"{epoch}/{config.epochs}", loss=f"{record['train_loss']:.3f}", val=f"{val_acc:.2f}%")
        if progress and bar.disable:  # no terminal for a bar: one log line per epoch instead
            log.info("%s: epoch %d/%d  loss %.3f  val %.2f%%  %.1fs", desc, epoch, config.epochs,
                     record["train_loss"], val_acc, record["seconds"])
        if on_epoch is not None and on_epoch(epoch, val_acc):
            break
    bar.close()
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    # The last steps' updates can overflow while their losses were still finite.
    state = [t for t in model.state_dict().values() if t.is_floating_point()]
    if not bool(torch.stack([torch.isfinite(t).all() for t in state]).all()):
        raise AutopruneError(f"training diverged: weights became NaN or Inf by epoch {len(history)} of "
                             f"{config.epochs}; lower the learning rate (lr {config.lr:g})")
    return history


@torch.no_grad()
def recalibrate_bn(model: nn.Module, split: Split, num_batches: int = 4, batch_size: int = 128,
                   seed: int = 0) -> None:
    """Recompute BatchNorm running statistics on a few training batches (no gradient step).

    EagleEye's adaptive BatchNorm: pruning shifts each layer's activation
    statistics, so a pruned model scored with the dense model's running stats
    is misjudged. Stats are re-estimated as a plain average (momentum None) over
    ``num_batches`` shuffled, unaugmented training batches.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training = model.training
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches seen
    model.train()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    for i, (x, _) in enumerate(batches(split.to(device), batch_size, shuffle=True, generator=gen,
                                       channels_last=device.type == "cuda")):
        if i >= num_batches:
            break
        with _autocast(device):
            model(x)
    for bn, momentum in zip(bns, saved):
        bn.momentum = momentum
    model.train(was_training)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int | None = None) -> float:
    """Top-1 accuracy in percent (0-100) on ``split``; restores train/eval mode.

    ``batch_size`` defaults to 1024 on CUDA and 128 on the CPU, where the
    activations of larger batches fall out of the caches (batch 1024 measured
    1.3-2x slower than 128 on the CPU; see benchmarks/train_throughput.py).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if batch_size is None:
        batch_size = 1024 if device.type == "cuda" else 128
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in batches(split.to(device), batch_size, channels_last=device.type == "cuda"):
        with _autocast(device):
            correct += (model(x).argmax(1) == y).sum()
    model.train(was_training)
    return 100.0 * int(correct) / max(1, len(split))
