"""The search-vs-baselines verdict's statistics and bookkeeping, on hand-made tables (no training)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("search_vs_baselines", REPO / "benchmarks" / "search_vs_baselines.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def rule(method, seed, val, test, kind="fine_grained", target=0.1):
    return {"job": {"kind": kind, "target": target, "seed": seed, "method": method}, "seconds": 30.0,
            "rule": {"val_accuracy": val, "test_accuracy": test, "size_fraction": target, "macs_fraction": 1.0,
                     "plan": {}}}


def search(seed, stages, kind="fine_grained", target=0.1, method="search"):
    """stages: {trials: (pick val, pick test, reported gap, first-score pick test)}, the re-scores testing
    0.5 below the pick; its trials: the pick,
    one feasible trial testing 2 points above it and an infeasible one 9 above"""
    def rows(v, t):
        return [{"trial": i, "val_accuracy": v - i, "test_accuracy": t + up, "feasible": ok, "deployable": True}
                for i, up, ok in ((0, 0.0, True), (1, 2.0, True), (2, 9.0, False))]
    return {"job": {"kind": kind, "target": target, "seed": seed, "method": method}, "seconds": 300.0,
            "stages": {str(n): {"trials": n, "trial_seconds": 10.0 * n, "wall_seconds": 12.0 * n, "rows": rows(v, t),
                                "pick": {"trial": 0, "val_accuracy": v, "test_accuracy": t, "rescore_n": 2,
                                         "rescore_mean": v - g, "gap": g, "rescore_test_mean": t - 0.5},
                                "first_score_pick": {"trial": 1, "test_accuracy": f}}
                       for n, (v, t, g, f) in stages.items()}}


def test_paired_mean_and_t_interval_are_exact(bench):
    d = bench.paired([1.0, 2.0, 3.0, 4.0, 5.0, None])  # a missing seed is left out
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4 df) x sd / sqrt(n)
    assert d["n"] == 5 and d["mean"] == 3.0
    assert d["sd"] == pytest.approx(math.sqrt(2.5)) and d["se"] == pytest.approx(math.sqrt(0.5))
    assert (d["lo"], d["hi"]) == (pytest.approx(3.0 - half), pytest.approx(3.0 + half))
    one = bench.paired([2.0])
    assert one["mean"] == 2.0 and math.isnan(one["lo"])  # no interval from one seed


def test_t_quantiles(bench):
    assert [bench.t975(df) for df in (1, 4, 30)] == [12.706, 2.776, 2.042]
    assert bench.t975(40) == pytest.approx(2.021, abs=0.002)
    assert bench.t975(120) == pytest.approx(1.980, abs=0.002)


def test_best_rule_is_chosen_on_validation_not_test(bench):
    rules, _, _ = bench.tables([rule("lamp", 0, 70.0, 60.0), rule("global", 0, 69.0, 68.0),
                                rule("lamp", 1, 65.0, 66.0), rule("global", 1, 66.0, 61.0)])
    best = bench.best_rule(rules).set_index("seed")
    assert best.loc[0, "method"] == "lamp" and best.loc[0, "test_accuracy"] == 60.0  # not global's 68
    assert best.loc[1, "method"] == "global" and best.loc[1, "test_accuracy"] == 61.0


def line(lines, text):
    return next(x for x in lines if text in x["method"])


def test_verdict_pairs_the_pick_with_the_best_rule_per_seed(bench):
    results = [rule("lamp", s, 70.0, t) for s, t in enumerate([60.0, 61.0, 62.0])]
    results += [rule("global", s, 69.0, 90.0) for s in range(3)]  # best on test, never chosen
    # the pick after 12 trials is 1.5, 2, 2.5 points above LAMP; after 10 trials 0, 2, 4
    results += [search(s, {10: (72.0, t10, 1.0, 59.0), 12: (72.0, t12, 1.0, 60.0)})
                for s, (t10, t12) in enumerate([(60.0, 61.5), (63.0, 63.0), (66.0, 64.5)])]
    rules, stages, configs = bench.tables(results)
    lines = bench.verdict(rules, stages, configs)
    best = line(lines, "best rule")
    half = 4.303 * 0.5 / math.sqrt(3)  # t(0.975, 2 df) x sd / sqrt(n)
    assert best["method"] == "best rule, chosen on validation (LAMP x3)"
    assert (best["pick_minus"]["n"], best["pick_minus"]["mean"]) == (3, 2.0)
    assert (best["pick_minus"]["lo"], best["pick_minus"]["hi"]) == (pytest.approx(2 - half), pytest.approx(2 + half))
    assert line(lines, "global")["pick_minus"]["mean"] == pytest.approx(63.0 - 90.0)
    assert line(lines, "after 10 trials")["pick_minus"]["mean"] == 0.0  # +1.5, 0, -1.5
    assert line(lines, "first score")["pick_minus"]["mean"] == pytest.approx(63.0 - 60.0)
    assert line(lines, "the pick after 12")["test_mean"] == 63.0
    assert line(lines, "headroom")["pick_minus"]["mean"] == -2.0  # the best feasible trial on test, not the 9
    goals = bench.goals(lines, bench.selection_gaps(rules, stages), stages, [])
    assert next(g for g in goals if g.get("kind") == "fine_grained")["met"] is True  # +2.0, interval above 0
    assert next(g for g in goals if g["goal"].startswith("anytime"))["met"] is True


def test_goal_needs_the_interval_above_zero_and_two_seeds(bench):
    results = [rule("lamp", s, 70.0, 60.0) for s in range(3)]
    results += [search(s, {12: (72.0, t, 1.0, 60.0)}) for s, t in enumerate([56.0, 66.0, 64.0])]  # mean +2, wide
    rules, stages, configs = bench.tables(results)
    goals = bench.goals(bench.verdict(rules, stages, configs), bench.selection_gaps(rules, stages), stages, [])
    fine = next(g for g in goals if g.get("kind") == "fine_grained")
    assert fine["met"] is False  # mean 2.0 >= 1.0, but the interval reaches below 0
    rules1, stages1, configs1 = bench.tables(results[:1] + results[3:4])
    goals1 = bench.goals(bench.verdict(rules1, stages1, configs1), bench.selection_gaps(rules1, stages1), stages1,
                         [])
    assert next(g for g in goals1 if g.get("kind") == "fine_grained")["met"] is None  # one seed: undecided


def test_selection_gap_against_the_gap_seen_on_test(bench):
    # seed 0: rules' val - test offsets 2 and 4 -> 3; pick first val 72, test 64 -> seen gap 8 - 3 = 5
    results = [rule("lamp", 0, 70.0, 68.0), rule("global", 0, 69.0, 65.0), search(0, {12: (72.0, 64.0, 1.5, 60.0)})]
    rules, stages, _ = bench.tables(results)
    g = bench.selection_gaps(rules, stages).iloc[0]
    assert (g["reported_gap"], g["test_gap"], g["difference"]) == (1.5, 5.0, -3.5)
    assert (g["seed_gap"], g["seed_difference"]) == (0.5, 1.0)  # first test 64 - the re-scores' 63.5


def test_screened_study_is_sized_to_the_shipped_trial_seconds(bench):
    ship = {"trials": 12, "trial_seconds": 360.0}  # 30 s a trial
    assert bench.screen_trials(ship, screen=8, candidate_seconds=1.25) == 9  # 360 / (30 + 10)
    assert bench.screen_trials(ship, screen=8, candidate_seconds=1000.0) == 1


def test_plan_runs_studies_first_and_filters_parts(bench):
    args = SimpleNamespace(fine_targets=[0.10, 0.05], channel_targets=[0.3333], seeds=[0, 1], screen=8,
                           screen_target=0.10, only=[])
    jobs = bench.plan_jobs(args)
    assert [j.method for j in jobs[:8]] == ["search"] * 6 + ["screen"] * 2
    assert all(not j.is_study for j in jobs[8:])
    assert len(jobs) == 6 + 2 + 2 * (2 * len(bench.rules("fine_grained")) + len(bench.rules("channel")))
    args.only = bench.kind_targets("channel")
    assert {(j.kind, j.method) for j in bench.plan_jobs(args)} >= {("channel", "search")}
    assert all(j.kind == "channel" for j in bench.plan_jobs(args))  # no screen without its target
    args.only = bench.kind_targets("fine_grained:0.05")
    assert {j.target for j in bench.plan_jobs(args)} == {0.05}


def test_outputs_from_kept_jobs(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "REPO", tmp_path)
    (tmp_path / "README.md").write_text(f"top\n{bench.MARK_START}\nold\n{bench.MARK_END}\nbottom\n")
    results = [rule(m, s, 70.0 - i, 60.0 + s) for s in range(2) for i, m in enumerate(["lamp", "global"])]
    results += [search(s, {10: (72.0, 61.0, 1.0, 60.0), 12: (72.0, 62.0 + s, 1.0, 60.0)}) for s in range(2)]
    results += [search(s, {9: (71.0, 61.5, 1.0, 60.0)}, method="screen") for s in range(2)]
    dense = {"width": 0.125, "params": 145554, "val_accuracy": 71.4, "test_accuracy": 72.0, "val_images": 1096,
             "test_images": 1017, "finetune_epochs": 2, "command": "python benchmarks/search_vs_baselines.py",
             "machine": "x86_64", "torch": "2", "date": "today"}
    args = SimpleNamespace(seeds=[0, 1], trials=12, anytime=10, max_drop=100.0, screen=8, width=0.125, threads=1,
                           out=tmp_path / "results", no_readme=False)
    table = bench.write_outputs(args, bench.summarize(args, results, dense))
    assert "| fine-grained | size 0.1 | best rule, chosen on validation (LAMP x2) | 2 | 60.50 ± 0.71 | +2.00" in table
    assert "screened - full -1.00" in table
    assert "Jobs run by `python benchmarks/search_vs_baselines.py` (last run started today" in table
    assert table in (tmp_path / "README.md").read_text()
    assert {p.name for p in args.out.iterdir()} == {"search-vs-baselines.json", "search-vs-baselines.md",
                                                     "search-vs-baselines.png", "search-vs-baselines-rows.csv"}


def test_readme_table_is_replaced_between_the_markers_only(bench, tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{bench.MARK_START}\nold table\n{bench.MARK_END}\nbottom\n")
    monkeypatch.setattr(bench, "REPO", tmp_path)
    assert bench.update_readme("| new |\n")
    assert readme.read_text() == f"top\n{bench.MARK_START}\n| new |\n{bench.MARK_END}\nbottom\n"


def test_replace_marked_rewrites_only_between_the_markers(tmp_path):
    from autoprune.files import replace_marked

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- a:start -->\nold\n<!-- a:end -->\nrest\n")
    assert replace_marked(readme, "<!-- a:start -->", "<!-- a:end -->", "new 1\nnew 2\n")
    assert readme.read_text() == "intro\n<!-- a:start -->\nnew 1\nnew 2\n<!-- a:end -->\nrest\n"
    assert not replace_marked(readme, "<!-- b:start -->", "<!-- b:end -->", "x\n")  # no markers: nothing written
    assert readme.read_text() == "intro\n<!-- a:start -->\nnew 1\nnew 2\n<!-- a:end -->\nrest\n"


# --- benchmarks/latency_budget.py: latency-budgeted vs MACs-budgeted picks, paired by seed -------------------


@pytest.fixture(scope="module")
def lb(bench):  # after bench: latency_budget imports search_vs_baselines' statistics
    spec = importlib.util.spec_from_file_location("latency_budget", REPO / "benchmarks" / "latency_budget.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lb_job(seed, arm, cap, val, test, lat, macs, trial=3):
    pick = {"trial": trial, "val_accuracy": val, "test_accuracy": test, "latency_fraction": lat,
            "macs_fraction": macs}
    return {"seed": seed, "arm": arm, "cap": cap, "pick": pick, "load_before": [2.0], "load_after": [3.5]}


def lb_jobs():
    # seed s: A at MACs 0.5 measures L; B within L, test +1, +2, +3 over A
    out = []
    for s, (l, d) in enumerate([(0.70, 1.0), (0.72, 2.0), (0.68, 3.0)]):
        out += [lb_job(s, "macs", 0.5, 60.0, 58.0, l, 0.5), lb_job(s, "latency", l, 60.5, 58.0 + d, l - 0.02, 0.55)]
    return out


def test_latency_budget_pairs_b_minus_a_per_seed(lb):
    s = lb.compare(lb_jobs())
    half = 4.303 * 1.0 / math.sqrt(3)  # t(0.975, 2 df) x sd 1 / sqrt(3)
    t = s["diffs"]["test_accuracy"]
    assert [r["test_accuracy"] for r in s["rows"]] == [1.0, 2.0, 3.0]
    assert (t["n"], t["mean"]) == (3, 2.0)
    assert (t["lo"], t["hi"]) == (pytest.approx(2.0 - half), pytest.approx(2.0 + half))
    assert s["diffs"]["val_accuracy"]["mean"] == 0.5
    assert s["diffs"]["latency_fraction"]["mean"] == pytest.approx(-0.02)
    assert s["diffs"]["macs_fraction"]["mean"] == pytest.approx(0.05)
    assert [r["L"] for r in s["rows"]] == [0.70, 0.72, 0.68]
    assert s["within"] == "3 of 3" and s["goal_met"] is True
    assert s["goal_shown"] is False  # mean +2, but the interval reaches -0.48


def test_latency_budget_goal_fails_over_l_or_below_a(lb):
    jobs = lb_jobs()
    jobs[1]["pick"]["latency_fraction"] = 0.71  # B over A's 0.70
    s = lb.compare(jobs)
    assert s["within"] == "2 of 3" and s["rows"][0]["B_within_L"] is False and s["goal_met"] is False
    worse = [lb_job(s, "macs", 0.5, 60.0, 58.0, 0.7, 0.5) for s in range(2)]
    worse += [lb_job(s, "latency", 0.7, 60.0, 58.0 + d, 0.7, 0.5) for s, d in enumerate([-1.0, 0.5])]
    s = lb.compare(worse)
    assert s["diffs"]["test_accuracy"]["mean"] == -0.25 and s["goal_met"] is False
    one = lb.compare(worse[:1])  # A alone (B not run): no pair, undecided
    assert one["rows"][0]["B"] is None and one["goal_met"] is None and one["diffs"]["test_accuracy"]["n"] == 0


def test_latency_budget_b_without_a_pick_misses_the_goal(lb):
    jobs = lb_jobs()
    jobs[1].update(pick=None, trials=[{"latency_fraction": 0.71, "latency_prediction_error": -0.30},
                                      {"latency_fraction": 0.69, "latency_prediction_error": -0.10}])
    jobs[0]["trials"] = [{"latency_fraction": 0.70, "latency_prediction_error": 0.05}]
    s = lb.compare(jobs)
    assert s["rows"][0]["B_within_L"] is False and s["rows"][0]["B_trials_within_L"] == "1 of 2"
    assert s["within"] == "2 of 3" and s["goal_met"] is False
    assert s["diffs"]["test_accuracy"]["n"] == 2  # the pairs that exist
    assert s["prediction"] == {"macs": {"n": 1, "median": 0.05}, "latency": {"n": 2, "median": -0.2}}
    s["macs"] = 0.5
    md = lb.markdown(s)
    assert "| 0 | B: latency | 0.700 | none | - | - | - | - |" in md
    assert "B's trials measured within L: seed 0 1 of 2." in md
    assert "median over trials: A +5.0% (1 trials), B -20.0% (2 trials)." in md
    assert md.endswith("within A's measured latency): **not met**.\n")


def test_latency_budget_table_is_exact(lb):
    s = lb.compare(lb_jobs()[:2])
    s["macs"] = 0.5
    assert lb.markdown(s) == (
        "| seed | arm | cap | pick | MACs | measured latency | val (picked by) | test |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |\n"
        "| 0 | A: MACs | 0.500 | #3 | 0.500 | 0.700 | 60.00 | 58.00 |\n"
        "| 0 | B: latency | 0.700 | #3 | 0.550 | 0.680 | 60.50 | 59.00 |\n"
        "\n"
        "| B - A (paired over seeds) | mean [95% t interval] |\n"
        "| --- | --- |\n"
        "| test accuracy (points) | +1.00 (n=1, no interval) |\n"
        "| validation accuracy, as picked (points) | +0.50 (n=1, no interval) |\n"
        "| measured latency fraction | -0.020 (n=1, no interval) |\n"
        "| MACs fraction | +0.050 (n=1, no interval) |\n"
        "\n"
        "B's pick measured within L: 1 of 1. Goal (B's pick at least as accurate on test, mean difference >= 0, "
        "within A's measured latency): **met** (the interval does not exclude a loss).\n")
    three = lb.compare(lb_jobs())
    three["macs"] = 0.5
    assert "| test accuracy (points) | +2.00 [-0.48, +4.48] (n=3) |" in lb.markdown(three)


def test_latency_budget_outputs_from_kept_jobs(lb, tmp_path):
    args = SimpleNamespace(out=tmp_path)
    meta = {"command": "python benchmarks/latency_budget.py --trials 8", "macs": 0.5}
    md = lb.write_outputs(args, lb.summarize(args, lb_jobs(), meta))
    assert md.startswith("`python benchmarks/latency_budget.py --trials 8`\n\n| seed |")
    assert "Load average (1 min) around the studies: 2.0 to 3.5 on" in md
    assert {p.name for p in tmp_path.iterdir()} == {"latency-budget.json", "latency-budget.md"}


def test_every_name_a_benchmark_imports_from_autoprune_exists():
    """Benchmarks import lazily inside functions: a name moved to another module fails only mid-run (one did,
    30 minutes into a run). Every ``from autoprune... import name`` in benchmarks/ resolves."""
    import ast
    import importlib

    from conftest import REPO

    missing = []
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "autoprune":
                module = importlib.import_module(node.module)
                for a in node.names:
                    if not hasattr(module, a.name):
                        try:  # a submodule (from autoprune import budget)
                            importlib.import_module(f"{node.module}.{a.name}")
                        except ImportError:
                            missing.append(f"{path.name}:{node.lineno} {node.module}.{a.name}")
    assert missing == []
