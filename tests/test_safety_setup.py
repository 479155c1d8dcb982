"""Study setup, concurrency and interruption: nothing half made, nothing lost.

* A failure while a study is being set up removes it; a study left half made by a
  creator that is gone is set up anew by the next ``autoprune search``.
* Every folder a search writes is checked before any work; ``search --dry-run``
  runs those checks and writes nothing.
* Two searches creating one new SQLite study at once: both finish, N trials in all.
* Ctrl-C mid-trial queues the trial again (with its parameters and warm-start tag).

Tiny studies: width 0.125 on synthetic:600, 1-2 trials of 1-2 fine-tune epochs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autoprune.config import load_config
from autoprune.errors import AutopruneError
from autoprune.search import run_search
from autoprune.storage import open_storage

from conftest import REPO, write_study

pytestmark = pytest.mark.usefixtures("one_thread")


def write_config(root: Path, checkpoint: Path | None, *, name="s", trials=1, epochs=1, out=None, storage=None,
                 artifacts=None, priors=False, **tables) -> Path:
    """A tiny study config; priors (a sensitivity scan, seconds) only where a test needs the prior allocation
    (with priors on, only the prior allocation is enqueued, as trial 0). A process waiting for another's last
    trial polls every 2 s (heartbeat 4 s), not 5."""
    study = {"name": name, "trials": trials, "out_dir": out or root / "reports" / name, "heartbeat_seconds": 4,
             "storage": storage, "artifacts": artifacts}
    model = {"checkpoint": checkpoint, **tables.pop("model", {})}
    return write_study(root / f"{name}.toml", study=study, model=model, finetune={"epochs": epochs},
                       priors={"enabled": priors, "warm_start": []}, **tables)


def tree(root: Path) -> dict:
    """Every path under ``root`` with its size and mtime: a snapshot to compare."""
    return {str(p.relative_to(root)): (p.is_dir(), p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(url))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- 1. a failed setup leaves nothing; a half-made study is set up anew --------------------


def test_failed_publish_removes_the_study_and_the_rerun_succeeds(tmp_path, tiny_checkpoint, monkeypatch):
    import optuna.artifacts

    config = load_config(write_config(tmp_path, tiny_checkpoint, trials=1))
    url = config.storage_url

    def full_disk(**kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(optuna.artifacts, "upload_artifact", full_disk)
    with pytest.raises(AutopruneError, match="setting up study 's' failed: No space left on device; the "
                                             "half-made study was removed"):
        run_search(config, progress=False)
    assert optuna.get_all_study_names(open_storage(url)) == []
    monkeypatch.undo()

    summary = run_search(load_config(config.source), progress=False)
    assert summary["finished_trials"] == 1
    trials = load(url, "s").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE]


def half_made(url: str, name: str, creator: str | None, **trials: list) -> optuna.Study:
    """A study as a creator that died in ``publish`` leaves it: some attributes, no ready mark."""
    study = optuna.create_study(study_name=name, storage=open_storage(url), directions=["minimize", "maximize"])
    if creator is not None:
        study.set_user_attr("created_by", creator)
    study.set_user_attr("config", {"study": {"kind": "fine_grained"}})
    for state in trials.get("states", []):
        study.add_trial(optuna.trial.create_trial(state=state, values=[0.2, 50.0] if state.is_finished() else None))
    return study


def test_study_of_a_dead_creator_is_set_up_anew(tmp_path, tiny_checkpoint):
    config = load_config(write_config(tmp_path, tiny_checkpoint, trials=1))
    url = config.storage_url
    half_made(url, "s", f"{socket.gethostname()}:{dead_pid()}", states=[TrialState.WAITING])
    summary = run_search(config, progress=False)
    assert summary["finished_trials"] == 1
    study = load(url, "s")
    assert study.user_attrs["ready"] and study.user_attrs["created_by"].endswith(f":{os.getpid()}")
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]  # the stale queued trial went too


def test_which_half_made_studies_are_abandoned(tmp_path):
    from autoprune.study import abandoned

    url = f"journal:{tmp_path}/half.log"
    host = socket.gethostname()
    assert abandoned(half_made(url, "none", None)) == "no creator is recorded"
    assert "died while setting it up" in abandoned(half_made(url, "dead", f"{host}:{dead_pid()}",
                                                             states=[TrialState.WAITING]))
    assert abandoned(half_made(url, "alive", f"{host}:{os.getpid()}")) is None
    assert abandoned(half_made(url, "elsewhere", f"not-{host}:1")) is None  # cannot tell: wait for it
    # Something ran in it: never deleted, whoever made it.
    assert abandoned(half_made(url, "ran", None, states=[TrialState.COMPLETE])) is None
    ready = half_made(url, "ready", None)
    ready.set_user_attr("ready", True)
    assert abandoned(ready) is None


def test_half_made_study_with_trials_is_kept(tmp_path, tiny_checkpoint):
    config = load_config(write_config(tmp_path, tiny_checkpoint, trials=1))
    half_made(config.storage_url, "s", f"{socket.gethostname()}:{dead_pid()}", states=[TrialState.COMPLETE])
    with pytest.raises(AutopruneError, match="study 's' is not ready: its creator .* died while setting it up"):
        run_search(config, progress=False)
    assert [t.state for t in load(config.storage_url, "s").get_trials()] == [TrialState.COMPLETE]


# --- 2. folders checked before any work; the dry run -----------------------------------------


@pytest.mark.parametrize("where", ["out_dir", "storage", "artifacts"])
def test_unwritable_folder_is_refused_before_any_work(tmp_path, where):
    """No checkpoint: the dense model would be trained first. The error comes before it."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    bad = blocker / "sub"
    kwargs = {"out_dir": {"out": bad}, "storage": {"storage": f"sqlite:///{bad}/study.db"},
              "artifacts": {"artifacts": str(bad)}}[where]
    path = write_config(tmp_path, None, **kwargs)
    before = tree(tmp_path)
    what = {"out_dir": "study's out_dir", "storage": "storage file's folder", "artifacts": "artifact directory"}
    with pytest.raises(AutopruneError, match=f"cannot write the {what[where]} {bad}: {blocker} is a file, not "
                                             f"a folder; (set|fix) "):
        run_search(load_config(path), progress=False)
    assert tree(tmp_path) == before


