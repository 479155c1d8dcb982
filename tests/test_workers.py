"""Many workers on one study: exact trial counts, dead workers retried, bad storage input.

The PostgreSQL tests need a server: ``export AUTOPRUNE_TEST_POSTGRES_URL="$(.ci/postgres.sh start)"``
(``.ci/run`` does this). Without the variable they skip, unless ``CI`` is set: then they fail.
The same tests run on Optuna's journal file storage (one host, no heartbeat).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from conftest import write_study

REPO = Path(__file__).resolve().parents[1]
HEARTBEAT = 2  # seconds; a trial silent for 3x this is failed and retried

ATTRS = ["size_fraction", "nonzero_size_mib", "params", "macs", "macs_fraction", "val_accuracy",
         "val_accuracy_before_finetune", "test_accuracy", "finetune_seconds", "plan", "proposed", "worker",
         "weights_artifact_id"]


@pytest.fixture(params=["postgres", "journal"])
def storage_url(request, tmp_path) -> str:
    if request.param == "postgres":
        return request.getfixturevalue("pg_url")
    return f"journal:{tmp_path}/study.log"


def _password(url: str) -> str | None:
    if url.startswith("journal:"):
        return None
    from sqlalchemy.engine import make_url

    return make_url(url).password


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg-cache"), PYTHONUNBUFFERED="1")
    return env


def make_study(tmp_path, tiny_checkpoint, url, *, trials, epochs=1, remove_checkpoint=True, priors=True):
    """Create (and set up) a study in this process; returns (name, config path).

    With ``remove_checkpoint`` the dense checkpoint file is deleted afterwards, so the
    workers must fetch it from the study's artifact store, as on another machine. With
    ``priors`` its first three trials are the enqueued warm starts.
    """
    from autoprune.config import load_config
    from autoprune.study import connect_storage, create_or_join

    name = f"w-{uuid.uuid4().hex[:10]}"
    ckpt = tmp_path / "dense.pt"
    shutil.copy(tiny_checkpoint, ckpt)
    # Every trial feasible: every trial uploads its weights.
    study = {"name": name, "trials": trials, "out_dir": tmp_path / "out", "storage": url,
             "heartbeat_seconds": HEARTBEAT}
    path = write_study(tmp_path / f"{name}.toml", study=study, model={"checkpoint": ckpt},
                       constraints={"max_accuracy_drop": 90.0}, finetune={"epochs": epochs}, priors={"enabled": priors})
    config = load_config(path)
    storage = connect_storage(url, heartbeat_seconds=HEARTBEAT)
    study, ctx, created = create_or_join(config, storage, url, device="cpu", progress=False)
    assert created and study.user_attrs["ready"]
    if remove_checkpoint:
        ckpt.unlink()
    return name, path


def load(url: str, name: str) -> optuna.Study:
    from autoprune.storage import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(url, heartbeat_seconds=HEARTBEAT))


def worker_cmd(url, name, *extra):
    return [sys.executable, "-m", "autoprune", "worker", "--storage", url, "--study", name, "--device", "cpu",
            "--threads", "1", "-q", *extra]


def spawn(cmd, tmp_path, tag):
    out = open(tmp_path / f"{tag}.log", "w+")
    return subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=_env(tmp_path)), out


def finish(procs, timeout):
    deadline = time.time() + timeout
    outputs = []
    for proc, out in procs:
        try:
            proc.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.seek(0)
        outputs.append(out.read())
        out.close()
    return outputs


def check_exact(study: optuna.Study, total: int) -> list:
    """Exactly ``total`` complete trials, nothing left running or queued, numbers unique, attrs all there."""
    trials = study.get_trials()
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == total, states
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states, states
    numbers = [t.number for t in trials]
    assert len(set(numbers)) == len(numbers), numbers
    # A failed trial is only ever a dead worker's, and it was run again to completion, once.
    for t in trials:
        if t.state == TrialState.FAIL:
            retries = [r for r in trials if r.system_attrs.get("failed_trial") == t.system_attrs.get(
                "failed_trial", t.number) and r.number > t.number]
            assert retries, f"failed trial {t.number} was not retried"
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    origins = [t.system_attrs.get("failed_trial", t.number) for t in complete]
    assert len(set(origins)) == len(origins), "a trial (or its retry) completed twice"
    for t in complete:
        missing = [key for key in ATTRS if key not in t.user_attrs]
        assert not missing, f"trial {t.number} lacks {missing}"
        assert len(t.values) == 2 and t.user_attrs["size_fraction"] <= 0.3 + 1e-9
    return complete


def test_three_workers_finish_exactly_n_trials(tmp_path, tiny_checkpoint, storage_url):
    total = 4  # the 3 enqueued warm starts and one sampled trial
    name, config_path = make_study(tmp_path, tiny_checkpoint, storage_url, trials=total)
    # Two `autoprune worker`s and one `autoprune search` joining the same study, started together.
    procs = [spawn(worker_cmd(storage_url, name), tmp_path, "w1"),
             spawn(worker_cmd(storage_url, name), tmp_path, "w2"),
             spawn([sys.executable, "-m", "autoprune", "search", str(config_path), "--device", "cpu",
                    "--threads", "1", "-q"], tmp_path, "s3")]
    outputs = finish(procs, timeout=180)
    for (proc, _), out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
    study = load(storage_url, name)
    complete = check_exact(study, total)
    if storage_url.startswith("journal:"):  # no heartbeat: nothing may fail a live worker's trial
        assert all(t.state == TrialState.COMPLETE for t in study.get_trials())
    workers = {t.user_attrs["worker"] for t in complete}
    assert len(workers) >= 2, f"one process ran every trial: {workers}"
    secret = _password(storage_url)
    if secret:
        assert not any(secret in out for out in outputs)
    # The weights of a trial run by a worker without the dense checkpoint file come back from the store.
    from optuna.artifacts import download_artifact

    from autoprune.artifacts import study_artifact_store

    target = tmp_path / "weights.pt"
    download_artifact(artifact_store=study_artifact_store(study), file_path=str(target),
                      artifact_id=complete[-1].user_attrs["weights_artifact_id"])
    assert target.stat().st_size > 0


def test_sigkilled_worker_trial_is_retried(tmp_path, tiny_checkpoint, storage_url):
    total = 2  # one each: the survivor finishes its own, then waits for the dead one's to come back
    name, _ = make_study(tmp_path, tiny_checkpoint, storage_url, trials=total, epochs=4, priors=False)
    procs = [spawn([a for a in worker_cmd(storage_url, name) if a != "-q"], tmp_path, f"w{i}") for i in range(2)]
    host = socket.gethostname()
    by_id = {f"{host}:{pair[0].pid}": pair for pair in procs}
    victim, killed_number, killed_at = None, None, None
    deadline = time.time() + 120
    study = load(storage_url, name)
    while time.time() < deadline and victim is None:
        time.sleep(0.2)
        # Both in their trial loop first ("joined study" is logged just before it): a dead worker found
        # by the survivor's start-up check is not what this test is about.
        if not all("joined study" in (tmp_path / f"w{i}.log").read_text() for i in range(2)):
            continue
        for t in study.get_trials(states=(TrialState.RUNNING,)):
            owner = by_id.get(t.user_attrs.get("worker"))
            # Kill it fine-tuning ("plan" is recorded just before): mid-trial, and not in the middle of a
            # write to the journal, whose file lock a killed holder keeps for 30 s.
            if owner is not None and owner[0].poll() is None and "plan" in t.user_attrs:
                owner[0].send_signal(signal.SIGKILL)
                victim, killed_number, killed_at = owner, t.number, time.time()
                break
    assert victim is not None, "no trial was caught running"
    victim[0].wait()
    survivor = [pair for pair in procs if pair[0] is not victim[0]]
    assert len(survivor) == 1
    outputs = finish(survivor, timeout=150)
    assert survivor[0][0].returncode == 0, outputs[0][-3000:]
    study = load(storage_url, name)
    check_exact(study, total)
    killed = study.trials[killed_number]
    assert killed.state == TrialState.FAIL
    retries = [t for t in study.get_trials() if t.system_attrs.get("failed_trial") == killed_number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    # The same proposal, run again (as far as the killed run had drawn it: params are stored one by one).
    assert killed.params.items() <= retries[0].params.items()
    assert retries[0].user_attrs["worker"] != killed.user_attrs.get("worker")
    if not storage_url.startswith("journal:"):
        # Found by its heartbeat, never while its worker lived. Not "a grace period after the kill":
        # on a loaded machine the victim's heartbeat thread may have been late already, and a trial
        # whose heartbeat is stale is rightly failed the moment the survivor looks.
        waited = killed.datetime_complete.timestamp() - killed_at
        assert waited >= -0.5, f"failed {-waited:.1f}s before the kill"


QUOTA_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import optuna
    from autoprune.storage import open_storage
    from autoprune.runner import run_trials
    url, name, total, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    study = optuna.load_study(study_name=name, storage=open_storage(url, heartbeat_seconds=2),
                              sampler=optuna.samplers.RandomSampler())
    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        time.sleep(0.1)
        return x
    print("ready", flush=True)
    while not os.path.exists(go):  # all start together
        time.sleep(0.01)
    print(run_trials(study, objective, total, url), flush=True)
""")


