"""Any CNN: model sources, channel groups through Torch-Pruning, exact costs, rebuild from the arch.

The contract runs over (source x pruning kind): the lab's VGG, a CIFAR ResNet-18 (torchvision), a
MobileNetV2 (depthwise convs) and a user model defined here (residual add, concatenation).
"""

from __future__ import annotations

import json
import math
import random
import sys

import pytest
import torch
from torch import nn

import autoprune
from autoprune import budget, metrics, sensitivity
from autoprune.budget import vgg_cost
from autoprune.data import Split
from autoprune.errors import AutopruneError
from autoprune.fine_grained import num_zeros
from autoprune.graph import ChannelGraph, kept_width
from autoprune.kinds import KINDS
from autoprune.plan import plan_for, prune
from autoprune.priors import compute_priors
from autoprune.space import SearchSpace
from autoprune.sources import build_model, from_arch, prunable, save_checkpoint

from conftest import assert_cli_error, run_main

tp = pytest.importorskip("torch_pruning")
pytestmark = pytest.mark.usefixtures("one_thread")

USER_SOURCE = f"module:{__name__}:small_net"


class Block(nn.Module):
    """conv-bn-relu-conv-bn plus the input: the add couples its output channels to its input's."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class SmallNet(nn.Module):
    def __init__(self, width: int = 8, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block = Block(width)
        self.side = nn.Conv2d(width, width, 1)  # concatenated with the block's output
        self.down = nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.block(self.stem(x))
        x = torch.relu(self.down(torch.cat([x, self.side(x)], 1)))
        return self.head(x.mean((2, 3)))


def small_net(width: int = 8, num_classes: int = 10) -> nn.Module:
    return SmallNet(width, num_classes)


class Shuffle(nn.Module):
    """A channel shuffle (view-transpose-view), which Torch-Pruning does not track."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.fc = nn.Conv2d(8, 8, 1), nn.Linear(8, 10)

    def forward(self, x):
        x = self.bn(self.c1(x))
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.fc(self.c2(x).mean((2, 3)))


def shuffle_net() -> nn.Module:
    return Shuffle()


MODELS = {
    "vgg": lambda: build_model("vgg", width=0.125),
    "resnet18": lambda: build_model("torchvision:resnet18", 10, cifar_stem=True),
    "mobilenet_v2": lambda: build_model("torchvision:mobilenet_v2", 10, cifar_stem=True, width_mult=0.25),
    "user": lambda: build_model(USER_SOURCE, 10, width=8),
}
_built: dict = {}


def dense(name: str) -> nn.Module:
    """One randomly initialised dense model per name (BatchNorm statistics randomised too)."""
    if name not in _built:
        torch.manual_seed(0)
        model = MODELS[name]()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                    m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
        _built[name] = model.eval()
    return _built[name]


_views: dict = {}


def view_of(model: nn.Module):
    """The pruning interface, traced once per model object (a trace of ResNet-18 takes a second)."""
    if id(model) not in _views:
        _views[id(model)] = (model, prunable(model))
    return _views[id(model)][1]


def random_plan(model: nn.Module, kind: str, seed: int = 0, round_to: int = 1):
    view = view_of(model)
    names = view.fine_layers() if kind == "fine_grained" else view.channel_groups()
    rng = random.Random(seed)
    return plan_for(model, kind, {n: rng.uniform(0.0, 0.7) for n in names}, round_to=round_to)


def measured(model: nn.Module) -> dict:
    example = prunable(model).example_input()
    return {"params": metrics.count_params(model), "macs": metrics.count_macs(model, example)}


# --- the contract: every source x every kind --------------------------------------------


