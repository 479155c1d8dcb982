"""Sensitivity scan (with its cache and CLI) and the priors read off it."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest
import torch

from autoprune.budget import (
    channel_cost_fraction,
    fine_grained_budget,
    fine_size_fraction,
    layer_numels,
    vgg_cost,
)
from autoprune.channel import kept_channels
from autoprune.data import load_data
from autoprune.errors import AutopruneError
from autoprune.model import CONV_NAMES, PRUNABLE_LAYERS, load_checkpoint, vgg_channels
from autoprune.priors import Priors, by_hand_rule, compute_priors
from autoprune.sensitivity import DEFAULT_GRID, curves, parse_grid, scan, scan_cached

from conftest import TINY_DATA, run_cli, run_main

GRID = (0.5, 0.9)
CHANNEL_LAYERS = CONV_NAMES[:-1]


@pytest.fixture(scope="module")
def tiny_data():
    return load_data(TINY_DATA, seed=0)


@pytest.fixture(scope="module")
def scans(tiny_checkpoint, tiny_data, tmp_path_factory):
    """Both kinds scanned once into one output directory: kind -> (df, dense, from_cache, out_dir)."""
    out = tmp_path_factory.mktemp("sens")
    return {kind: (*scan_cached(tiny_checkpoint, tiny_data, kind, GRID, "", out, progress=False), out)
            for kind in ("fine_grained", "channel")}


# --- the scan ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind, layers", [("fine_grained", PRUNABLE_LAYERS), ("channel", CHANNEL_LAYERS)])
def test_scan_has_one_row_per_layer_and_ratio(scans, kind, layers):
    df, dense, from_cache, out = scans[kind]
    assert from_cache is False
    assert list(df.columns) == ["layer", "ratio", "accuracy"]
    assert len(df) == len(layers) * 2
    assert list(df["layer"]) == [n for n in layers for _ in GRID]
    assert list(df["ratio"]) == list(GRID) * len(layers)
    assert df["accuracy"].between(0, 100).all()
    assert df.attrs["dense_accuracy"] == dense and 0 <= dense <= 100
    assert (out / f"sensitivity-{kind}.csv").is_file() and (out / f"sensitivity-{kind}.png").is_file()
    report = pd.read_csv(out / f"sensitivity-{kind}.csv")
    assert list(report.columns) == ["layer", "ratio", "accuracy", "drop", "dense_accuracy"]


@pytest.mark.parametrize("kind", ["fine_grained", "channel"])
def test_second_scan_comes_from_the_cache_with_identical_values(scans, tiny_checkpoint, tiny_data, kind, caplog):
    df, dense, _, out = scans[kind]
    with caplog.at_level(logging.INFO, logger="autoprune"):
        again, dense2, from_cache = scan_cached(tiny_checkpoint, tiny_data, kind, GRID, "", out, progress=False)
    assert from_cache is True
    assert dense2 == dense
    pd.testing.assert_frame_equal(again, df, check_exact=True)
    assert any(r.getMessage().startswith("sensitivity scan: reusing cached scan ") for r in caplog.records)
    assert len(list((out / ".cache").glob("*.csv"))) == 2  # one entry per kind


def test_a_different_criterion_is_a_different_cache_entry(scans, tiny_checkpoint, tiny_data):
    _, _, _, out = scans["channel"]
    df, _, from_cache = scan_cached(tiny_checkpoint, tiny_data, "channel", GRID, "none", out, progress=False)
    assert from_cache is False and len(df) == 14
    _, _, from_cache = scan_cached(tiny_checkpoint, tiny_data, "channel", GRID, "none", out, progress=False)
    assert from_cache is True


def test_scan_matches_pruning_by_hand_and_leaves_the_model_alone(tiny_checkpoint, tiny_data):
    from autoprune.plan import PruningPlan, prune
    from autoprune.train import evaluate

    model, _ = load_checkpoint(tiny_checkpoint)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    df = scan(model, tiny_data.val, "fine", grid=[0.9], progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    by_hand = evaluate(prune(model, PruningPlan("fine_grained", {"conv3": 0.9})).model, tiny_data.val)
    assert df.loc[df["layer"] == "conv3", "accuracy"].item() == by_hand


def test_grid_parsing_and_checks(tiny_checkpoint, tiny_data):
    assert parse_grid("0.9,0.5,0.5") == (0.5, 0.9)
    assert DEFAULT_GRID == (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    with pytest.raises(AutopruneError, match="cannot read grid"):
        parse_grid("0.5,half")
    with pytest.raises(AutopruneError, match="in \\(0, 1\\]"):
        parse_grid("0.5,1.5")
    model, _ = load_checkpoint(tiny_checkpoint)
    with pytest.raises(AutopruneError, match="leaves no channel"):  # conv0 has 8 channels
        scan(model, tiny_data.val, "channel", grid=[1.0], progress=False)


def test_cli_writes_csv_and_png_and_reuses_the_cache(tiny_checkpoint, tmp_path, capsys):
    args = ["sensitivity", "--checkpoint", tiny_checkpoint, "--data", TINY_DATA, "--grid", "0.5,0.9",
            "--out", tmp_path, "--json", "-q"]
    first = run_main(capsys, *args)
    assert first.returncode == 0, first.stderr
    d = json.loads(first.stdout)
    assert set(d) >= {"kind", "dense_accuracy", "from_cache", "csv", "png", "curves"}
    assert d["kind"] == "fine_grained" and d["from_cache"] is False
    assert list(d["curves"]) == list(PRUNABLE_LAYERS)
    assert all([r for r, _ in pts] == [0.5, 0.9] for pts in d["curves"].values())
    assert (tmp_path / "sensitivity-fine_grained.csv").is_file()
    png = tmp_path / "sensitivity-fine_grained.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    second = run_cli(*args[:-1])  # a real process, without -q: the cache message is logged to stderr
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["from_cache"] is True
    assert "reusing cached scan" in second.stderr
    assert json.loads(second.stdout)["curves"] == d["curves"]


def test_cli_bad_grid_is_one_line(tiny_checkpoint, tmp_path):
    out = run_cli("sensitivity", "--checkpoint", tiny_checkpoint, "--data", TINY_DATA, "--grid", "0.5,x",
                  "--out", tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert out.stderr.startswith("autoprune: error: cannot read grid")


# --- priors --------------------------------------------------------------------------------


def fake_scan(drops: dict[str, list[float]], grid=DEFAULT_GRID, dense=90.0) -> pd.DataFrame:
    rows = [{"layer": n, "ratio": r, "accuracy": dense - d} for n, ds in drops.items() for r, d in zip(grid, ds)]
    df = pd.DataFrame(rows)
    df.attrs["dense_accuracy"] = dense
    return df


# drops (points) at 0.4 ... 0.9, shaped like the lab's curves: conv0 fragile, big layers robust
LAB_LIKE = {
    "conv0": [1.0, 1.8, 5.0, 10.0, 20.0, 40.0],
    "conv1": [0.3, 0.6, 1.2, 2.5, 5.0, 12.0],
    "conv2": [0.2, 0.4, 0.8, 1.5, 3.0, 8.0],
    "conv3": [0.1, 0.3, 0.6, 1.2, 2.4, 6.0],
    "conv4": [0.1, 0.2, 0.5, 1.0, 4.0, 30.0],
    "conv5": [0.0, 0.1, 0.2, 0.5, 1.0, 3.0],
    "conv6": [0.0, -0.1, 0.1, 0.3, 0.8, 1.8],
    "conv7": [0.0, 0.0, 0.1, 0.2, 0.4, 1.0],
    "classifier": [0.0, 0.0, 0.0, 0.1, 0.2, 0.4],
}


def test_upper_bounds_are_grid_values_within_tolerance():
    df = fake_scan(LAB_LIKE)
    channels = vgg_channels(1.0)
    p = compute_priors(df, 90.0, channels, "fine_grained", 0.25, tolerance=2.0)
    assert isinstance(p, Priors) and p.tolerance == 2.0
    assert p.upper == {"conv0": 0.5, "conv1": 0.6, "conv2": 0.7, "conv3": 0.7, "conv4": 0.7,
                       "conv5": 0.8, "conv6": 0.9, "conv7": 0.9, "classifier": 0.9}
    for n, u in p.upper.items():
        assert u in DEFAULT_GRID
        assert all(d <= 2.0 for r, d in zip(DEFAULT_GRID, LAB_LIKE[n]) if r <= u)
    assert "prior: conv0 upper 0.50 (drop 1.8 points at 0.5, 5.0 at 0.6)" in p.log
    assert "prior: conv7 upper 0.90 (drop 1.0 points at 0.9, the largest scanned)" in p.log
    assert "greedy" in p.rule and "add up" in p.rule


def test_fine_allocation_meets_the_target_exactly_within_the_bounds():
    df = fake_scan(LAB_LIKE)
    channels = vgg_channels(0.25)
    total = vgg_cost(channels)["params"]
    for target in (0.25, 0.4):
        p = compute_priors(df, 90.0, channels, "fine", target)
        assert p.kind == "fine_grained"
        assert set(p.allocation) == set(PRUNABLE_LAYERS)
        assert fine_size_fraction(channels, p.allocation) == round(target * total) / total
        assert all(0.0 <= p.allocation[n] <= p.upper[n] for n in PRUNABLE_LAYERS)
        # the robust big layers carry the pruning, the fragile first conv little
        assert p.allocation["conv7"] > p.allocation["conv0"]
        assert p.predicted_drop >= 0


def test_greedy_prefers_the_cheaper_of_two_equal_layers():
    drops = {n: [0.0] * 6 for n in PRUNABLE_LAYERS}
    drops["conv5"] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]  # cheap
    drops["conv6"] = [1.0, 1.2, 1.4, 1.6, 1.8, 2.0]  # same size, dearer
    for n in ("conv0", "conv1", "conv2", "conv3", "conv4", "conv7", "classifier"):
        drops[n] = [1.9] * 6  # allowed but expensive
    p = compute_priors(fake_scan(drops), 90.0, vgg_channels(0.25), "fine_grained", 0.6)
    assert p.allocation["conv5"] > p.allocation["conv6"]


def test_channel_allocation_respects_bounds_and_meets_the_target():
    df = fake_scan({n: LAB_LIKE[n] for n in CHANNEL_LAYERS})
    channels = vgg_channels(0.25)
    for metric, target in (("params", 0.3), ("macs", 0.4)):
        p = compute_priors(df, 90.0, channels, "channel", target, metric=metric)
        assert set(p.allocation) == set(CHANNEL_LAYERS)
        assert channel_cost_fraction(channels, p.allocation, metric) <= target
        kept = kept_channels(channels, p.allocation)
        for i, n in enumerate(CHANNEL_LAYERS):  # never fewer channels than the bound keeps
            assert kept[i] >= int(round((1 - p.upper[n]) * channels[i]))


def test_a_step_that_frees_nothing_does_not_stop_a_layer_opening():
    """An 8-channel conv keeps 6 channels at 0.2 and at 0.3: its bound opens past 0.3 to what the target needs
    (it stopped at 0.2 before, and a target every layer's largest ratio reaches was refused)."""
    channels = vgg_channels(0.125)  # conv0 has 8 channels
    grid = [0.2, 0.3, 0.5, 0.7]
    df = fake_scan({n: [1.0, 3.0, 6.0, 9.0] for n in CHANNEL_LAYERS}, grid=grid)
    names = list(CHANNEL_LAYERS)
    reach = channel_cost_fraction(channels, dict.fromkeys(names, 0.7), "macs")
    assert channel_cost_fraction(channels, {**dict.fromkeys(names, 0.7), "conv0": 0.2}, "macs") > reach
    p = compute_priors(df, 90.0, channels, "channel", reach, tolerance=2.0, metric="macs")
    assert p.upper == dict.fromkeys(names, 0.7)


def test_unreachable_bounds_open_the_cheapest_layers_only(caplog):
    # LAB_LIKE at tolerance 2 reaches size 0.2 of a width-0.25 VGG, not 0.12: the big, robust
    # layers open step by step, the fragile conv0 (5 points at 0.6) and conv1 never.
    channels = vgg_channels(0.25)
    tight = compute_priors(fake_scan(LAB_LIKE), 90.0, channels, "fine_grained", 0.2, tolerance=2.0)
    assert not [m for m in tight.log if "->" in m]
    with caplog.at_level(logging.INFO, logger="autoprune"):
        p = compute_priors(fake_scan(LAB_LIKE), 90.0, channels, "fine_grained", 0.12, tolerance=2.0)
    assert p.tolerance == 2.0
    opened = [m for m in p.log if "->" in m]
    assert all(m in [r.getMessage() for r in caplog.records] for m in opened)
    assert [m.split(" (")[0] for m in opened] == [
        "prior: conv5 upper 0.80 -> 0.90", "prior: conv3 upper 0.70 -> 0.80", "prior: conv4 upper 0.70 -> 0.80",
        "prior: conv2 upper 0.70 -> 0.80", "prior: conv3 upper 0.80 -> 0.90", "prior: conv2 upper 0.80 -> 0.90"]
    assert opened[0] == ("prior: conv5 upper 0.80 -> 0.90 (scanned drop 3.0 points): the bounds could not reach "
                         "size 0.12; this step costs the least drop per parameter freed")
    assert p.upper == {**tight.upper, "conv2": 0.9, "conv3": 0.9, "conv4": 0.8, "conv5": 0.9}
    fine_grained_budget(channels, 0.12, upper=p.upper)  # reachable now
    with pytest.raises(AutopruneError):  # and not one step earlier
        fine_grained_budget(channels, 0.12, upper={**p.upper, "conv2": 0.8})


def test_scan_grid_reaches_the_lowest_sampled_size():
    from autoprune.config import PriorsSection

    p = PriorsSection()
    assert p.scan_grid("fine_grained", 0.25) == [0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert p.scan_grid("fine_grained", 0.125) == [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    assert p.scan_grid("fine_grained", 0.05) == [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98]
    assert p.scan_grid("fine_grained", 0.025) == [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99]
    assert p.scan_grid("channel", 0.05) == [0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert PriorsSection(grid=[0.5, 0.9]).scan_grid("fine_grained", 0.01) == [0.5, 0.9]


def test_a_target_beyond_the_grid_is_an_error():
    drops = {n: [0.0] * 6 for n in PRUNABLE_LAYERS}
    with pytest.raises(AutopruneError, match="cannot be reached within the scanned grid"):
        compute_priors(fake_scan(drops), 90.0, vgg_channels(0.25), "fine_grained", 0.05)


def test_scan_of_the_other_kind_is_refused():
    df = fake_scan({n: LAB_LIKE[n] for n in CHANNEL_LAYERS})
    with pytest.raises(AutopruneError, match="no rows for conv7"):
        compute_priors(df, 90.0, vgg_channels(0.25), "fine_grained", 0.25)


def test_by_hand_rule_is_the_labs_reading_scaled_to_the_target():
    df = fake_scan(LAB_LIKE)
    channels = vgg_channels(0.25)
    total = vgg_cost(channels)["params"]
    ratios = by_hand_rule(df, 90.0, channels, "fine_grained", 0.25)
    assert fine_size_fraction(channels, ratios) == round(0.25 * total) / total
    # within a 2-point drop: conv0 0.5, conv1 0.6, conv2-4 0.7, conv5 0.8, the rest 0.9; one shift t
    prefs = {"conv0": 0.5, "conv1": 0.6, "conv2": 0.7, "conv3": 0.7, "conv4": 0.7, "conv5": 0.8,
             "conv6": 0.9, "conv7": 0.9, "classifier": 0.9}
    assert ratios == fine_grained_budget(channels, 0.25, preferences=prefs, upper={n: 0.9 for n in prefs})
    numels = layer_numels(channels)
    shift = ratios["conv7"] - 0.9
    assert abs(ratios["conv0"] - (0.5 + shift)) < 2 / numels["conv0"]
    # Scaled up to a small target, no layer goes past the largest scanned ratio (0.9), and none dies.
    small = by_hand_rule(df, 90.0, channels, "fine_grained", 0.12)
    assert fine_size_fraction(channels, small) == int(0.12 * total) / total
    assert max(small.values()) == 0.9 and min(small.values()) > 0.5


def test_priors_on_the_tiny_scan(scans, tiny_checkpoint):
    model, _ = load_checkpoint(tiny_checkpoint)
    df, dense, _, _ = scans["fine_grained"]
    p = compute_priors(df, dense, model.channels, "fine_grained", 0.25)
    total = vgg_cost(model.channels)["params"]
    assert set(p.upper.values()) <= set(GRID) | {0.0}
    assert fine_size_fraction(model.channels, p.allocation) == round(0.25 * total) / total
    assert curves(df)["conv0"][0][0] == 0.5
