"""Re-scoring the leading trials: a config lucky once is not picked over a steadier one."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.trial import TrialState

from autoprune.config import StudyConfig, load_config
from autoprune.errors import AutopruneError
from autoprune.model import load_checkpoint
from autoprune.objective import finetune
from autoprune.pick import format_pick, pick, pick_result, study_limits, study_scores
from autoprune.plan import PruningPlan, prune
from autoprune.report import write_report
from autoprune.rescore import RECORD_PREFIX, rescore_seed, rescores, t975
from autoprune.search import best_feasible, run_search

from test_search import write_config

pytestmark = pytest.mark.usefixtures("one_thread")


def fake_study(tmp_path, trials, records):
    """A study of fully fine-tuned, feasible trials: (val_accuracy, test_accuracy) each; ``records`` by number."""
    config = StudyConfig()
    config.finetune.epochs = 1
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db", study_name="s",
                                directions=["minimize", "maximize"])
    study.set_user_attr("config", config.to_dict())
    study.set_user_attr("accuracy_floor", 50.0)
    for val, test in trials:
        study.add_trial(optuna.trial.create_trial(
            values=[0.25, val], system_attrs={"constraints": [0.0, 50.0 - val, 0.0]},
            user_attrs={"size_fraction": 0.25, "nonzero_size_mib": 0.1, "val_accuracy": val, "test_accuracy": test,
                        "finetune_epochs_done": 1, "fidelity": "full", "plan": {"conv4": 0.9},
                        "constraint_names": ["size", "accuracy", "fidelity"]}))
    for number, scores in records.items():
        first = trials[number][0]
        mean = sum(scores) / len(scores)
        sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / (len(scores) - 1))
        study.set_user_attr(f"{RECORD_PREFIX}{number}", {"n": len(scores), "mean": mean, "sd": sd, "scores": scores,
                                                         "first": first, "gap": first - mean})
    return study, config


def test_lucky_once_is_not_picked_over_a_steadier_config(tmp_path):
    # Trial 0 was lucky once (70.0, then 64 and 66); trial 1 is steady (69.0, then 67.5 and 68.5);
    # trial 2 was never re-scored: 69.5 minus the mean selection gap (5 + 1) / 2 = 66.5.
    study, config = fake_study(tmp_path, [(70.0, 63.0), (69.0, 68.0), (69.5, 66.0)],
                               {0: [64.0, 66.0], 1: [67.5, 68.5]})
    best, runners = pick(study, config)
    assert best.number == 1
    assert [t.number for t in runners] == [2, 0]
    assert best_feasible(study).number == 1  # the end-of-search summary agrees with pick

    s = study_scores(study)
    assert s[0].estimate == 65.0 and s[0].gap == 5.0 and s[0].rescored == 2
    assert s[1].estimate == 68.0 and s[1].gap == 1.0
    assert s[2].estimate == 66.5 and s[2].rescored == 0 and s[2].half_width is None
    pooled = math.sqrt((2.0 + 0.5) / 2)  # variances 2.0 and 0.5, one degree of freedom each
    assert s[1].half_width == pytest.approx(4.303 * pooled / math.sqrt(2))

    result = pick_result(study, config, best, runners, study_limits(study, config), "accuracy")
    assert result["score"] == {"first": 69.0, "estimate": 68.0, "rescored": 2, "sd": pytest.approx(math.sqrt(0.5)),
                               "ci95": pytest.approx(3.40182, abs=1e-5), "selection_gap": 1.0}
    text = format_pick(result, "size_fraction")
    assert "val 69.00%  test 68.00%  re-scored 68.00% ± 3.40 (2 fine-tunes, selection gap +1.00)" in text


def test_without_records_pick_ranks_by_the_first_score(tmp_path):
    study, config = fake_study(tmp_path, [(70.0, 63.0), (69.0, 68.0)], {})
    assert pick(study, config)[0].number == 0
    assert study_scores(study)[0].estimate == 70.0


def test_t_quantiles():
    assert t975(0) == math.inf
    assert (t975(1), t975(2), t975(5), t975(11), t975(500)) == (12.706, 4.303, 2.571, 2.228, 1.960)
    assert rescore_seed(0, 1) != 0 and rescore_seed(0, 1) != rescore_seed(0, 2)
    assert rescore_seed(2**32 - 1, 1) == 7918  # stays a 32-bit seed


def test_select_keys_are_checked(tmp_path):
    with pytest.raises(AutopruneError, match=r"^\[select\] seeds must be in \[1, 100\], got 0$"):
        load_config(write_config(tmp_path, select={"top_k": None, "seeds": 0}))
    with pytest.raises(AutopruneError, match=r"^\[select\] top_k must be an integer, got 2.5"):
        load_config(write_config(tmp_path, select={"top_k": 2.5}, name="b"))


def test_search_rescores_its_leaders_and_everyone_agrees(tmp_path, dense_cache):
    config = load_config(write_config(tmp_path, select={"top_k": 2, "seeds": 2}, trials=3, cap=0.4))
    summary = run_search(dense_cache(config), progress=False)
    study = optuna.load_study(study_name="tiny", storage=config.storage_url)
    records = rescores(study)
    assert len(records) >= 2  # the two leaders, and any trial that then led on its shrunk first score
    assert summary["rescored_trials"] == sorted(records)
    for number, r in records.items():
        assert r["n"] == 2 and len(r["scores"]) == 2
        assert r["seeds"] == [rescore_seed(0, 1), rescore_seed(0, 2)]
        assert r["mean"] == pytest.approx(sum(r["scores"]) / 2)
        assert r["gap"] == pytest.approx(r["first"] - r["mean"])
    best, _ = pick(study, config)
    assert best.number in records  # the pick is always a re-scored trial
    assert summary["best_feasible"]["trial"] == best.number
    assert summary["best_feasible"]["score"]["estimate"] == records[best.number]["mean"]

    # A record is what it says: the plan fine-tuned from the dense model with that seed scores exactly so.
    trial = study.trials[best.number]
    dense = load_checkpoint(study.user_attrs["checkpoint"])[0].eval()
    data = config.load_data()
    pruned = prune(dense, PruningPlan("fine_grained", {k: v for k, v in trial.user_attrs["plan"].items() if v > 0},
                                      "", tuple(dense.channels)))
    history = finetune(pruned, dense, data, config, records[best.number]["seeds"][1])
    assert history[-1]["val_accuracy"] == records[best.number]["scores"][1]

    # The report shows the re-scored figures; a resumed search re-scores nothing again.
    out = write_report(config.storage_url, "tiny", tmp_path / "report", baseline=False)
    md = (tmp_path / "report" / "report.md").read_text()
    assert f"re-scored {records[best.number]['mean']:.2f}%" in md and "selection gap" in md
    assert out is not None
    run_search(config, progress=False)
    assert rescores(optuna.load_study(study_name="tiny", storage=config.storage_url)) == records
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 3