@pytest.mark.parametrize("kind", ["channel", "fine_grained"])
@pytest.mark.parametrize("name", list(MODELS))
def test_contract_predicted_cost_is_measured_and_save_load_round_trips(name, kind, tmp_path):
    model = dense(name)
    view = view_of(model)
    plan = random_plan(model, kind, seed=1)
    pruned = prune(model, plan).model.eval()
    if kind == "channel":
        assert view.cost(view.kept(plan.ratios, plan.round_to)) == measured(pruned)
    else:  # fine-grained: the nonzero count follows from the per-layer zero counts
        params = dict(model.named_parameters())
        zeros = sum(num_zeros(params[p].numel(), plan.ratio(layer)) for layer, p in view.fine_layers().items())
        assert metrics.count_nonzero_params(pruned) == metrics.count_nonzero_params(model) - zeros
        assert measured(pruned) == view.cost()  # masks leave the shapes, so the dense cost
    path = save_checkpoint(pruned, tmp_path / "m.pt")
    loaded = autoprune.load(path, source=USER_SOURCE if name == "user" else None)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    arch = torch.load(path, weights_only=True)["autoprune"]["arch"]
    assert json.loads(json.dumps(arch)) == arch  # the arch is plain JSON


def test_vgg_closed_form_cost_equals_the_generic_graph_count():
    model = dense("vgg")
    graph = ChannelGraph(model, torch.zeros(1, 3, 32, 32))
    assert list(graph.groups) == [f"backbone.conv{i}" for i in range(8)]  # the classifier's output is left out
    rng = random.Random(0)
    kept = {f"backbone.conv{i}": rng.randint(1, c) for i, c in enumerate(model.channels[:-1])}
    assert graph.cost(kept) == vgg_cost(list(kept.values()) + [model.channels[-1]])
    assert graph.cost() == vgg_cost(model.channels) == measured(model)


# --- groups, widths -------------------------------------------------------------------------


def test_a_residual_add_couples_its_layers_into_one_group():
    model = dense("user")
    groups = ChannelGraph(model, torch.zeros(1, 3, 32, 32)).groups
    assert list(groups) == ["stem.0", "block.conv1", "side", "down"]  # head's output (the logits) is left out
    assert groups["stem.0"].layers == ("stem.0", "stem.1", "block.conv2", "block.bn2")
    pruned = prune(model, plan_for(model, "channel", {"stem.0": 0.5, "side": 0.25})).model
    assert pruned.stem[0].out_channels == pruned.block.conv2.out_channels == pruned.block.conv1.in_channels == 4
    assert pruned.down.in_channels == 4 + 6  # the concatenation takes both groups' kept channels
    resnet = view_of(dense("resnet18")).graph.groups
    assert {"layer1.0.conv2", "layer1.1.conv2", "bn1"} <= set(resnet["conv1"].layers)
    assert "layer1.0.conv2" not in resnet and "fc" not in resnet


def test_depthwise_convs_follow_their_expansion_group():
    model = dense("mobilenet_v2")
    groups = view_of(model).graph.groups
    assert "features.2.conv.1.0" in groups["features.2.conv.0.0"].layers  # the depthwise conv
    pruned = prune(model, plan_for(model, "channel", {"features.2.conv.0.0": 0.5})).model
    dw = pruned.features[2].conv[1][0]
    assert dw.in_channels == dw.out_channels == dw.groups == pruned.features[2].conv[0][0].out_channels == 24


