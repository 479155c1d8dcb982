"""The search-vs-baselines benchmark's bookkeeping: what it picks and counts from the trial rows."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("search_vs_baselines", REPO / "benchmarks" / "search_vs_baselines.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def rows(method, target, seed, trials):
    return [{"kind": "fine_grained", "method": method, "target": target, "seed": seed, "trial": i,
             "val_accuracy": v, "test_accuracy": t, "size_fraction": s, "macs_fraction": 1.0, "complete": c,
             "channels": None, "plan": "{}"} for i, (v, t, s, c) in enumerate(trials)]


def test_runs_choose_on_validation_and_count_feasible_trials_from_one(bench):
    df = pd.DataFrame(
        rows("tpe_priors", 0.25, 0, [(60.0, 99.0, 0.25, True),   # best test, worst val: never chosen
                                     (72.0, 70.0, 0.20, True),   # best val
                                     (75.0, 75.0, 0.12, False),  # stopped early: not a candidate
                                     (70.5, 69.0, 0.15, True)])
        + rows("uniform", 0.25, 0, [(69.0, 68.0, 0.25, True)])
        + rows("uniform", 0.4, 0, [(70.2, 69.5, 0.4, True)]))
    runs = bench.per_run(df, floor=70.0, budgets=[2, 4, 40]).set_index(["method", "target", "trials"])
    two, four = runs.loc[("tpe_priors", 0.25, 2)], runs.loc[("tpe_priors", 0.25, 4)]
    assert (two["val_accuracy"], two["test_accuracy"], two["cost"]) == (72.0, 70.0, 0.20)
    assert (two["smallest_feasible"], two["first_feasible_trial"]) == (0.20, 2)
    assert (four["smallest_feasible"], four["first_feasible_trial"]) == (0.15, 2)
    assert ("tpe_priors", 0.25, 40) not in runs.index  # the study ran 4 trials, not 40
    assert pd.isna(runs.loc[("uniform", 0.25, 0), "smallest_feasible"])  # 69.0 < floor


def test_smallest_size_at_each_floor_spans_every_config_of_a_method(bench):
    df = pd.DataFrame(
        rows("tpe_priors", 0.25, 0, [(70.5, 0.0, 0.24, True), (69.2, 0.0, 0.13, True), (75.0, 0.0, 0.05, False)])
        + rows("tpe_priors", 0.5, 0, [(70.1, 0.0, 0.18, True)])
        + rows("uniform", 0.25, 0, [(69.0, 0.0, 0.25, True)])
        + rows("uniform", 0.4, 0, [(70.2, 0.0, 0.4, True)]))
    sm = bench.smallest_at_floors(df, dense_val=70.5, drops=[0.5, 1.5, 3.0]).set_index(["method", "drop"])
    assert sm.loc[("tpe_priors", 0.5), "smallest"] == 0.18  # from the other study; 0.05 was not fine-tuned
    assert sm.loc[("tpe_priors", 1.5), "smallest"] == 0.13
    assert sm.loc[("uniform", 0.5), "smallest"] == 0.4
    assert sm.loc[("uniform", 1.5), "smallest"] == 0.25


def test_readme_table_is_replaced_between_the_markers_only(bench, tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{bench.MARK_START}\nold table\n{bench.MARK_END}\nbottom\n")
    monkeypatch.setattr(bench, "REPO", tmp_path)
    assert bench.update_readme("| new |\n")
    assert readme.read_text() == f"top\n{bench.MARK_START}\n| new |\n{bench.MARK_END}\nbottom\n"
