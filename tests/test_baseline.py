"""Baselines over any model: the uniform plan at a study's cap by the model's own count, and the one
prune -> fine-tune -> profile that the report, the benchmarks and the trials share."""

from __future__ import annotations

import math

import pytest
import torch

from autoprune import metrics
from autoprune.baseline import baseline_plan, cached_uniform, fine_tuned_plan
from autoprune.config import StudyConfig
from autoprune.plan import plan_for, prune
from autoprune.sources import prunable

from conftest import TINY_DATA
from test_torch_pruning_rules import graph_count, graph_model

pytestmark = pytest.mark.usefixtures("one_thread")


def study(kind: str, size: float = 1.0, macs: float | None = None) -> StudyConfig:
    config = StudyConfig()
    config.study.kind = kind
    config.constraints.max_size_fraction = size
    config.constraints.max_macs_fraction = macs
    config.data.spec = TINY_DATA
    config.finetune.epochs = 1
    config.finetune.batch_size = 128
    config.latency.warmup, config.latency.repeats = 1, 3
    return config


@pytest.mark.parametrize("metric", ["macs", "params"])
def test_a_uniform_channel_baseline_of_a_graph_model_meets_its_cap_by_the_models_own_count(metric):
    model = graph_model()
    view = prunable(model)
    config = study("channel", *((1.0, 0.45) if metric == "macs" else (0.45, None)))
    plan = baseline_plan(config, view.cost_model())
    assert plan.layers == tuple(view.channel_groups()) and plan.base_channels is None
    assert plan == plan_for(model, "channel", plan.ratios, plan.criterion)  # the plan any caller would make
    pruned = prune(model, plan).model
    full, kept = graph_count(model)[metric], view.kept(plan.ratios)
    assert graph_count(pruned)[metric] == view.cost(kept)[metric] <= 0.45 * full
    # uniform: every group keeps the same fraction of its width, up to one channel
    fractions = [kept[g] / c for g, c in view.channel_groups().items()]
    assert max(fractions) - min(fractions) <= 1 / min(view.channel_groups().values())
    # the largest reachable: one more channel in each group breaks the cap
    widths = view.channel_groups()
    assert view.cost({g: min(k + 1, widths[g]) for g, k in kept.items()})[metric] > 0.45 * full


def test_a_uniform_fine_grained_baseline_of_a_graph_model_meets_its_size_cap_exactly():
    model = graph_model()
    costs = prunable(model).cost_model()
    plan = baseline_plan(study("fine_grained", 0.3), costs)
    assert set(plan.ratios) == set(costs.layers) and plan.layers == tuple(costs.layers)
    pruned = prune(model, plan).model
    zeroed = metrics.count_nonzero_params(model) - metrics.count_nonzero_params(pruned)
    assert zeroed == costs.params - math.floor(0.3 * costs.params)


def test_the_vgg_baseline_plan_records_its_conv_widths_as_before():
    from autoprune.budget import vgg_cost_model
    from autoprune.model import vgg_channels

    channels = vgg_channels(0.125)
    config = study("channel", 0.6, 0.5)
    plan = baseline_plan(config, vgg_cost_model(channels))
    assert plan == baseline_plan(config, channels)  # the cost model or the widths: one plan (one cache key)
    assert plan.base_channels == tuple(channels) and plan.layers is None


def test_fine_tuned_plan_measures_a_graph_model_as_a_trial_does_and_the_cache_reads_it_back(tmp_path):
    model = graph_model()
    view = prunable(model)
    config = study("channel", 1.0, 0.5)
    data = config.load_data()
    plan = baseline_plan(config, view.cost_model())
    got = fine_tuned_plan(model, plan, data, config, seed=0)
    kept = view.kept(plan.ratios)
    dense = graph_count(model)
    assert got["plan"] == plan.to_dict() and got["finetune_epochs"] == 1
    assert got["macs"] == view.cost(kept)["macs"] and got["params"] == view.cost(kept)["params"]
    assert got["macs_fraction"] == got["macs"] / dense["macs"] <= 0.5
    assert got["size_fraction"] == got["nonzero_params"] / dense["params"]
    assert 0.0 <= got["val_accuracy"] <= 100.0 and 0.0 <= got["test_accuracy"] <= 100.0
    # the cached uniform baseline of the same model: computed once (with latency: a channel study), then read
    first = cached_uniform(model, config, tmp_path, "sha-of-the-checkpoint", dense_figures=dense, device="cpu")
    assert not first["from_cache"] and first["plan"] == plan.to_dict() and first["latency_fraction"] > 0
    again = cached_uniform(model, config, tmp_path, "sha-of-the-checkpoint", dense_figures=dense, device="cpu")
    assert again["from_cache"] and again["key"] == first["key"]
    assert {k: v for k, v in again.items() if k != "from_cache"} == {k: v for k, v in first.items()
                                                                     if k != "from_cache"}
    assert torch.equal(next(model.parameters()), next(graph_model().parameters()))  # the dense model untouched
