"""Pruning core, exact behaviour: fine-grained masks, channel pruning, budgets, one-shot rules, bad input."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch

from autoprune import metrics
from autoprune.budget import (
    channel_budget,
    channel_cost_fraction,
    channel_upper_bounds,
    fine_grained_budget,
    fine_size_fraction,
    layer_numels,
    vgg_cost,
)
from autoprune.channel import kept_channels
from autoprune.errors import AutopruneError
from autoprune.fine_grained import global_magnitude_sparsities, lamp_sparsities, magnitude_mask, magnitude_masks
from autoprune.model import CONV_NAMES, PRUNABLE_LAYERS, build_model, param_name, vgg_channels
from autoprune.kinds import KINDS
from autoprune.plan import PruningPlan, parse_ratio_spec, prune

from conftest import randomized_model, run_main


def state_copy(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- fine-grained: one tensor ----------------------------------------------------


def test_random_tensor_at_075_keeps_exactly_2500():
    w = torch.randn(100, 100, generator=torch.Generator().manual_seed(0))
    mask = magnitude_mask(w, 0.75)
    assert int(mask.sum()) == 2500
    kept = w.abs()[mask.bool()]
    assert kept.min() >= w.abs()[~mask.bool()].max()  # the largest magnitudes survive


def test_equal_magnitudes_keep_exactly_2500_and_prune_lowest_index_first():
    signs = torch.randint(0, 2, (100, 100), generator=torch.Generator().manual_seed(1)) * 2 - 1
    w = signs.float() * 0.5  # every |w| equal: the lab's threshold would prune everything
    mask = magnitude_mask(w, 0.75)
    assert int(mask.sum()) == 2500
    flat = mask.flatten()
    assert torch.all(flat[:7500] == 0) and torch.all(flat[7500:] == 1)
    assert torch.equal(mask, magnitude_mask(w, 0.75))  # deterministic


def test_ties_at_the_threshold_prune_lowest_flat_index_first():
    w = torch.tensor([[3.0, 1.0, 2.0], [1.0, 5.0, -1.0]])  # three weights tie at |w| = 1
    mask = magnitude_mask(w, 2 / 6)
    assert mask.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]


def test_sparsity_zero_keeps_all_and_one_zeroes_all():
    w = torch.randn(100, 100, generator=torch.Generator().manual_seed(2))
    assert int(magnitude_mask(w, 0.0).sum()) == 10_000
    assert int(magnitude_mask(w, 1.0).sum()) == 0


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_plan_values_outside_unit_interval_raise(bad):
    with pytest.raises(AutopruneError, match="must be in \\[0, 1\\]"):
        PruningPlan("fine_grained", {"conv3": bad})
    with pytest.raises(AutopruneError, match="must be in \\[0, 1\\]"):
        PruningPlan("channel", {"conv3": bad})


def test_fine_grained_plan_on_a_model_exact_counts_and_input_unchanged():
    model = randomized_model(0.125)
    before = state_copy(model)
    plan = PruningPlan("fine_grained", {"conv2": 0.5, "conv5": 0.9, "classifier": 0.3}).for_model(model)
    pruned, masks = prune(model, plan)
    assert same_state(before, model.state_dict())
    params = dict(pruned.named_parameters())
    for layer in PRUNABLE_LAYERS:
        p = params[param_name(layer)]
        assert p.numel() - int(torch.count_nonzero(p)) == int(round(p.numel() * plan.ratio(layer)))
    assert set(masks) == {param_name(n) for n in ("conv2", "conv5", "classifier")}


# --- channel pruning ---------------------------------------------------------------


def test_profile_channel_ratios_03_matches_the_lab(capsys):
    out = run_main(capsys, "profile", "--channel-ratios", "0.3", "--json", "--no-latency")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["channels"] == [45, 90, 179, 179, 358, 358, 358, 512]
    assert d["params"] == 5_013_666
    assert d["macs_torchprofile"] == 305_388_064
    assert d["macs"] == 305_097_920


def _kept_indices(model, i: int, keep: int, criterion: str) -> torch.Tensor:
    """Which output channels of conv i a criterion keeps, computed independently of the library."""
    convs = [getattr(model.backbone, n) for n in CONV_NAMES]
    if criterion == "none":
        return torch.arange(keep)
    if criterion == "norm":
        score = (convs[i + 1].weight.detach() ** 2).sum(dim=(0, 2, 3)).sqrt()
    elif criterion == "bn_scale":
        score = getattr(model.backbone, f"bn{i}").weight.detach().abs()
    else:  # l1
        score = convs[i].weight.detach().abs().flatten(1).sum(1)
    return torch.topk(score, keep).indices


@pytest.mark.parametrize("criterion", KINDS["channel"].criteria(lab_vgg=True))
def test_channel_pruning_equals_silencing_the_removed_channels(criterion):
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    for seed in range(3):
        model = randomized_model(0.25, seed=seed)
        rng = random.Random(seed)
        ratios = {n: rng.uniform(0.0, 0.8) for n in CONV_NAMES[:-1]}
        before = state_copy(model)
        pruned = prune(model, PruningPlan("channel", ratios, criterion).for_model(model)).model
        assert same_state(before, model.state_dict()), "the input model was modified"
        kept = kept_channels(model.channels, ratios)
        assert pruned.channels == kept[:-1] + [model.channels[-1]]
        silenced = copy.deepcopy(model)
        with torch.no_grad():
            for i, keep in enumerate(kept[:-1]):
                removed = torch.ones(model.channels[i], dtype=torch.bool)
                removed[_kept_indices(model, i, keep, criterion)] = False
                bn = getattr(silenced.backbone, f"bn{i}")
                bn.weight[removed] = 0
                bn.bias[removed] = 0
            diff = (pruned.eval()(x) - silenced.eval()(x)).abs().max().item()
        assert diff < 1e-5, (criterion, seed, diff)


# --- budgets -------------------------------------------------------------------------


def test_fine_grained_budget_hits_the_target_on_a_real_model():
    model = randomized_model(0.25, seed=3)
    total = metrics.count_params(model)
    rng = random.Random(0)
    for _ in range(20):
        prefs = {n: rng.random() for n in PRUNABLE_LAYERS}
        target = rng.uniform(0.05, 0.5)
        sparsities = fine_grained_budget(model.channels, target, preferences=prefs)
        pruned = prune(model, PruningPlan("fine_grained", sparsities).for_model(model)).model
        measured = metrics.count_nonzero_params(pruned) / total
        assert abs(measured - target) <= 1e-4, (target, measured)  # 0.01 percentage points
        assert measured == pytest.approx(fine_size_fraction(model.channels, sparsities), abs=1e-12)


def test_channel_budget_is_the_largest_reachable_below_the_target_and_matches_metrics():
    model = randomized_model(0.25, seed=4)
    channels = model.channels
    dense = vgg_cost(channels)
    assert dense["params"] == metrics.count_params(model) and dense["macs"] == metrics.count_macs(model)
    rng = random.Random(1)
    for trial in range(20):
        metric = ("params", "macs")[trial % 2]
        prefs = {n: rng.random() for n in CONV_NAMES[:-1]}
        target = rng.uniform(0.05, 0.5)
        ratios = channel_budget(channels, target, metric=metric, preferences=prefs)
        kept = kept_channels(channels, ratios)
        kept[-1] = channels[-1]
        cost = vgg_cost(kept)[metric] / dense[metric]
        assert cost <= target
        assert cost == channel_cost_fraction(channels, ratios, metric)
        # the next configuration of the shift rule (one more channel in some conv) overshoots
        steps = []
        for i in range(len(CONV_NAMES) - 1):
            if kept[i] < channels[i]:
                more = list(kept)
                more[i] += 1
                steps.append(vgg_cost(more)[metric] / dense[metric] - cost)
        assert target - cost < max(steps), (target, cost)
        pruned = prune(model, PruningPlan("channel", ratios).for_model(model)).model
        assert pruned.channels == kept
        measured = metrics.count_params(pruned) if metric == "params" else metrics.count_macs(pruned)
        assert measured == vgg_cost(kept)[metric]


def test_channel_budget_hits_a_reachable_target_exactly():
    channels = vgg_channels(1.0)
    ratios = {n: 0.3 for n in CONV_NAMES[:-1]}
    target = channel_cost_fraction(channels, ratios)
    assert target == 5_013_666 / 9_228_362
    got = channel_budget(channels, target)
    assert kept_channels(channels, got)[:-1] == [45, 90, 179, 179, 358, 358, 358]


def test_target_below_the_bounds_names_the_smallest_reachable_fraction():
    channels = vgg_channels(0.25)
    upper = {n: 0.5 for n in PRUNABLE_LAYERS}
    numels, total = layer_numels(channels), vgg_cost(channels)["params"]
    smallest = (total - sum(int(n * 0.5) for n in numels.values())) / total
    with pytest.raises(AutopruneError, match=f"smallest reachable size fraction is {smallest:.4f}"):
        fine_grained_budget(channels, 0.1, upper=upper)
    cupper = {n: 0.5 for n in CONV_NAMES[:-1]}
    csmallest = channel_cost_fraction(channels, cupper)
    with pytest.raises(AutopruneError, match=f"smallest reachable params fraction is {csmallest:.4f}"):
        channel_budget(channels, 0.1, upper=cupper)
    # the channel upper bounds keep one channel per conv
    assert kept_channels(channels, channel_upper_bounds(channels))[:-1] == [1] * 7


def test_uniform_preferences_give_equal_sparsities_up_to_rounding():
    channels = vgg_channels(0.25)
    numels = layer_numels(channels)
    for target in (0.5, 0.3, 0.2137, 0.1):
        sp = fine_grained_budget(channels, target)
        assert fine_size_fraction(channels, sp) == pytest.approx(target, abs=1 / vgg_cost(channels)["params"])
        common = sp["conv5"]
        for n, s in sp.items():
            assert abs(s - common) <= 1 / numels[n] + 1 / numels["conv5"], (n, s, common)


# --- one-shot rules ------------------------------------------------------------------------


def _zeros_after(model, sparsities) -> int:
    masks = magnitude_masks(model, sparsities)
    return sum(int((m == 0).sum()) for m in masks.values())


@pytest.mark.parametrize("rule", [global_magnitude_sparsities, lamp_sparsities])
def test_global_rules_prune_exactly_the_requested_zeros(rule):
    model = randomized_model(0.125, seed=5)
    total = sum(layer_numels(model.channels).values())
    for fraction in (0.1, 0.5, 0.77, 0.95):
        wanted = int(total * fraction)
        assert _zeros_after(model, rule(model, wanted)) == wanted


def test_lamp_keeps_at_least_one_weight_per_layer():
    model = randomized_model(0.125, seed=6)
    numels = layer_numels(model.channels)
    total = sum(numels.values())
    sp = lamp_sparsities(model, total - len(numels))
    for n, s in sp.items():
        assert round(s * numels[n]) == numels[n] - 1, n  # exactly one survivor each
    sp = lamp_sparsities(model, int(total * 0.995))
    assert all(round(s * numels[n]) < numels[n] for n, s in sp.items())


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, words",
    [
        (["--sparsity", "conv9=0.5"], ["unknown layer 'conv9'", "conv0, conv1", "classifier"]),
        (["--sparsity", "1.5"], ["must be in [0, 1]", "1.5"]),
        (["--channel-ratios", "conv0=1.0"], ["leaves no channel of conv0"]),
        (["--sparsity", "abc"], ["cannot read ratio spec 'abc'"]),
        (["--sparsity", "0.5", "--channel-ratios", "0.3"], ["cannot be combined"]),
    ],
)
def test_bad_input_via_cli(capsys, args, words):
    out = run_main(capsys, "profile", "--width", "0.125", "--no-latency", *args)
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoprune: error:"), out.stderr
    assert "Traceback" not in out.stderr
    for w in words:
        assert w in lines[0]


def test_plan_for_another_width_is_refused():
    small, big = build_model("vgg", width=0.125), build_model("vgg", width=0.25)
    plan = PruningPlan("channel", {"conv1": 0.5}).for_model(small)
    with pytest.raises(AutopruneError, match="made for a VGG with conv widths"):
        prune(big, plan)
    fine = PruningPlan("fine_grained", {"conv1": 0.5}).for_model(small)
    with pytest.raises(AutopruneError, match="make the plan for this width"):
        prune(big, fine)


def test_unreadable_ratio_spec_and_unknown_layer_at_library_level():
    with pytest.raises(AutopruneError, match="cannot read ratio spec"):
        parse_ratio_spec("conv0=half", "channel")
    with pytest.raises(AutopruneError, match="valid layers: conv0, conv1, conv2, conv3, conv4, conv5, conv6$"):
        PruningPlan("channel", parse_ratio_spec("conv7=0.5", "channel"))


@pytest.mark.parametrize("rule", ["uniform", "global", "lamp"])
def test_one_shot_allocations_meet_the_size_cap_exactly(rule):
    from autoprune.priors import one_shot_allocation

    model = randomized_model(0.125, seed=7)
    params = sum(p.numel() for p in model.parameters())
    for target in (0.25, 0.1):
        pruned = prune(model, PruningPlan("fine_grained", one_shot_allocation(rule, model, "fine_grained", target)))
        nonzero = sum(int((p != 0).sum()) for p in pruned.model.parameters())
        assert nonzero == math.floor(target * params + 1e-6)  # the budget's cap, to the weight


def test_one_shot_channel_uniform_is_the_equal_preference_budget():
    from autoprune.budget import channel_budget
    from autoprune.priors import one_shot_allocation

    model = randomized_model(0.125, seed=8)
    assert one_shot_allocation("uniform", model, "channel", 0.5, "macs") == channel_budget(model.channels, 0.5, "macs")
    with pytest.raises(AutopruneError, match="unknown one-shot rule 'lamp' for channel; use one of uniform"):
        one_shot_allocation("lamp", model, "channel", 0.5)