def test_unwritable_out_dir_cli_one_line_error(tmp_path, capsys):
    from autoprune.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    path = write_config(tmp_path, None, out=blocker / "out")
    assert main(["search", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"autoprune: error: cannot write the study's out_dir {blocker / 'out'}: "
                                        f"{blocker} is a file, not a folder; set [study] out_dir to a writable folder"]
    assert not (tmp_path / "cache").exists()  # no dense model was trained


def test_dry_run_reports_and_writes_nothing(tmp_path, tiny_checkpoint, capsys):
    from autoprune.cli import main

    server = "postgresql://someone:s3cretpw@127.0.0.1:1/db"  # never contacted by a dry run
    trained = write_config(tmp_path / "a", None, name="trained", trials=5, storage=server)
    given = write_config(tmp_path / "b", tiny_checkpoint, name="given", trials=2)
    # The storage may hold the study already: a joiner on another machine fetches the study's copy.
    joiner = write_config(tmp_path / "c", tmp_path / "no-such.pt", name="joiner", storage=f"journal:{tmp_path}/c.log")
    (tmp_path / "c.log").touch()
    before = tree(tmp_path)
    assert main(["search", str(trained), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "nothing was written" in out and "trained (fine_grained" in out and "5 complete trials" in out
    assert "postgresql://someone:***@127.0.0.1:1/db" in out and "s3cretpw" not in out
    assert f"out dir      {tmp_path / 'a' / 'reports' / 'trained'}" in out
    assert "synthetic:600: 480 train / 120 val / 120 test images" in out
    assert "train a dense vgg width 0.125 for 2 epochs" in out
    assert main(["search", str(given), "--dry-run", "--json"]) == 0
    setup = json.loads(capsys.readouterr().out)
    assert setup["dense"].startswith(f"checkpoint {tiny_checkpoint} (vgg width 0.125")
    assert setup["storage"] == f"sqlite:///{tmp_path / 'b' / 'reports' / 'given' / 'study.db'}"
    assert setup["trials"] == 2 and setup["artifacts"] == str(tmp_path / "b" / "reports" / "given" / "artifacts")
    assert main(["search", str(joiner), "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dense"].startswith(
        f"only the study's copy: checkpoint not found: {tmp_path / 'no-such.pt'}")
    assert tree(tmp_path) == before  # not even the out_dir


@pytest.mark.parametrize("kwargs, fragment", [
    ({"data": {"spec": "npz:/no/such.npz"}}, "data file not found: /no/such.npz"),
    ({"model": {"checkpoint": "/no/such.pt"}}, "checkpoint not found: /no/such.pt"),
    ({"storage": "journal:"}, "storage journal: is not sqlite:///PATH"),
    ({"out": "bad\0name"}, "cannot use the study's out_dir"),
])
def test_dry_run_bad_setup_is_a_library_error(tmp_path, kwargs, fragment):
    from autoprune.prepare import check_setup

    path = write_config(tmp_path, None, **kwargs)
    with pytest.raises(AutopruneError, match=fragment):
        check_setup(load_config(path))


# --- 3. two searches creating one new SQLite study at once -------------------------------------

RACE = """
import os, sys, time
import autoprune.search  # imported (with the study and the runner) before the start signal
from autoprune.cli import main
go = sys.argv[1]
print("ready", flush=True)
while not os.path.exists(go):  # both past their imports: they reach the storage together
    time.sleep(0.005)
sys.exit(main(sys.argv[2:]))
"""


def test_two_searches_create_one_sqlite_study_at_once(tmp_path, tiny_checkpoint):
    path = write_config(tmp_path, tiny_checkpoint, trials=2)
    go = tmp_path / "go"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg-cache"))
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(go), "search", str(path), "--device", "cpu",
                               "--threads", "1", "-q"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", proc.communicate(timeout=60)[1][-3000:]
    go.touch()
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        assert "Traceback" not in err
    study = load(load_config(path).storage_url, "s")
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 2


# --- 4. Ctrl-C mid-trial -----------------------------------------------------------------------


def test_interrupted_enqueued_trial_runs_on_resume(tmp_path, tiny_checkpoint):
    path = write_config(tmp_path, tiny_checkpoint, trials=1, epochs=2, priors=True)
    config = load_config(path)
    url = config.storage_url
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg-cache"))
    proc = subprocess.Popen([sys.executable, "-m", "autoprune", "search", str(path), "--device", "cpu",
                             "--threads", "1", "-q"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            # A test run started in the background (`cmd &` without job control) has
                            # SIGINT ignored, and a child inherits that: give it Ctrl-C back.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    study, caught, deadline = None, False, time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None and not caught:
            time.sleep(0.1)
            try:
                study = study or load(url, "s")
                running = study.get_trials(states=(TrialState.RUNNING,))
            except Exception:  # not created yet
                continue
            # Fine-tuning ("plan" is recorded just before): mid-trial.
            if running and running[0].number == 0 and "plan" in running[0].user_attrs:
                proc.send_signal(signal.SIGINT)
                caught = True
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert caught, f"trial 0 was not caught running: {err[-3000:]}"
    assert proc.returncode == 130, err[-3000:]
    assert "autoprune: interrupted; finished work is kept" in err and "Traceback" not in err

    trials = load(url, "s").get_trials()
    first = trials[0]
    assert first.state == TrialState.FAIL and first.user_attrs["warm_start"] == "prior allocation"
    queued = [t for t in trials if t.state == TrialState.WAITING]
    assert len(queued) == 1 and queued[0].system_attrs["failed_trial"] == 0
    assert queued[0].params == first.params and queued[0].params
    assert queued[0].user_attrs["warm_start"] == "prior allocation" and "worker" not in queued[0].user_attrs

    assert run_search(config, progress=False)["finished_trials"] == 1
    complete = load(url, "s").get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 1 and complete[0].params == first.params
    assert complete[0].system_attrs["failed_trial"] == 0
    assert complete[0].user_attrs["warm_start"] == "prior allocation"
