"""A baseline's prune -> fine-tune -> profile, in one place, for any model.

The report's uniform baseline, the benchmarks' one-shot rules and the
re-scores all fine-tune a pruned model by the study's recipe (:func:`finetune`)
and measure it the way a trial does (:func:`autoprune.metrics.pruned_figures`);
:func:`fine_tuned` does both and returns the figures as a plain dict,
:func:`fine_tuned_plan` prunes by a :class:`PruningPlan` first.

:func:`baseline_plan` is uniform pruning exactly at a study's cap(s) over any
model's :class:`autoprune.budget.CostModel` (``prunable(dense).cost_model()``);
:func:`cached_uniform` runs it once per checkpoint, plan, recipe and data and
keeps the result in ``out_dir/baseline-cache.json`` (a damaged cache is
ignored and rewritten).

This module sits below the trial loop (:mod:`autoprune.objective` imports
:func:`finetune` from here), so it imports nothing that runs a study.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

from torch import nn

from . import budget, metrics
from .config import StudyConfig
from .data import Data
from .errors import AutopruneError
from .files import OUT_FIX, output_path
from .latency import Meter
from .kinds import KINDS, Pruned
from .plan import PruningPlan, prune
from .sources import prunable
from .space import study_latency_budget
from .train import evaluate, fit, resolve_device

log = logging.getLogger("autoprune")

# what a cached entry must hold to be reused (older entries without the newer figures still are)
CACHED_FIELDS = ("plan", "val_accuracy", "test_accuracy", "size_fraction", "macs_fraction", "finetune_epochs")
CACHE_FILE = "baseline-cache.json"


def finetune(pruned: Pruned, dense: nn.Module, data: Data, config: StudyConfig, seed: int, *, on_epoch=None,
             progress: bool = False, desc: str = "fine-tune") -> list[dict]:
    """Fine-tune a pruned model (:class:`autoprune.plan.Pruned`) in place by the study's recipe.

    The one fine-tune every config gets: trials, re-scores of the leading
    trials and the benchmark's one-shot baselines all call it, so every method
    in a comparison has the same recipe. ``seed`` sets the data order and
    augmentation. With ``[finetune] distill`` on, ``dense`` (on the pruned
    model's device) is the teacher. Returns fit's per-epoch history; a diverged
    fine-tune raises an :class:`AutopruneError` that names ``desc``.
    """
    recipe = dataclasses.replace(config.finetune_recipe(), seed=int(seed))
    teacher = dense if config.finetune.distill else None
    try:
        return fit(pruned.model, data, recipe, masks=pruned.masks, on_epoch=on_epoch, progress=progress, desc=desc,
                   teacher=teacher)
    except AutopruneError as exc:
        raise AutopruneError(f"{desc} fine-tune: {exc}") from None


def measure_dense(dense: nn.Module) -> dict[str, int]:
    """``{'params', 'macs'}`` of the dense model, what :func:`autoprune.metrics.pruned_figures` divides by."""
    return {"params": metrics.count_params(dense),
            "macs": metrics.count_macs(dense, prunable(dense).example_input())}


def fine_tuned(pruned: Pruned, dense: nn.Module, data: Data, config: StudyConfig, seed: int, *,
               dense_figures: dict | None = None, latency: bool = False, progress: bool = False,
               desc: str = "baseline") -> dict:
    """Fine-tune ``pruned`` in place (:func:`finetune`), then measure it as a trial is measured.

    Returns ``val_accuracy`` (last epoch), ``test_accuracy`` (percent),
    :func:`autoprune.metrics.pruned_figures` (fractions of ``dense_figures``,
    measured on ``dense`` when not given), ``finetune_seconds`` and
    ``finetune_epochs``; with ``latency``, the ``[latency]`` figures measured
    beside the dense model (``latency_ms``, ``latency_runtime``,
    ``latency_threads``, ``latency_fraction``).
    """
    start = time.perf_counter()
    history = finetune(pruned, dense, data, config, seed, progress=progress, desc=desc)
    seconds = time.perf_counter() - start
    net = pruned.model
    if not (dense_figures and {"params", "macs"} <= set(dense_figures)):
        dense_figures = measure_dense(dense)
    figures = metrics.pruned_figures(net, dense_figures, prunable(dense).example_input())
    result = {"val_accuracy": history[-1]["val_accuracy"], "test_accuracy": evaluate(net, data.test), **figures,
              "finetune_seconds": seconds, "finetune_epochs": len(history)}
    if latency:  # as the trials measure it: [latency], beside the dense model
        meter = Meter.from_config(dataclasses.replace(config.latency, predict=False))
        lat = meter.figures(net, dense)
        result.update({k: lat[k] for k in ("latency_ms", "latency_runtime", "latency_threads", "latency_fraction")})
    return result


def fine_tuned_plan(dense: nn.Module, plan: PruningPlan, data: Data, config: StudyConfig, seed: int,
                    **kwargs) -> dict:
    """``dense`` pruned by ``plan`` (a copy), then :func:`fine_tuned`; the figures and ``plan`` (its dict)."""
    return {"plan": plan.to_dict(), **fine_tuned(prune(dense, plan), dense, data, config, seed, **kwargs)}


def baseline_plan(config: StudyConfig, model: budget.ModelCosts, num_classes: int = 10,
                  dense_figures: dict | None = None) -> PruningPlan:
    """Uniform pruning exactly at the study's cap(s): equal preferences for every layer or channel group.

    ``model``: the dense model's :class:`autoprune.budget.CostModel` (``prunable(dense).cost_model()``) or
    the lab's VGG conv widths. Fine-grained: the size cap; channel: every set cap of params, MACs and
    predicted latency (by the latency fit the study recorded in ``dense_figures``), each group pruned by
    the largest ratio any of them needs.
    """
    from .latency import LatencyFit

    costs = budget.as_cost_model(model, num_classes)
    c = config.constraints
    kind = config.study.kind
    round_to = config.pruning.round_to
    ratios = KINDS[kind].budget(costs, c.max_size_fraction, "params", round_to=round_to)
    if KINDS[kind].changes_shape:
        caps = [("macs", c.max_macs_fraction, None)]
        if config.latency_budget:  # by this machine's lookup table (cached where the search ran here)
            cap, predictor = study_latency_budget(config, costs, num_classes,
                                                  fit=LatencyFit.from_figures(dense_figures))
            caps.append(("latency", cap, predictor))
        for metric, cap, predictor in caps:
            if cap is not None:
                by_cap = budget.channel_budget(costs, cap, metric, round_to=round_to, latency=predictor)
                ratios = {n: max(r, by_cap[n]) for n, r in ratios.items()}
    ratios = {n: r for n, r in ratios.items() if r > 0}
    if costs.channels is not None:  # the lab's VGG: its plans record its conv widths (the cache key has them)
        return PruningPlan(kind, ratios, config.study.criterion, tuple(costs.channels), round_to)
    return PruningPlan(kind, ratios, config.study.criterion, round_to=round_to,
                       layers=tuple(KINDS[kind].units(costs)))


def cached_uniform(dense: nn.Module, config: StudyConfig, out_dir: Path, checkpoint_sha256: str, *,
                   dense_figures: dict | None = None, device="auto", progress: bool = False) -> dict:
    """The uniform baseline of ``dense`` (:func:`baseline_plan`, :func:`fine_tuned` with the study's seed),
    read from or written to ``out_dir/baseline-cache.json``; ``from_cache`` says which."""
    costs = prunable(dense).cost_model()
    plan = baseline_plan(config, costs, config.model.num_classes, dense_figures)
    d = config.data
    key_src = {"checkpoint_sha256": checkpoint_sha256, "plan": plan.to_dict(),
               "recipe": config.finetune_recipe().to_dict(), "distill": config.finetune.distill, "data": d.spec,
               "val_size": d.val_size, "data_seed": d.seed, "version": 1}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    cache_path = Path(out_dir) / CACHE_FILE
    cache = read_cache(cache_path)
    hit = cache.get(key)
    if hit is not None and hit.get("key") == key and all(f in hit for f in CACHED_FIELDS):
        log.info("uniform baseline: reusing cached result %s", key)
        return {**hit, "from_cache": True}
    if hit is not None:
        log.warning("uniform baseline: ignoring the damaged entry %s of the cache %s", key, cache_path)
    log.info("uniform baseline: pruning %s uniformly at the cap and fine-tuning %d epoch(s)",
             config.study.kind, config.finetune.epochs)
    dev = resolve_device(device)
    data = config.load_data().to(dev)
    dense.to(dev)
    # The trials' own fine-tune (distillation from the dense model included when it is on).
    result = {**fine_tuned_plan(dense, plan, data, config, config.study.seed, dense_figures=dense_figures,
                                latency=KINDS[config.study.kind].changes_shape, progress=progress),
              "checkpoint_sha256": checkpoint_sha256, "key": key}
    cache[key] = result
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    with output_path(cache_path, OUT_FIX) as tmp:
        tmp.write_text(json.dumps(cache, indent=2))
    return {**result, "from_cache": False}


def read_cache(path: Path) -> dict:
    """The cached baselines by key; a damaged cache counts as empty (and is rewritten after the next baseline)."""
    try:
        cache = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("uniform baseline: ignoring the unreadable cache %s (%s)", path, exc)
        return {}
    if not isinstance(cache, dict) or not all(isinstance(v, dict) for v in cache.values()):
        log.warning("uniform baseline: ignoring the damaged cache %s (not a JSON object of entries)", path)
        return {}
    return cache