def test_trial_count_is_exact_under_contention(tmp_path, storage_url):
    """Four processes racing on a fast objective: never a trial more than asked, none lost."""
    from autoprune.storage import open_storage

    name, total, go = f"q-{uuid.uuid4().hex[:10]}", 20, tmp_path / "go"
    optuna.create_study(study_name=name, storage=open_storage(storage_url, heartbeat_seconds=2))
    procs = [subprocess.Popen([sys.executable, "-c", QUOTA_SCRIPT, storage_url, name, str(total), str(go)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", proc.communicate(timeout=60)[1][-3000:]
    go.touch()
    ran = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        ran.append(int(out.strip().splitlines()[-1]))
    study = load(storage_url, name)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * total
    assert sum(ran) == total and sum(r > 0 for r in ran) >= 3, ran


def test_creation_race_joins_the_winner(tmp_path, tiny_checkpoint, monkeypatch):
    """`autoprune search` on two machines at once: the loser of create_study joins the winner's study."""
    import autoprune.study as study_module
    from autoprune.config import load_config

    url = f"journal:{tmp_path}/race.log"
    name, path = make_study(tmp_path, tiny_checkpoint, url, trials=2, remove_checkpoint=False)
    real = study_module.find_study
    calls = []

    def not_yet(storage, study_name):  # the study did not exist when this process looked
        calls.append(study_name)
        return None if len(calls) == 1 else real(storage, study_name)

    monkeypatch.setattr(study_module, "find_study", not_yet)
    import autoprune.prepare

    # The loser's own preparation is thrown away when create_study finds the name taken: skip its cost.
    monkeypatch.setattr(autoprune.prepare, "prepare", lambda config, device, progress: (None, {}))
    config = load_config(path)
    storage = study_module.connect_storage(url)
    study, ctx, created = study_module.create_or_join(config, storage, url, device="cpu", progress=False)
    assert not created and study.study_name == name
    assert ctx.space.signature() == study.user_attrs["space_signature"]
    assert len(optuna.get_all_study_names(storage)) == 1


def test_local_recovery_spares_live_workers(tmp_path):
    """Journal storage has no heartbeat: only trials of gone (or reaped-pid-reused) processes are retried."""
    from autoprune.storage import open_storage, recover_dead_local_trials

    url = f"journal:{tmp_path}/local.log"
    study = optuna.create_study(study_name="local", storage=open_storage(url))
    host = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exits, left unreaped
    time.sleep(1.5)
    owners = {"live": live.pid, "dead": dead.pid, "zombie": zombie.pid, "me": os.getpid()}
    numbers = {}
    for tag, pid in owners.items():
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        trial.set_user_attr("worker", f"{host}:{pid}")
        # What a dead run may have recorded before dying: a retry must not inherit it.
        trial.set_user_attr("warm_start", "lamp")
        trial.set_user_attr("weights_artifact_id", "stale")
        trial.set_user_attr("val_accuracy", 99.0)
        study._storage.set_trial_system_attr(trial._trial_id, "constraints", [-1.0])
        numbers[tag] = trial.number
    other_host = study.ask()
    other_host.set_user_attr("worker", f"not-{host}:1")
    try:
        recovered = recover_dead_local_trials(study)
    finally:
        live.kill()
        live.wait()
        zombie.wait()
    assert sorted(recovered) == sorted([numbers["dead"], numbers["zombie"]])
    states = {t.number: t.state for t in study.get_trials()}
    assert states[numbers["live"]] == states[numbers["me"]] == states[other_host.number] == TrialState.RUNNING
    retries = [t for t in study.get_trials(states=(TrialState.WAITING,))]
    assert sorted(t.system_attrs["failed_trial"] for t in retries) == sorted(recovered)
    # A retry keeps its parameters and origin, not the dead worker nor the dead run's results.
    assert all(t.user_attrs == {"warm_start": "lamp"} and t.constraints == {} for t in retries)
    assert all(t.params == study.trials[t.system_attrs["failed_trial"]].params for t in retries)


def test_trial_of_a_worker_killed_inside_its_ask_is_retried_at_once(storage_url):
    """Killed between ask and recording itself (both under the quota lock): the next worker to take
    the lock fails that trial and runs it again, instead of waiting ORPHAN_S (10 minutes)."""
    from autoprune.storage import open_storage
    from autoprune.runner import run_trials

    name = f"o-{uuid.uuid4().hex[:10]}"
    study = optuna.create_study(study_name=name, storage=open_storage(storage_url, heartbeat_seconds=HEARTBEAT),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    with warnings.catch_warnings():  # "heartbeat is supposed to be used with optimize"
        warnings.simplefilter("ignore", UserWarning)
        orphan = study.ask()  # no worker, no heartbeat: as a worker SIGKILLed right after its ask leaves it
    orphan.suggest_float("x", 0, 1)
    ran = run_trials(study, lambda trial: trial.suggest_float("x", 0, 1), 2, storage_url)
    trials = load(storage_url, name).get_trials()
    assert ran == 2 and [t.state for t in trials].count(TrialState.COMPLETE) == 2
    assert trials[orphan.number].state == TrialState.FAIL
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == orphan.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == orphan.params


def test_trial_with_a_stale_heartbeat_is_failed_and_retried_by_the_next_ask(pg_url):
    """A worker elsewhere went silent (its heartbeat older than the grace period): the next ask fails
    its trial and runs it again with its parameters; a trial with a fresh heartbeat is left alone."""
    import sqlalchemy as sa

    from autoprune.storage import open_storage, rdb_storage
    from autoprune.runner import claim_trial

    storage = open_storage(pg_url, heartbeat_seconds=HEARTBEAT)
    study = optuna.create_study(study_name=f"h-{uuid.uuid4().hex[:10]}", storage=storage,
                                sampler=optuna.samplers.RandomSampler(seed=0))
    for n, (worker, age) in enumerate([("elsewhere:1", 3 * HEARTBEAT + 5), ("elsewhere:2", 0)]):
        trial_id = study._storage.create_new_trial(study._study_id, template_trial=optuna.trial.create_trial(
            state=TrialState.RUNNING, params={"x": n / 2}, distributions={"x": FloatDistribution(0, 1)},
            user_attrs={"worker": worker}))
        study._storage.record_heartbeat(trial_id)
        with rdb_storage(storage).engine.begin() as conn:  # as if its worker last beat `age` seconds ago
            conn.execute(sa.text("UPDATE trial_heartbeats SET heartbeat = heartbeat - make_interval(secs => :age) "
                                 "WHERE trial_id = :id"), {"age": age, "id": trial_id})
    retry_id, complete, running = claim_trial(study, 10, local=False, interval=HEARTBEAT, exclusive=True)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING]
    assert (complete, running) == (0, 2) and retry_id == trials[2]._trial_id
    assert trials[2].params == {"x": 0.0} and trials[2].system_attrs["failed_trial"] == 0
    assert trials[2].user_attrs["worker"] != "elsewhere:1"


def test_result_of_a_trial_failed_elsewhere_meanwhile_is_dropped(storage_url):
    """A trial another worker declared dead while it ran (a late heartbeat) is not told; another runs."""
    from autoprune.storage import open_storage
    from autoprune.runner import run_trials

    study = optuna.create_study(study_name=f"d-{uuid.uuid4().hex[:10]}", sampler=optuna.samplers.RandomSampler(0),
                                storage=open_storage(storage_url, heartbeat_seconds=HEARTBEAT))
    told = []

    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        if trial.number == 0:  # what another worker's reclaim does to it meanwhile
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        return x

    assert run_trials(study, objective, 1, storage_url, on_trial=lambda frozen, done: told.append(frozen.number)) == 2
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE] and told == [1]


class _SeenSampler(optuna.samplers.RandomSampler):
    """Records how many complete trials the sampler's view of the study (the one TPE reads) holds."""

    def __init__(self):
        super().__init__(seed=0)
        self.seen = []

    def sample_independent(self, study, trial, name, distribution):
        self.seen.append(len(study._get_trials(deepcopy=False, states=(TrialState.COMPLETE,), use_cache=True)))
        return super().sample_independent(study, trial, name, distribution)


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_the_loop_ask_shows_the_sampler_every_finished_trial(tmp_path, kind, request):
    """The loop's own ask (no read of every unfinished trial) still gives the sampler a fresh view."""
    from autoprune.storage import open_storage
    from autoprune.runner import run_trials

    url = request.getfixturevalue("pg_url") if kind == "postgres" else f"sqlite:///{tmp_path}/s.db"
    sampler = _SeenSampler()
    study = optuna.create_study(study_name=f"s-{uuid.uuid4().hex[:10]}", sampler=sampler,
                                storage=open_storage(url, heartbeat_seconds=HEARTBEAT))
    study.enqueue_trial({"x": 0.5})  # a queued trial runs first, with its parameters
    assert run_trials(study, lambda trial: trial.suggest_float("x", 0, 1), 4, url) == 4
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4 and trials[0].params == {"x": 0.5}
    assert sampler.seen == [1, 2, 3]  # the enqueued trial is not sampled
    assert all(t.user_attrs["worker"] for t in trials)


def test_a_pooled_connection_dropped_while_idle_is_replaced(pg_url, monkeypatch):
    """A worker's pooled connection killed by the server (a restart, a firewall's idle timeout) while
    the worker trains: its next write reconnects instead of failing."""
    import psycopg2
    import sqlalchemy as sa

    import autoprune.storage as storage_module
    from autoprune.storage import open_storage, rdb_storage

    storage = open_storage(pg_url)
    study = optuna.create_study(study_name=f"p-{uuid.uuid4().hex[:10]}", storage=storage)
    with rdb_storage(storage).engine.connect() as conn:  # the pool's one idle connection, afterwards
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
    admin = psycopg2.connect(pg_url)
    try:
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
    finally:
        admin.close()
    monkeypatch.setattr(storage_module, "IDLE_PING_S", 0.0)  # every pooled connection counts as idle now
    study.set_user_attr("after", 1)
    assert study.user_attrs["after"] == 1


def test_database_artifacts_are_compressed_when_that_pays(tmp_path):
    """Sparse weights go into the table compressed and come back byte for byte; random bytes, and
    bodies written before compression, are read as they are."""
    import io

    import sqlalchemy as sa

    from autoprune.artifacts import PACKED, TABLE, DatabaseArtifactStore
    from autoprune.storage import open_storage

    storage = open_storage(f"sqlite:///{tmp_path}/a.db")
    store = DatabaseArtifactStore(storage)
    store.create_table()
    sparse = (b"\0" * 3000 + os.urandom(1000)) * 600  # like a fine-grained trial's weights: mostly zeros
    noise = os.urandom(300_000)
    store.write("sparse", io.BytesIO(sparse))
    store.write("noise", io.BytesIO(noise))
    with sa.create_engine(f"sqlite:///{tmp_path}/a.db").begin() as conn:  # as an older autoprune stored it
        conn.execute(sa.text(f"INSERT INTO {TABLE} (artifact_id, body) VALUES ('old', :body)"), {"body": sparse})
        bodies = dict(conn.execute(sa.text(f"SELECT artifact_id, body FROM {TABLE}")).all())
    assert bodies["sparse"].startswith(PACKED) and len(bodies["sparse"]) < len(sparse) / 2
    assert bytes(bodies["noise"]) == noise
    for artifact_id, body in (("sparse", sparse), ("noise", noise), ("old", sparse)):
        with store.open_reader(artifact_id) as reader:
            assert reader.read() == body


# --- bad input ---------------------------------------------------------------


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "autoprune", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(result, *fragments, secrets=()):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("autoprune: error:"), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    for secret in secrets:
        assert secret not in result.stderr + result.stdout


def test_unreachable_postgres_is_retried_then_named(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    result = run_cli("worker", "--storage", f"postgresql://someone:s3cretpw@127.0.0.1:{port}/db", "--study", "x")
    elapsed = time.monotonic() - start
    assert_one_line_error(result, "127.0.0.1", f"port {port}", "3 tries", secrets=["s3cretpw"])
    assert 2.5 <= elapsed <= 60, elapsed  # waits 1 s then 2 s between the tries, no more


def test_wrong_password(pg_url):
    from sqlalchemy.engine import make_url

    right = make_url(pg_url)
    if not right.password:
        pytest.skip("the test server's URL has no password")
    wrong = right.set(password="wr0ng-pass-xyz").render_as_string(hide_password=False)
    result = run_cli("worker", "--storage", wrong, "--study", "x")
    if result.returncode == 0 or "no study named" in result.stderr:
        pytest.skip("the test server does not check passwords")
    assert_one_line_error(result, "password authentication failed", f"port {right.port}",
                          secrets=["wr0ng-pass-xyz", right.password])
    assert "try 2" not in result.stderr  # a refused login is not retried


def test_missing_study_lists_the_studies_there(pg_url):
    from autoprune.storage import open_storage

    known = f"known-{uuid.uuid4().hex[:8]}"
    optuna.create_study(study_name=known, storage=open_storage(pg_url))
    result = run_cli("worker", "--storage", pg_url, "--study", "no-such-study")
    assert_one_line_error(result, "no study named 'no-such-study'", known, secrets=[_password(pg_url)])


def test_study_whose_creator_died_during_setup(tmp_path):
    from autoprune.storage import open_storage

    url = f"journal:{tmp_path}/half.log"
    study = optuna.create_study(study_name="half", storage=open_storage(url), directions=["minimize", "maximize"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    study.set_user_attr("created_by", f"{socket.gethostname()}:{dead.pid}")
    start = time.monotonic()
    assert_one_line_error(run_cli("worker", "--storage", url, "--study", "half"), "died while setting it up",
                          "delete-study")
    assert time.monotonic() - start < 60  # told at once, not after the wait for a live creator


def test_worker_bad_trials_and_missing_journal(tmp_path):
    assert_one_line_error(run_cli("worker", "--storage", f"journal:{tmp_path}/none.log", "--study", "x"),
                          "not found")
    assert not (tmp_path / "none.log").exists()
    assert_one_line_error(run_cli("worker", "--storage", f"journal:{tmp_path}/none.log", "--study", "x",
                                  "--trials", "0"), "--trials must be >= 1")


# --- the kill storm (benchmarks/coordination_load.py) ---------------------------------


def test_kill_storm_keeps_the_count_exact(tmp_path, pg_url):
    """Workers SIGKILLed in the middle of trials and restarted: exactly N complete, each killed
    trial failed and retried once with its parameters, nothing left RUNNING.

    The benchmark's own run (its stub trials, no torch in the workers), small: 4 workers, 2 killed.
    """
    import importlib.util
    import random

    spec = importlib.util.spec_from_file_location("coordination_load", REPO / "benchmarks" / "coordination_load.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    template = bench.tiny_template(tmp_path)
    result = bench.run_load(pg_url, bench.Server(pg_url), template, tmp_path, workers=4, seconds=0.3,
                            per_worker=4, rng=random.Random(0), kills=2, mid_trial=True, timeout=120,
                            poll_seconds=0.5)
    assert not result["timed_out"] and result["worker_errors"] == {}
    assert result["problems"] == [], result["problems"]
    assert result["complete"] == 16 and result["left_running_or_queued"] == 0
    # Each kill caught a trial mid-run: it failed, and its one retry completed with its parameters.
    assert len(result["kills"]) == 2
    assert result["killed_trials"] == result["retried_once"] == result["killed_workers_unfinished_trials"] == 2
    assert set(result["states"]) == {"COMPLETE", "FAIL"} and result["states"]["FAIL"] == 2
    secret = _password(pg_url)
    if secret:
        assert secret not in json.dumps(result)
    # The critical-section profile claims and tells trials on studies with R running ones.
    claims = bench.profile_claims(pg_url, bench.Server(pg_url), template, running=(0, 2), complete=2, repeats=2)
    assert [c["running"] for c in claims] == [0, 2] and all(c["held_ms"]["median"] is not None for c in claims)
