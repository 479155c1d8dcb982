"""One-shot rules: the registry keeps the old rules' results; Torch-Pruning's global channel rules
meet a params or MACs cap, and their converted VGG is exactly Torch-Pruning's network."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from autoprune import metrics
from autoprune import torch_pruning_rules as tpr
from autoprune.budget import channel_cost_fraction, layer_numels
from autoprune.channel import kept_channels
from autoprune.config import load_config
from autoprune.errors import AutopruneError
from autoprune.model import CONV_NAMES
from autoprune.plan import PruningPlan, prune
from autoprune.priors import ONE_SHOT_RULES, one_shot_allocation, one_shot_pruned

from conftest import randomized_model

TP_RULES = ("tp_magnitude", "tp_lamp", "tp_bn_scale")


@pytest.fixture(scope="module")
def dense():
    torch.set_num_threads(1)
    return randomized_model(0.125, seed=7)


def kept_index(dense_values: torch.Tensor, kept_values: torch.Tensor) -> torch.Tensor:
    """Which dense channels survive, read off a per-channel vector of distinct random values."""
    return torch.tensor([int((dense_values == v).nonzero().item()) for v in kept_values])


# --- the registry keeps the old rules ------------------------------------------------------


def test_registry_lists_the_rules_in_order():
    assert ONE_SHOT_RULES == {"fine_grained": ("uniform", "global", "lamp"),
                              "channel": ("uniform", *TP_RULES)}
    assert set(tpr.IMPORTANCES) == set(TP_RULES)


def test_old_rules_give_the_values_computed_before_the_registry():
    # Zero counts and kept widths recorded with the if-branch version (commit b2f82d7).
    model = randomized_model(0.0625, seed=3)
    numels = layer_numels(model.channels)
    zeros = {
        "uniform": [87, 233, 931, 1861, 3722, 7445, 7445, 7444, 258],
        "global": [28, 97, 529, 1419, 2862, 8152, 8131, 8111, 97],
        "lamp": [15, 79, 568, 1422, 3490, 7922, 7925, 7922, 83],
    }
    for rule, want in zeros.items():
        got = one_shot_allocation(rule, model, "fine_grained", 0.2)
        assert [round(got[n] * numels[n]) for n in got] == want
    widths = {("params", 0.5): [3, 5, 10, 10, 21, 21, 21, 32], ("params", 0.33): [2, 4, 8, 8, 16, 16, 16, 32],
              ("macs", 0.5): [3, 5, 11, 11, 22, 22, 22, 32], ("macs", 0.33): [2, 4, 9, 9, 18, 18, 18, 32]}
    for (metric, target), want in widths.items():
        assert kept_channels(model.channels, one_shot_allocation("uniform", model, "channel", target, metric)) == want


@pytest.mark.parametrize("rule", ["uniform", "global", "lamp"])
def test_one_shot_pruned_fine_grained_is_the_plan_with_its_masks(dense, rule):
    pruned, ratios = one_shot_pruned(rule, dense, "fine_grained", 0.25)
    assert ratios == one_shot_allocation(rule, dense, "fine_grained", 0.25)
    want = prune(dense, PruningPlan("fine_grained", ratios))
    assert pruned.masks.keys() == want.masks.keys()
    assert all(torch.equal(pruned.masks[k], want.masks[k]) for k in want.masks)
    assert all(torch.equal(a, b) for a, b in zip(pruned.model.state_dict().values(), want.model.state_dict().values()))


def test_one_shot_pruned_channel_uniform_is_autopruning_plan(dense):
    pruned, ratios = one_shot_pruned("uniform", dense, "channel", 0.5, "macs")
    assert ratios == one_shot_allocation("uniform", dense, "channel", 0.5, "macs")
    want = prune(dense, PruningPlan("channel", ratios))  # the lab's norm criterion
    assert pruned.masks is None and pruned.model.channels == want.model.channels
    assert all(torch.equal(a, b) for a, b in zip(pruned.model.state_dict().values(), want.model.state_dict().values()))


def test_unknown_rules_name_the_rules_of_the_kind(dense):
    with pytest.raises(AutopruneError, match=r"^unknown one-shot rule 'tp_foo' for channel; use one of uniform, "
                                             r"tp_magnitude, tp_lamp, tp_bn_scale$"):
        one_shot_allocation("tp_foo", dense, "channel", 0.5)
    with pytest.raises(AutopruneError, match=r"^unknown one-shot rule 'tp_lamp' for fine_grained; use one of "
                                             r"uniform, global, lamp$"):
        one_shot_pruned("tp_lamp", dense, "fine_grained", 0.5)
    with pytest.raises(AutopruneError, match=r"^unknown pruning kind 'fine'; use fine_grained or channel$"):
        one_shot_allocation("uniform", dense, "fine", 0.5)
    with pytest.raises(AutopruneError, match=r"^unknown Torch-Pruning rule 'lamp'; use one of tp_magnitude, "):
        tpr.search("lamp", dense, 0.5)


# --- Torch-Pruning's global channel rules ------------------------------------------------------


@pytest.mark.parametrize("rule", TP_RULES)
@pytest.mark.parametrize("target", [0.5, 0.33])
def test_tp_rule_reaches_the_largest_macs_at_most_the_target(dense, rule, target):
    found = tpr.search(rule, dense, target, "macs")
    kept = found.pruned.kept
    assert found.fraction <= target
    assert kept[-1] == dense.channels[-1] and min(kept) >= 1
    # The closed form is what PyTorch's flop counter measures on Torch-Pruning's network.
    assert metrics.count_macs(found.pruned.module) / metrics.count_macs(dense) == pytest.approx(found.fraction,
                                                                                                rel=1e-12)
    # Largest reachable: one channel fewer in the global ranking is over the target, so the gap
    # to the target is less than one channel's MACs (no ties in these random weights).
    fewer = tpr.global_prune(rule, dense, tpr.ratio_for(found.removed - 1, tpr.prunable_channels(dense)))
    assert sum(fewer.kept) == sum(kept) + 1 and not fewer.emptied
    assert channel_cost_fraction(dense.channels, fewer.ratios, "macs") > target
    assert sum(dense.channels) - sum(kept) == found.removed


@pytest.mark.parametrize("rule", TP_RULES)
def test_tp_pruned_vgg_is_torch_prunings_network(dense, rule):
    model = copy.deepcopy(dense).train()  # train mode: the graph trace must not move BN statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, ratios = one_shot_pruned(rule, model, "channel", 0.33, "macs")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # dense untouched
    found = tpr.search(rule, dense, 0.33, "macs")
    # The allocation keeps Torch-Pruning's widths, under the lab's rounding; the VGG has them.
    assert ratios == one_shot_allocation(rule, dense, "channel", 0.33, "macs") == found.pruned.ratios
    assert kept_channels(dense.channels, ratios)[:-1] == pruned.model.channels[:-1] == found.pruned.kept[:-1]
    assert pruned.masks is None and pruned.model.channels[-1] == dense.channels[-1] and pruned.model.training
    assert prune(dense, PruningPlan("channel", ratios)).model.channels == pruned.model.channels
    # Exactly Torch-Pruning's outputs (eval mode).
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(pruned.model.eval()(x), found.pruned.module.eval()(x))
    # Torch-Pruning's network is dense restricted to the kept channels: weights and BN statistics.
    state, full = pruned.model.state_dict(), dense.state_dict()
    previous = torch.arange(3)
    for i, name in enumerate(CONV_NAMES):
        bn = f"backbone.bn{i}"
        idx = kept_index(full[f"{bn}.weight"], state[f"{bn}.weight"])
        for key in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(state[f"{bn}.{key}"], full[f"{bn}.{key}"][idx])
        assert torch.equal(state[f"backbone.{name}.weight"], full[f"backbone.{name}.weight"][idx][:, previous])
        previous = idx
    # The last conv and the classifier are untouched.
    assert torch.equal(previous, torch.arange(dense.channels[-1]))
    assert torch.equal(state["classifier.weight"], full["classifier.weight"])
    assert torch.equal(state["classifier.bias"], full["classifier.bias"])


def test_tp_rule_meets_a_params_target_too(dense):
    found = tpr.search("tp_magnitude", dense, 0.4, "params")
    assert found.fraction <= 0.4
    assert metrics.count_params(tpr.to_vgg(found.pruned.module, found.pruned.kept, 10)) == pytest.approx(
        found.fraction * metrics.count_params(dense), abs=0.5)
    fewer = tpr.global_prune("tp_magnitude", dense, tpr.ratio_for(found.removed - 1, tpr.prunable_channels(dense)))
    assert channel_cost_fraction(dense.channels, fewer.ratios, "params") > 0.4


def test_a_target_that_would_empty_a_layer_is_refused(dense):
    with pytest.raises(AutopruneError, match=r"^tp_lamp cannot reach macs 0\.001: its global threshold empties "
                                             r"conv\d first \(the smallest macs it reaches is 0\.\d{4}\); use a "
                                             r"larger target$"):
        one_shot_allocation("tp_lamp", dense, "channel", 0.001, "macs")


def test_without_torch_pruning_the_rule_names_the_extra(dense, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import torch_pruning -> ImportError
    fix = "one-shot rule 'tp_lamp' needs Torch-Pruning, which is not installed; pip install 'autoprune[pruning]'"
    with pytest.raises(AutopruneError) as exc:
        one_shot_pruned("tp_lamp", dense, "channel", 0.5, "macs")
    assert str(exc.value) == fix
    with pytest.raises(AutopruneError) as exc:
        load_config(channel_study(tmp_path, ["uniform", "tp_lamp"]))
    assert str(exc.value) == "[priors] warm_start: " + fix
    assert one_shot_allocation("uniform", dense, "channel", 0.5, "macs")  # the other rules still run


def channel_study(tmp_path, warm_start: list[str]):
    path = tmp_path / "ch.toml"
    path.write_text(f'[study]\nname = "ch"\nkind = "channel"\nout_dir = "{tmp_path}"\n\n[model]\nwidth = 0.125\n\n'
                    f"[constraints]\nmax_macs_fraction = 0.5\n\n[priors]\nwarm_start = {warm_start!r}\n")
    return path


def test_a_channel_study_warm_starts_from_a_tp_rule(dense, tmp_path):
    from autoprune.prepare import warm_starts

    config = load_config(channel_study(tmp_path, ["uniform", "tp_lamp"]))
    starts = warm_starts(config, dense)
    assert list(starts) == ["uniform", "tp_lamp"]
    assert starts["tp_lamp"] == tpr.search("tp_lamp", dense, 0.5, "macs").pruned.ratios
    assert starts["uniform"] == one_shot_allocation("uniform", dense, "channel", 0.5, "macs")


# --- any model: Torch-Pruning's groups named as autoprune names them ----------------------------------


def graph_model(exclude=()):
    """The residual-add and concatenation user model of test_models, randomised (BN statistics too)."""
    from test_models import USER_SOURCE

    from autoprune.sources import build_model

    torch.manual_seed(0)
    model = build_model(USER_SOURCE, 10, exclude=exclude, width=8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def graph_count(model) -> dict:
    from autoprune.sources import prunable

    return {"params": metrics.count_params(model),
            "macs": metrics.count_macs(model, prunable(model).example_input())}


@pytest.mark.parametrize("metric", ["macs", "params"])
def test_tp_rule_on_a_graph_model_meets_its_target_from_below_and_names_its_groups(metric, tmp_path):
    from test_models import USER_SOURCE

    from autoprune.sources import load_checkpoint, prunable, save_checkpoint

    model = graph_model()
    view = prunable(model)
    groups = view.channel_groups()
    assert groups == {"stem.0": 8, "block.conv1": 8, "side": 8, "down": 16}  # the add couples stem and block
    found = tpr.search("tp_magnitude", model, 0.5, metric)
    pruned = found.pruned
    assert list(pruned.ratios) == list(groups) and list(pruned.widths) == list(groups)
    assert tpr.prunable_channels(model) == 40
    # Torch-Pruning's own network, counted, is what the cost model predicts for its widths: <= the target
    full = graph_count(model)[metric]
    assert graph_count(pruned.module)[metric] == view.cost(pruned.widths)[metric] <= 0.5 * full
    assert found.fraction == view.cost(pruned.widths)[metric] / full
    assert pruned.module.head.out_features == 10 and min(pruned.widths.values()) >= 1
    # largest reachable: one globally ranked channel fewer is over the target
    fewer = tpr.global_prune("tp_magnitude", model, tpr.ratio_for(found.removed - 1, 40))
    assert sum(fewer.widths.values()) == sum(pruned.widths.values()) + 1 and not fewer.emptied
    assert view.cost(fewer.widths)[metric] > 0.5 * full
    # the allocation as an autoprune plan keeps the same widths
    assert tpr.allocation("tp_magnitude", model, 0.5, metric) == pruned.ratios
    assert view.kept(pruned.ratios) == pruned.widths
    # the one-shot rule's network records its widths, so it saves weights-only and reloads to the same outputs
    one_shot, ratios = one_shot_pruned("tp_magnitude", model, "channel", 0.5, metric)
    net = one_shot.model
    assert ratios == pruned.ratios and one_shot.masks is None
    assert prunable(net).describe() == {"widths": pruned.widths} and graph_count(net) == graph_count(pruned.module)
    save_checkpoint(net, tmp_path / "tp.pt")
    again, _ = load_checkpoint(tmp_path / "tp.pt", source=USER_SOURCE)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again.eval()(x), net.eval()(x))


def test_tp_rule_leaves_an_excluded_group_whole():
    model = graph_model(exclude=["side"])
    found = tpr.search("tp_lamp", model, 0.6, "macs")
    assert list(found.pruned.ratios) == ["stem.0", "block.conv1", "down"]
    assert found.pruned.module.side.out_channels == 8 and found.fraction <= 0.6
    assert found.pruned.module.down.out_channels < 16  # the others are cut