@pytest.mark.parametrize("criterion", ["l1", "bn_scale", "norm", "none"])
def test_criteria_keep_the_most_important_channels(criterion):
    model = dense("user")
    w, bn, nxt = model.block.conv1.weight, model.block.bn1.weight, model.block.conv2.weight
    score = {"l1": w.abs().sum((1, 2, 3)), "bn_scale": bn.abs(), "norm": nxt.pow(2).sum((0, 2, 3)).sqrt(),
             "none": -torch.arange(8.0)}[criterion]
    keep = sorted(torch.topk(score, 3).indices.tolist())  # Torch-Pruning keeps the survivors in order
    pruned = prune(model, plan_for(model, "channel", {"block.conv1": 5 / 8}, criterion)).model
    assert torch.equal(pruned.block.conv1.weight, w[keep]) and torch.equal(pruned.block.conv2.weight, nxt[:, keep])


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0"])
def test_squeeze_excitation_families_cost_exactly(name):
    model = build_model(f"torchvision:{name}", 10, cifar_stem=True).eval()
    view = prunable(model)
    ratios = {n: 0.5 for n in view.channel_groups()}
    pruned = prune(model, plan_for(model, "channel", ratios, "tp_lamp", round_to=8)).model.eval()
    assert view.cost(view.kept(ratios, 8)) == measured(pruned) != view.cost()
    assert pruned(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("round_to", [4, 8, 16])
def test_round_to_keeps_multiples(round_to):
    model = dense("mobilenet_v2")
    view = view_of(model)
    plan = random_plan(model, "channel", seed=2, round_to=round_to)
    kept = view.kept(plan.ratios, round_to)
    dense_widths = view.channel_groups()
    assert all((k % round_to == 0 or k == dense_widths[n] < round_to) and 0 < k <= dense_widths[n]
               for n, k in kept.items())
    assert sum(k < dense_widths[n] for n, k in kept.items()) >= 10  # most groups really cut
    pruned = prune(model, plan).model
    assert pruned.features[2].conv[0][0].out_channels == kept["features.2.conv.0.0"]
    assert view.cost(kept) == measured(pruned)


def test_kept_width_rounding():
    assert [kept_width(64, 0.3, r) for r in (1, 4, 8, 16)] == [45, 44, 48, 48]
    assert kept_width(20, 0.9, 8) == 8  # never to 0
    assert kept_width(6, 0.5, 8) == 6  # never above the dense width
    assert kept_width(10, 1.0) == 1 and kept_width(10, 0.0, 16) == 10
    assert kept_width(10, 0.5, 3) == 6
    with pytest.raises(AutopruneError, match=r"^round_to must be an integer in \[1, 64\] \(1: the lab's rounding\), got 0$"):
        kept_width(10, 0.5, 0)


def test_rebuild_from_arch_is_built_on_meta_then_loaded(tmp_path):
    model = dense("user")
    pruned = prune(model, plan_for(model, "channel", {"block.conv1": 0.75})).model
    arch = pruned.autoprune_arch
    assert arch == {"source": USER_SOURCE, "kwargs": {"width": 8}, "num_classes": 10, "input_size": [3, 32, 32],
                    "widths": {"stem.0": 8, "block.conv1": 2, "side": 8, "down": 16}}
    skeleton = from_arch(arch, USER_SOURCE, device="meta")
    assert skeleton.block.conv1.weight.is_meta and skeleton.block.conv1.out_channels == 2
    bad = {**arch, "widths": {"block.conv1": 9}}
    with pytest.raises(AutopruneError, match=r"^group 'block.conv1' has 8 channels; its kept width must be an "
                                             r"integer in \[1, 8\], got 9$"):
        from_arch(bad, USER_SOURCE)


# --- errors: one line, naming the fix ----------------------------------------------------------


@pytest.mark.parametrize("source, message", [
    ("resnet18", "unknown model source 'resnet18'; use vgg, torchvision:NAME, cifar:resnet20 or "
                  "module:package.module:factory"),
    ("torchvision:resnet_19", "unknown torchvision model 'resnet_19'; use a classifier such as resnet18, "
                              "resnet50, mobilenet_v2, mobilenet_v3_small or efficientnet_b0"),
    ("module:no_such_pkg.nets:f", "cannot import 'no_such_pkg.nets' for model source module:no_such_pkg.nets:f "
                                  "(No module named 'no_such_pkg'); check the name and that its folder is on "
                                  "PYTHONPATH"),
    (f"module:{__name__}:no_factory", f"module '{__name__}' has no factory 'no_factory'; name a function or class "
                                      "in it that returns an nn.Module"),
    ("module:json", "model source module:json must be module:package.module:factory (e.g. "
                    "module:mymodels.nets:small_resnet)"),
])
def test_bad_sources_name_the_fix(source, message):
    with pytest.raises(AutopruneError) as exc:
        build_model(source, 10)
    assert str(exc.value) == message


def test_channel_shuffle_is_refused_with_the_fix():
    model = build_model(f"module:{__name__}:shuffle_net", None)
    with pytest.raises(AutopruneError) as exc:
        prunable(model).channel_groups()
    assert str(exc.value) == ("Torch-Pruning cannot prune channel group 'c1' of this model: an op it does not track "
                              "(such as a channel shuffle or torch.roll over channels) moves its channels; leave it "
                              "dense: build_model(..., exclude=['c1']) (profile: --exclude c1)")
    model = build_model(f"module:{__name__}:shuffle_net", None, exclude=["c1"])
    assert list(prunable(model).channel_groups()) == ["c2"]
    pruned = prune(model, plan_for(model, "channel", {"c2": 0.5})).model
    assert (pruned.c1.out_channels, pruned.c2.out_channels, pruned.autoprune_arch["exclude"]) == (8, 4, ["c1"])


def test_user_code_is_imported_only_when_named(tmp_path):
    path = save_checkpoint(dense("user"), tmp_path / "user.pt")
    with pytest.raises(AutopruneError) as exc:
        autoprune.load(path)
    assert str(exc.value) == (f"this checkpoint's model comes from user code ({USER_SOURCE}); autoprune imports it "
                              f"only when you name it: autoprune.load(path, source={USER_SOURCE!r})")
    with pytest.raises(AutopruneError, match=r"^checkpoint holds a .* model, not the lab's VGG; load it with "
                                             r"autoprune.load_checkpoint \(or autoprune.load\)$"):
        from autoprune.model import load_checkpoint as load_vgg

        load_vgg(path)


def test_a_checkpoint_of_another_shape_is_refused_in_one_line(tmp_path):
    model = dense("user")
    path = save_checkpoint(model, tmp_path / "user.pt")
    obj = torch.load(path, weights_only=True)
    obj["autoprune"]["arch"]["widths"] = {"block.conv1": 4}
    torch.save(obj, path)
    with pytest.raises(AutopruneError, match=r"^checkpoint key 'block.conv1.weight' has shape \(8, 8, 3, 3\), "
                                             r"model expects \(4, 8, 3, 3\)$"):
        autoprune.load(path, source=USER_SOURCE)


def test_without_torch_pruning_channel_pruning_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    model = build_model(USER_SOURCE, 10)
    with pytest.raises(AutopruneError) as exc:
        prunable(model).channel_groups()
    assert str(exc.value) == "channel pruning needs Torch-Pruning, which is not installed; pip install 'autoprune[pruning]'"
    assert prune(model, random_plan(model, "fine_grained")).masks  # fine-grained needs no graph


# --- the CLI -----------------------------------------------------------------------------------


def test_profile_of_a_cifar_resnet18_equals_torch_pruning(capsys):
    r = run_main(capsys, "profile", "--model", "torchvision:resnet18", "--cifar-stem", "--channel-ratios", "0.5",
                 "--no-latency", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    model = build_model("torchvision:resnet18", 10, cifar_stem=True)
    pruned = prune(model, plan_for(model, "channel", {n: 0.5 for n in prunable(model).channel_groups()})).model
    ops, params = tp.utils.count_ops_and_params(pruned, torch.zeros(1, 3, 32, 32))
    # Torch-Pruning's ops also count BatchNorm, ReLU, pooling and the fc bias; autoprune's MACs are conv + linear
    assert (got["params"], got["macs_torch_pruning"]) == (params, ops) == (2_797_610, 140_196_362)
    view = prunable(model)
    assert view.cost(view.kept({n: 0.5 for n in view.channel_groups()})) == {"params": 2_797_610, "macs": got["macs"]}
    assert got["macs"] == metrics.count_macs(pruned) == 139_299_328 and got["widths"]["layer1.0.conv1"] == 32


@pytest.mark.parametrize("args, words", [
    (["--model", "foo:bar"], ["unknown model source 'foo:bar'"]),
    (["--model", "torchvision:resnet18", "--width", "0.5"], ["--width is for the lab's VGG"]),
    (["--cifar-stem"], ["--cifar-stem, --model-kwargs, --num-classes and --exclude are for --model"]),
    (["--model", "torchvision:resnet18", "--exclude", "layer9"], ["exclude names no layer 'layer9' of this model"]),
    (["--model", "torchvision:resnet18", "--model-kwargs", "[1]"], ["--model-kwargs must be a JSON object"]),
    (["--model", "torchvision:resnet18", "--channel-ratios", "nope=0.5"], ["unknown layer 'nope' for channel pruning"]),
])
def test_profile_bad_model_options(capsys, args, words):
    assert_cli_error(run_main(capsys, "profile", "--no-latency", *args), *words)


# --- budgets, the search space and the sensitivity scan over any model ---------------------------


@pytest.mark.parametrize("metric", ["macs", "params"])
@pytest.mark.parametrize("name", list(MODELS))
def test_a_channel_budget_meets_its_cap_by_the_pruned_models_own_count(name, metric):
    model = dense(name)
    view = view_of(model)
    full, cap = measured(model)[metric], 0.45
    ratios = budget.channel_budget(view.cost_model(), cap, metric)
    pruned = prune(model, plan_for(model, "channel", ratios)).model
    kept = view.kept(ratios)
    assert measured(pruned)[metric] == view.cost(kept)[metric] <= cap * full
    # the largest reachable by the shift: a shift just below it keeps at most one more channel per group
    widths = view.channel_groups()
    assert view.cost({g: min(k + 1, widths[g]) for g, k in kept.items()})[metric] > cap * full


@pytest.mark.parametrize("name", list(MODELS))
def test_a_fine_grained_budget_meets_a_size_cap_exactly(name):
    model = dense(name)
    costs = view_of(model).cost_model()
    assert costs.params == metrics.count_params(model)
    ratios = budget.fine_grained_budget(costs, 0.3, preferences={n: i % 3 / 10 for i, n in enumerate(costs.layers)})
    pruned = prune(model, plan_for(model, "fine_grained", ratios)).model
    # (weights are nonzero; a zero-initialised bias stays zero and dense)
    zeroed = metrics.count_nonzero_params(model) - metrics.count_nonzero_params(pruned)
    assert zeroed == costs.params - math.floor(0.3 * costs.params)


@pytest.mark.parametrize("kind", ["channel", "fine_grained"])
@pytest.mark.parametrize("name", list(MODELS))
def test_a_repaired_search_space_proposal_applies_under_the_caps(name, kind):
    model = dense(name)
    costs = view_of(model).cost_model()
    macs_cap = 0.4 if kind == "channel" else None
    space = SearchSpace.build(kind, costs, max_size_fraction=0.5, max_macs_fraction=macs_cap)
    assert tuple(space.upper) == tuple(KINDS[kind].units(costs))
    rng = random.Random(2)
    ratios, _ = space.repair({n: rng.uniform(0.0, hi) for n, hi in space.upper.items()})
    plan = space.plan(ratios)
    pruned = prune(model, plan).model
    dense_cost = measured(model)
    if kind == "channel":
        assert measured(pruned)["macs"] <= macs_cap * dense_cost["macs"]
        assert measured(pruned)["params"] <= 0.5 * dense_cost["params"]
    else:
        assert metrics.count_nonzero_params(pruned) <= 0.5 * dense_cost["params"]
    assert plan == plan_for(model, kind, plan.ratios, plan.criterion)  # the plan any caller would make


@pytest.mark.parametrize("kind", ["channel", "fine_grained"])
@pytest.mark.parametrize("name", [n for n in MODELS if n != "mobilenet_v2"])  # its groups: the contract test's
def test_a_sensitivity_scan_has_one_curve_per_layer_or_group(name, kind):
    model = dense(name)
    view = view_of(model)
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g),
                  torch.randint(0, 10, (8,), generator=g))
    df = sensitivity.scan(model, split, kind, grid=(0.9,), progress=False)  # one ratio: the layers are the point
    names = list(view.fine_layers() if kind == "fine_grained" else view.channel_groups())
    assert list(sensitivity.curves(df)) == names
    assert all(len(points) == 1 for points in sensitivity.curves(df).values())
    priors = compute_priors(df, df.attrs["dense_accuracy"], view.cost_model(), kind, 0.5, tolerance=100.0)
    assert list(priors.allocation) == names
