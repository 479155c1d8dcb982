"""The search: tiny studies on SQLite and journal storage, resume after SIGKILL, bad input."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autoprune.budget import layer_numels
from autoprune.config import load_config
from autoprune.model import vgg_channels
from autoprune.errors import AutopruneError
from autoprune.pick import named_constraints
from autoprune.search import run_search

from conftest import run_cli, run_main, write_study

REPO = Path(__file__).resolve().parents[1]

ATTRS = ["size_fraction", "nonzero_size_mib", "params", "macs", "macs_fraction", "val_accuracy",
         "val_accuracy_before_finetune", "test_accuracy", "finetune_seconds", "plan", "proposed"]


def write_config(tmp_path: Path, name="tiny", kind="fine_grained", trials=3, seed=0, cap=0.3, storage=None,
                 **tables) -> Path:
    """The tiny study (conftest.TINY_STUDY) as ``tmp_path/NAME.toml``, its out_dir ``tmp_path/reports/NAME``."""
    study = {"name": name, "kind": kind, "trials": trials, "seed": seed, "out_dir": tmp_path / "reports" / name,
             "storage": storage, **tables.pop("study", {})}
    constraints = {"max_size_fraction": cap, "max_accuracy_drop": 30.0, **tables.pop("constraints", {})}
    return write_study(tmp_path / f"{name}.toml", study=study, constraints=constraints, **tables)


def complete_trials(url: str, name: str):
    study = optuna.load_study(study_name=name, storage=url if not url.startswith("journal:") else
                              optuna.storages.JournalStorage(
                                  optuna.storages.journal.JournalFileBackend(url[len("journal:"):])))
    return study, study.get_trials(states=(TrialState.COMPLETE,))


@pytest.mark.parametrize("storage_kind", ["sqlite", "journal"])
def test_tiny_study_counts_constraints_and_attributes(tmp_path, storage_kind, dense_cache):
    url = (f"sqlite:///{tmp_path}/s.db" if storage_kind == "sqlite" else f"journal:{tmp_path}/s.log")
    config = load_config(write_config(tmp_path, trials=3, storage=url))
    summary = run_search(dense_cache(config), progress=False)
    assert summary["finished_trials"] == 3
    study, trials = complete_trials(url, "tiny")
    assert len(trials) == 3
    for t in trials:
        for key in ATTRS:
            assert key in t.user_attrs, key
        assert t.user_attrs["size_fraction"] <= 0.3 + 1e-9
        assert set(named_constraints(t)) >= {"size", "accuracy"}
        assert set(t.user_attrs["plan"]) <= {f"conv{i}" for i in range(8)} | {"classifier"}
    # The prior allocation is the first trial, then the one-shot rules' allocations (warm starts).
    assert [t.user_attrs.get("warm_start") for t in trials] == ["prior allocation", "lamp", "global"]
    upper = study.user_attrs["space_upper"]
    numels = layer_numels(vgg_channels(0.125))
    # A centred space around the start with the best cheap score: its parameters (log kept-fraction
    # deviations) are all 0 there.
    centre = study.user_attrs["space_centre"]
    assert centre in ("prior allocation", "lamp", "global")
    scores = study.user_attrs["centre_scores"]
    assert scores[centre] == max(scores.values())
    for t, rule in zip(trials, ("prior allocation", "lamp", "global")):
        wanted = study.user_attrs["warm_starts"].get(rule) or study.user_attrs["prior_allocation"]
        assert all(wanted[k] <= upper[k] for k in wanted)  # inside the space: never clipped
        assert t.params["budget"] == 1.0  # the whole cap
        if rule == centre:
            assert set(t.params.values()) == {0.0, 1.0}
        # ... and it ran exactly as its rule made it: the same zero count in every layer.
        ran = t.user_attrs["plan"]
        assert {k: round(ran.get(k, 0.0) * numels[k]) for k in wanted} == {
            k: round(v * numels[k]) for k, v in wanted.items()}, rule
    # Every trial ran at its sampled budget, exactly (one weight of rounding).
    for t in trials:
        assert t.user_attrs["size_fraction"] == pytest.approx(0.3 * min(1.0, t.params["budget"]), abs=1e-4)
        assert 0.5 <= t.params["budget"] <= 1.5  # above 1: the cap
    # Running the same command again adds nothing: the study is complete.
    again = run_search(load_config(write_config(tmp_path, trials=3, storage=url)), progress=False)
    assert again["ran_this_session"] == 0 and again["finished_trials"] == 3


def test_channel_study_records_macs_and_latency(tmp_path, dense_cache):
    config = load_config(write_config(tmp_path, name="ch", kind="channel", trials=2, cap=0.6))
    run_search(dense_cache(config), progress=False)
    _, trials = complete_trials(config.storage_url, "ch")
    assert len(trials) == 2
    for t in trials:
        assert t.user_attrs["latency_ms"] > 0
        # [latency] defaults: torch at 1 thread, batch 1, the dense model timed in the same run, predicted too.
        a = t.user_attrs
        assert (a["latency_runtime"], a["latency_threads"], a["latency_batch_size"]) == ("torch", 1, 1)
        assert a["latency_fraction"] == a["latency_ms"] / a["latency_dense_ms"]
        assert a["latency_prediction_error"] == a["latency_predicted_ms"] / a["latency_ms"] - 1
        assert t.user_attrs["macs"] < t.user_attrs["macs"] / t.user_attrs["macs_fraction"] + 1
        assert t.user_attrs["size_fraction"] <= 0.6 + 1e-9
        assert t.user_attrs["channels"][-1] == 64  # the last conv is never cut


def test_same_seed_proposes_same_parameters(tmp_path, dense_cache):
    params = []
    for run in ("a", "b"):
        config = load_config(write_config(tmp_path / run, name="seeded", trials=2, seed=7))
        config.priors.enqueue_allocation = False
        config.priors.warm_start = []  # every trial sampled
        run_search(dense_cache(config), progress=False)
        _, trials = complete_trials(config.storage_url, "seeded")
        params.append([t.params for t in trials])
    assert params[0] == params[1]


def test_sigkill_mid_trial_then_resume(tmp_path, tiny_checkpoint):
    # Fine-tunes of a few epochs: a trial is caught fine-tuning, even on a loaded machine.
    path = write_config(tmp_path, name="killed", trials=2, model={"checkpoint": tiny_checkpoint},
                        constraints={"max_accuracy_drop": 90.0}, finetune={"epochs": 4}, priors={"enabled": False})
    url = load_config(path).storage_url
    proc = subprocess.Popen([sys.executable, "-m", "autoprune", "search", str(path), "-q"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    killed_number = None
    study = None
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
        if study is None:
            try:
                study = optuna.load_study(study_name="killed", storage=url)
            except Exception:
                continue
        done = study.get_trials(states=(TrialState.COMPLETE,))
        running = study.get_trials(states=(TrialState.RUNNING,))
        # Mid-trial: fine-tuning ("plan" is recorded just before), after a trial has finished.
        if done and running and "plan" in running[0].user_attrs:
            killed_number = running[0].number
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert killed_number is not None, "the search finished before it could be killed"
    # The same command again (in this process: the resume is library code) finishes the study.
    assert run_search(load_config(path), progress=False)["ran_this_session"] == 1
    study = optuna.load_study(study_name="killed", storage=url)
    states = {t.number: t.state for t in study.get_trials()}
    assert states[killed_number] == TrialState.FAIL
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2
    retried = [t for t in study.get_trials() if t.system_attrs.get("failed_trial") == killed_number]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) >= 1 and lines[-1].startswith("autoprune: error:"), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def test_unknown_toml_key_names_it_and_valid_keys(tmp_path, capsys):
    path = write_config(tmp_path, finetune2={"x": 1})
    assert_one_line_error(run_main(capsys, "search", path), "unknown table [finetune2]", "finetune")
    path = write_config(tmp_path, finetune={"epoch": 3})
    assert_one_line_error(run_main(capsys, "search", path), "unknown key 'epoch' in [finetune]", "epochs")


@pytest.mark.parametrize("cap,fragment", [
    (1.5, "max_size_fraction must be in (0, 1]"),
    (0, "max_size_fraction must be in (0, 1]"),
])
def test_constraint_out_of_range(tmp_path, capsys, cap, fragment):
    assert_one_line_error(run_main(capsys, "search", write_config(tmp_path, cap=cap)), fragment)


def test_existing_study_with_another_space_is_refused_and_untouched(tmp_path, capsys, dense_cache):
    url = f"sqlite:///{tmp_path}/shared.db"
    run_search(dense_cache(load_config(write_config(tmp_path, name="same", trials=1, storage=url))), progress=False)
    before = Path(f"{tmp_path}/shared.db").read_bytes()
    other = write_config(tmp_path, name="same", kind="channel", trials=1, storage=url, cap=0.6)
    assert_one_line_error(run_main(capsys, "search", other), "already exists with another search space")
    assert Path(f"{tmp_path}/shared.db").read_bytes() == before


def test_storage_that_cannot_be_opened(tmp_path, capsys):
    bad = tmp_path / "not-a-db.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    path = write_config(tmp_path, storage=f"sqlite:///{bad}")
    assert_one_line_error(run_main(capsys, "search", path), "cannot open storage")
    path = write_config(tmp_path, storage="postgresql://user:s3cret@127.0.0.1:1/nodb")
    result = run_cli("search", path)  # a real process: its log lines (the retries) are in stderr too
    assert_one_line_error(result, "cannot open storage", "127.0.0.1")
    assert "s3cret" not in result.stderr + result.stdout


def test_checkpoint_of_another_width(tmp_path, capsys):
    from autoprune.model import build_model, save_checkpoint

    ckpt = save_checkpoint(build_model("vgg", width=0.25), tmp_path / "w025.pt")
    path = write_config(tmp_path, model={"checkpoint": ckpt})
    assert_one_line_error(run_main(capsys, "search", path), "width 0.125")


def test_unknown_warm_start_rule_is_refused(tmp_path):
    path = write_config(tmp_path, kind="channel", priors={"warm_start": ["lamp"]})
    with pytest.raises(AutopruneError, match="warm_start: unknown rule 'lamp' for channel pruning; use some of uniform"):
        load_config(path)


def test_bad_config_values_raise_library_errors(tmp_path):
    with pytest.raises(AutopruneError, match="not found"):
        load_config(tmp_path / "missing.toml")
    path = write_config(tmp_path, kind="weights")
    with pytest.raises(AutopruneError, match="kind must be fine_grained or channel"):
        load_config(path)


def test_demo_config_is_studies_demo_toml():
    from autoprune.demo import demo_config

    shipped = load_config(REPO / "studies" / "demo.toml").to_dict()
    built = demo_config().to_dict()
    shipped.pop("source"), built.pop("source")
    assert shipped == built


@pytest.mark.parametrize("name", ["subset-fine-grained", "subset-channel", "vgg-fine-grained", "vgg-channel"])
def test_shipped_studies_load(name):
    config = load_config(REPO / "studies" / f"{name}.toml")
    assert config.study.name == name
    if name.startswith("subset"):
        assert config.data.spec == "npz:" + str((REPO.parent / "shared/data/cifar10-subset.npz").resolve())
        assert config.constraints.max_accuracy_drop is not None  # a relative floor
    else:
        assert config.constraints.max_size_fraction == 0.25 or config.study.kind == "channel"
        assert config.accuracy_floor(95.0) == 92.5


def test_fidelity_ladder_never_presents_partial_trials_as_fine_tuned(tmp_path, dense_cache):
    fidelity = {"ladder": True, "warmup_trials": 2, "promote_top": 0.3, "full_top": 0.5}
    config = load_config(write_config(tmp_path, name="ladder", trials=8, fidelity=fidelity, finetune={"epochs": 2}))
    run_search(dense_cache(config), progress=False)
    study, trials = complete_trials(config.storage_url, "ladder")
    assert len(trials) == 8
    assert all("val_accuracy_bn_recal" in t.user_attrs for t in trials)  # the cheap score, on every trial
    stages = [t.user_attrs["fidelity"] for t in trials]
    assert set(stages) <= {"bn_recal", "epoch1", "stopped_early", "full"}
    assert stages[:2] == ["full", "full"]  # warm-up trials climb the whole ladder
    partial = [t for t in trials if t.user_attrs["fidelity"] != "full"]
    assert partial, stages  # with promote_top 0.3 some trial must stop below the top
    front = {t.number for t in study.best_trials}
    for t in partial:
        assert named_constraints(t)["fidelity"] == 1.0
        assert t.number not in front
        assert t.user_attrs["finetune_epochs_done"] < 2
        assert "weights_artifact_id" not in t.user_attrs


def test_channel_studies_fall_back_from_the_ladder_to_early_stop(tmp_path, dense_cache):
    fidelity = {"ladder": True, "warmup_trials": 0, "promote_top": 0.01, "full_top": 0.01}
    # Three trials: the third is the first a fine-grained ladder would stop (it needs two earlier scores).
    config = load_config(write_config(tmp_path, name="chl", kind="channel", trials=3, cap=0.6, fidelity=fidelity))
    run_search(dense_cache(config), progress=False)
    _, trials = complete_trials(config.storage_url, "chl")
    assert len(trials) == 3
    # With promote_top 0.01 a fine-grained study would stop nearly every trial at bn_recal.
    assert {t.user_attrs["fidelity"] for t in trials} <= {"full", "stopped_early"}
    assert all("val_accuracy_bn_recal" in t.user_attrs for t in trials)


def screened_study(tmp_path: Path, checkpoint: Path, screen: int | None, trials: int = 3, **kwargs):
    """A tiny study (fine-grained unless ``kind`` says) from one dense checkpoint, every trial sampled
    (no priors, so no warm starts), optionally screened."""
    fidelity = {} if screen is None else {"screen": screen}
    config = load_config(write_config(tmp_path, name="screen", trials=trials, fidelity=fidelity,
                                      model={"checkpoint": checkpoint}, **kwargs))
    config.priors.enabled = False
    run_search(config, progress=False)
    return complete_trials(config.storage_url, "screen")[1]


def test_screen_fine_tunes_the_best_of_m_candidates_on_one_budget(tmp_path, caplog, tiny_checkpoint):
    from autoprune.budget import fine_size_fraction, vgg_cost
    from autoprune.model import vgg_channels

    channels = vgg_channels(0.125)
    total = vgg_cost(channels)["params"]
    with caplog.at_level("INFO", logger="autoprune"):
        trials = screened_study(tmp_path / "a", tiny_checkpoint, screen=4, trials=2)
    assert len(trials) == 2
    for t in trials:
        a = t.user_attrs
        plans, scores = a["screen_plans"], a["screen_scores"]
        assert len(plans) == len(scores) == 4
        assert len({tuple(p.items()) for p in plans}) > 1  # the perturbations moved something
        # Every candidate is repaired onto the proposal's budget: the same nonzero count, exactly.
        target = math.floor(0.3 * min(1.0, t.params["budget"]) * total + 1e-6) / total
        assert [fine_size_fraction(channels, p) for p in plans] == [target] * 4
        assert a["screen_chosen"] == scores.index(max(scores))
        assert plans[a["screen_chosen"]] == {n: round(r, 6) for n, r in a["plan"].items()}  # the plan that ran
        assert a["val_accuracy_bn_recal"] == scores[a["screen_chosen"]]  # the trial's own cheap score
        assert a["size_fraction"] == target
        assert a["screen_seconds"] > 0
    assert sum("screened 4 candidates" in r.getMessage() for r in caplog.records) == 2
    # Determinism: the candidates follow from the study seed and the trial number alone.
    again = screened_study(tmp_path / "b", tiny_checkpoint, screen=4, trials=2)
    for key in ("screen_plans", "screen_scores", "screen_chosen", "plan"):
        assert [t.user_attrs[key] for t in again] == [t.user_attrs[key] for t in trials]


def test_screen_off_runs_the_repaired_proposal_as_before(tmp_path, monkeypatch, tiny_checkpoint):
    from autoprune.objective import Objective

    runs = {screen: screened_study(tmp_path / f"s{screen}", tiny_checkpoint, screen, trials=1) for screen in (0, 1)}
    # Before screening existed: the repaired proposal ran as it was.
    monkeypatch.setattr(Objective, "screen", lambda self, trial, proposed, ratios: ratios)
    runs["before"] = screened_study(tmp_path / "before", tiny_checkpoint, None, trials=1)
    seen = {k: [(t.params, t.user_attrs["plan"], t.values) for t in trials] for k, trials in runs.items()}
    assert seen[0] == seen[1] == seen["before"]
    assert not any(k.startswith("screen") for trials in runs.values() for t in trials for k in t.user_attrs)


def test_channel_trials_are_screened_on_their_budget(tmp_path, tiny_checkpoint):
    from autoprune.budget import channel_cost_fraction
    from autoprune.model import vgg_channels

    (t,) = screened_study(tmp_path, tiny_checkpoint, screen=3, trials=1, kind="channel", cap=0.6)
    a = t.user_attrs
    plans, scores = a["screen_plans"], a["screen_scores"]
    assert len(plans) == len(scores) == 3
    # Channel counts are integers: each candidate is the largest reachable size at or below the budget.
    target = 0.6 * min(1.0, t.params["budget"])
    sizes = [channel_cost_fraction(vgg_channels(0.125), p, "params") for p in plans]
    assert all(target - 0.02 < s <= target for s in sizes), (sizes, target)
    assert a["screen_chosen"] == scores.index(max(scores))
    assert plans[a["screen_chosen"]] == {n: round(r, 6) for n, r in a["plan"].items()}
    assert a["val_accuracy_bn_recal"] == scores[a["screen_chosen"]]


def test_perturb_keeps_bounds_and_follows_its_generator():
    import numpy as np

    from autoprune.model import vgg_channels
    from autoprune.space import SearchSpace

    upper = {f"conv{i}": 0.9 for i in range(8)} | {"classifier": 0.0}  # the classifier is not searched
    space = SearchSpace.build("fine_grained", vgg_channels(0.125), upper, max_size_fraction=0.3)
    ratios = {f"conv{i}": 0.1 * i for i in range(8)}
    a = space.perturb(ratios, np.random.default_rng([0, 5]), 0.25)
    assert a == space.perturb(ratios, np.random.default_rng([0, 5]), 0.25)
    assert a != space.perturb(ratios, np.random.default_rng([0, 6]), 0.25)
    assert a["classifier"] == 0.0 and all(0.0 <= a[n] <= 0.9 for n in a)
    # Relative to the kept fraction: log(kept) moves by spread x a standard normal.
    z = np.random.default_rng([0, 5]).standard_normal(9)
    assert a["conv4"] == pytest.approx(1 - 0.6 * math.exp(0.25 * z[4]))


@pytest.mark.parametrize("extra,message", [
    ("screen = -1", "[fidelity] screen must be >= 0 (0 or 1: off), got -1"),
    ("screen_spread = 0", "[fidelity] screen_spread must be in (0, 2], got 0"),
    ("screen = 4\nbn_recal_batches = 0", "[fidelity] screen scores candidates by BN recalibration: "
                                         "set bn_recal_batches >= 1"),
])
def test_bad_screen_settings_are_refused(tmp_path, extra, message):
    with pytest.raises(AutopruneError) as exc:
        load_config(write_config(tmp_path, fidelity=extra))
    assert str(exc.value) == message


def test_warm_starts_run_as_enqueued_and_sampled_trials_are_screened(tmp_path, dense_cache):
    config = load_config(write_config(tmp_path, name="warm", trials=4, fidelity={"screen": 3}))
    run_search(dense_cache(config), progress=False)
    _, trials = complete_trials(config.storage_url, "warm")
    assert [t.user_attrs.get("warm_start") for t in trials] == ["prior allocation", "lamp", "global", None]
    assert ["screen_plans" in t.user_attrs for t in trials] == [False, False, False, True]
    assert len(trials[3].user_attrs["screen_plans"]) == 3
