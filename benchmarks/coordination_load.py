"""Coordination load: how far one PostgreSQL study scales, measured with N worker processes and stub trials.

Each worker process runs the real trial loop (``autoprune.runner.run_trials``: the
quota lock around count-and-ask, dead-worker reclaiming, heartbeats, the tell)
around a stub objective that replays one real trial instead of training: it
suggests the real trial's parameters, waits ``T`` seconds (the training), then
writes the real trial's attributes and constraints as ``Objective`` does and
uploads its weights artifact (the real trial's file, every trial feasible: the
worst case) to the study's database artifact store.
The real trial is run first, here, on the tiny CPU setup of the tests (VGG
width 0.125, synthetic data, one fine-tune epoch). The workers import no torch.

Measured per run (N workers, T seconds, N x K trials):

* **coordination**: a worker's time that is not the stub's wait, from the start
  of its first trial to the tell of its last: the gap between a trial's end and
  the next trial's start (lock wait, time holding the lock, the ask), the
  trial's own writes and upload, the tell. The first ask of each worker (all
  start at once, a burst a real cluster spreads over minutes) and process
  start-up are reported apart. Goal: <= 5% with 64 workers and 2-second trials.
* database round trips and bytes sent per trial, counted in each worker's
  driver (psycopg2); WAL bytes and PostgreSQL's CPU seconds per trial, on the server;
* exactly N complete trials, no trial number doubled, nothing left RUNNING.

The **kill storm** SIGKILLs a random quarter of the workers, each in the first
trial it runs after a random moment, and starts a replacement at once; then every killed trial must be
failed and retried exactly once with its parameters.

The **critical-section profile** times ``claim_trial`` (the locked count-and-ask)
in this process on studies holding R running trials (R up to 1024: more workers
than this host can run), and the **artifact profile** uploads the lab's
full-width VGG weights (a fine-grained trial at size 0.25). The **projection**
combines them: for 1, 5 and 30-minute trials, how many workers one study
serves before coordination passes 5% of a worker's time, and what limits it
(the lock, the database server, the artifacts). Its assumptions (a LAN round
trip, the server's cores) are arguments and are written with it.

Results: ``benchmarks/results/coordination_load.json``; README's scaling section
is rewritten between its coordination-load markers (``--no-readme`` skips it).

    python benchmarks/coordination_load.py                  # starts its own PostgreSQL (.ci/postgres.sh)
    python benchmarks/coordination_load.py --storage postgresql://USER:PASS@HOST:5432/DB
    python benchmarks/coordination_load.py --workers 4 --trial-seconds 0.5 --no-storm --no-readme  # a quick look
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autoprune.files import replace_marked  # noqa: E402  (no torch: the workers stay light)

URL_ENV = "AUTOPRUNE_BENCH_URL"  # the storage URL reaches the workers here, never on a command line
HEARTBEAT = 30  # seconds: the studies' default
WEIGHTS_KEY = "weights_artifact_id"

# --- round trips, counted in the driver ------------------------------------------

COUNTS = {"round_trips": 0, "bytes_sent": 0, "commits": 0}


def count_round_trips() -> None:
    """Count every round trip and every byte of SQL this process sends through psycopg2.

    Each statement is one round trip; psycopg2 sends a BEGIN of its own before the first
    statement of a transaction, and a COMMIT or ROLLBACK when one is open. Installed before
    any connection is made (SQLAlchemy's ``do_connect`` hands psycopg2 these classes).
    """
    import psycopg2.extensions as ext
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    def _begins(conn) -> int:
        return int(not conn.autocommit and conn.status == ext.STATUS_READY)

    class Cursor(ext.cursor):
        def execute(self, query, vars=None):
            COUNTS["round_trips"] += 1 + _begins(self.connection)
            try:
                return super().execute(query, vars)
            finally:
                COUNTS["bytes_sent"] += len(self.query or b"")

        def executemany(self, query, vars_list):
            vars_list = list(vars_list)
            COUNTS["round_trips"] += len(vars_list) + _begins(self.connection)
            return super().executemany(query, vars_list)

    class Connection(ext.connection):
        def cursor(self, *args, **kwargs):
            kwargs.setdefault("cursor_factory", Cursor)
            return super().cursor(*args, **kwargs)

        def commit(self):
            open_transaction = int(self.status != ext.STATUS_READY)
            COUNTS["round_trips"] += open_transaction
            COUNTS["commits"] += open_transaction
            return super().commit()

        def rollback(self):
            COUNTS["round_trips"] += int(self.status != ext.STATUS_READY)
            return super().rollback()

    @event.listens_for(Engine, "do_connect")
    def _factory(dialect, conn_rec, cargs, cparams):
        if dialect.driver == "psycopg2":
            cparams["connection_factory"] = Connection


def snapshot() -> dict:
    return {"t": time.time(), "rt": COUNTS["round_trips"], "sent": COUNTS["bytes_sent"], "commits": COUNTS["commits"],
            "cpu": time.process_time()}


# --- a worker process ------------------------------------------------------------


def suggest(trial, distributions: dict) -> None:
    """Suggest each parameter of the template trial, from its distribution, as the search space does."""
    import optuna.distributions as od

    for name, text in distributions.items():
        d = od.json_to_distribution(text)
        if isinstance(d, od.FloatDistribution):
            trial.suggest_float(name, d.low, d.high, log=d.log, step=d.step)
        elif isinstance(d, od.IntDistribution):
            trial.suggest_int(name, d.low, d.high, log=d.log, step=d.step)
        else:
            trial.suggest_categorical(name, d.choices)


EARLY = ("worker", "proposed", "plan", "repaired")  # Objective records these before the fine-tune
DURING = ("val_accuracy_epoch1",)  # and these from the fine-tune's epoch callback


class StubObjective:
    """The real trial's writes around a wait of ``seconds`` instead of the training.

    In ``Objective``'s order and batches: the parameters; the proposal and plan; (the wait);
    the epoch-1 accuracy; the figures with the constraint names; the constraints; the weights
    artifact of a feasible trial and its id. Batches go through ``storage.set_user_attrs``
    where this tree has it (its Objective does), else one attribute at a time, as before it.
    """

    def __init__(self, spec: dict, store, events):
        from autoprune import storage
        from autoprune.storage import worker_id

        self.spec, self.store, self.events, self.me = spec, store, events, worker_id()
        self.batch = getattr(storage, "set_user_attrs", None)
        self.pending: dict = {}
        self.last = None

    def timings(self, name: str, seconds: float) -> None:
        self.pending[name] = self.pending.get(name, 0.0) + seconds

    def write(self, trial, attrs: dict) -> None:
        if self.batch is not None:
            self.batch(trial, attrs)
        else:
            for key, value in attrs.items():
                trial.set_user_attr(key, value)

    def __call__(self, trial):
        from optuna.artifacts import upload_artifact

        spec = self.spec
        attrs = {k: (self.me if k == "worker" else v) for k, v in spec["user_attrs"].items()}
        early = {k: attrs.pop(k) for k in EARLY if k in attrs}
        during = {k: attrs.pop(k) for k in DURING if k in attrs}
        weights = attrs.pop(WEIGHTS_KEY, None)
        start = snapshot()
        suggest(trial, spec["distributions"])
        suggested = time.time()
        self.events.write(json.dumps({"ev": "start", "number": trial.number, "t": suggested}) + "\n")
        self.write(trial, early)
        slept = time.monotonic()
        time.sleep(spec["seconds"])
        slept = time.monotonic() - slept
        woke = snapshot()
        for key, value in during.items():
            trial.set_user_attr(key, value)
        self.write(trial, attrs)
        trial.storage.set_trial_system_attr(trial._trial_id, "constraints", spec["constraints"])
        if weights is not None:
            t0 = time.time()
            artifact_id = upload_artifact(artifact_store=self.store, file_path=spec["weights_file"],
                                          study_or_trial=trial)
            self.pending["upload"] = time.time() - t0
            trial.set_user_attr(WEIGHTS_KEY, artifact_id)
        end = snapshot()
        self.events.write(json.dumps({"ev": "end", "number": trial.number, "t": end["t"]}) + "\n")
        self.last = {"ev": "trial", "number": trial.number, "start": start, "suggested": suggested,
                     "woke": woke, "end": end, "slept": slept, **self.pending}
        self.pending = {}
        values = spec["values"]
        return values[0] if len(values) == 1 else tuple(values)

    def told(self, frozen, done) -> None:
        """run_trials' on_trial: the trial is told (complete)."""
        if self.last is not None:
            self.last["told"] = snapshot()
            self.events.write(json.dumps(self.last) + "\n")
            self.events.flush()
            self.last = None


def worker_main(spec_path: str, index: int) -> None:
    spawned = float(os.environ.get("AUTOPRUNE_BENCH_SPAWNED", time.time()))
    spec = json.loads(Path(spec_path).read_text())
    count_round_trips()
    import optuna

    from autoprune.artifacts import open_store
    from autoprune.storage import open_storage, worker_id
    from autoprune.runner import run_trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = os.environ[URL_ENV]
    storage = open_storage(url, heartbeat_seconds=spec["heartbeat"], create=False)
    study = optuna.load_study(study_name=spec["study"], storage=storage,
                              sampler=optuna.samplers.RandomSampler(seed=os.getpid()))
    store = open_store({"kind": "db"}, storage)
    events = open(Path(spec["events"]) / f"w{index:03d}-{os.getpid()}.jsonl", "a", buffering=1)
    events.write(json.dumps({"ev": "ready", "worker": worker_id(), "spawned": spawned, **snapshot()}) + "\n")
    go = Path(spec["go"])
    while not go.exists():  # all workers start their loops together
        time.sleep(0.01)
    stub = StubObjective(spec, store, events)
    events.write(json.dumps({"ev": "loop", **snapshot()}) + "\n")
    ran = run_trials(study, stub, spec["total"], url, on_trial=stub.told, timings=stub.timings,
                     poll_seconds=spec.get("poll_seconds"))
    events.write(json.dumps({"ev": "done", "ran": ran, **snapshot()}) + "\n")
    events.close()


# --- the server ------------------------------------------------------------------


class Server:
    """The PostgreSQL server: WAL position and, when it runs on this host, its CPU seconds."""

    def __init__(self, url: str):
        self.url = url.replace("postgresql+psycopg2://", "postgresql://")
        self.pid = None
        try:
            with self.connect() as conn, conn.cursor() as cur:
                cur.execute("SHOW data_directory")
                pidfile = Path(cur.fetchone()[0]) / "postmaster.pid"
                self.pid = int(pidfile.read_text().split()[0])
        except Exception:  # not superuser, or not on this host: no CPU figures
            self.pid = None
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT version(), current_setting('fsync'), current_setting('max_connections'), "
                        "current_setting('shared_buffers'), current_setting('synchronous_commit')")
            version, fsync, maxconn, shared, sync = cur.fetchone()
        self.info = {"version": version.split(" on ")[0], "fsync": fsync, "synchronous_commit": sync,
                     "max_connections": int(maxconn), "shared_buffers": shared,
                     "on_this_host": self.pid is not None}

    def connect(self):
        import psycopg2

        conn = psycopg2.connect(self.url)
        conn.autocommit = True
        return conn

    def cpu(self) -> float | None:
        """CPU seconds of the postmaster, its exited backends and its live ones."""
        if self.pid is None:
            return None
        tick = os.sysconf("SC_CLK_TCK")

        def fields(pid):
            text = Path(f"/proc/{pid}/stat").read_text()
            return text[text.rindex(")") + 2:].split()

        try:
            f = fields(self.pid)
            total = sum(int(x) for x in f[11:15])  # utime, stime, cutime, cstime
        except OSError:
            return None
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    f = fields(entry.name)
                except (OSError, ValueError):
                    continue
                if f[1] == str(self.pid):
                    total += int(f[11]) + int(f[12])
        return total / tick

    def wal(self) -> int:
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')")
            return int(cur.fetchone()[0])

    def stats(self) -> dict:
        return {"t": time.time(), "cpu": self.cpu(), "wal": self.wal()}


def start_postgres(workdir: Path) -> tuple[str, dict]:
    """A throwaway cluster, started as .ci/run starts it; returns (URL, environment to stop it)."""
    env = dict(os.environ, AUTOPRUNE_PG_STATE=str(workdir / "pg.state"), AUTOPRUNE_PG_MAX_CONNECTIONS="400")
    out = subprocess.run([str(REPO / ".ci/postgres.sh"), "start"], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f".ci/postgres.sh start failed: {out.stderr[-2000:]}")
    return out.stdout.strip(), env


def stop_postgres(env: dict) -> None:
    subprocess.run([str(REPO / ".ci/postgres.sh"), "stop"], env=env, capture_output=True, text=True)


# --- the template trial ----------------------------------------------------------

TEMPLATE_TOML = """
[study]
name = "coordination-template"
kind = "fine_grained"
trials = 1
seed = 0
out_dir = "{out}"
storage = "sqlite:///{out}/template.db"

[model]
width = 0.125
train_epochs = 1

[data]
spec = "synthetic:600"

[constraints]
max_size_fraction = 0.25
max_accuracy_drop = 100.0  # feasible: the trial uploads its weights, as a feasible trial does

[finetune]
epochs = 1
batch_size = 128

[priors]
enabled = false
"""


def template_trial(workdir: Path) -> dict:
    """One real trial (the real Objective, tiny CPU setup): what the stub replays."""
    import optuna
    import optuna.distributions as od
    import torch
    from optuna.artifacts import FileSystemArtifactStore

    from autoprune.config import load_config
    from autoprune.objective import Objective
    from autoprune.prepare import prepare

    torch.set_num_threads(1)
    out = workdir / "template"
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.toml").write_text(TEMPLATE_TOML.format(out=out))
    config = load_config(out / "study.toml")
    ctx, _ = prepare(config, "cpu", False)
    ctx.artifact_store = FileSystemArtifactStore(str(out / "artifacts"))
    (out / "artifacts").mkdir(exist_ok=True)
    study = optuna.create_study(directions=["minimize", "maximize"])
    trial = study.ask()
    values = Objective(ctx)(trial)
    study.tell(trial, values)
    frozen = study.trials[0]
    weights = out / "artifacts" / frozen.user_attrs[WEIGHTS_KEY]
    return {"directions": [d.name.lower() for d in study.directions], "values": list(values),
            "distributions": {n: od.distribution_to_json(d) for n, d in frozen.distributions.items()},
            "user_attrs": dict(frozen.user_attrs), "constraints": frozen.system_attrs["constraints"],
            "weights_file": str(weights), "weights_bytes": weights.stat().st_size,
            "attr_json_bytes": len(json.dumps(frozen.user_attrs))}


def tiny_template(workdir: Path, params: int = 4, weights_bytes: int = 64 * 1024) -> dict:
    """A stand-in for the real trial, without torch (the kill-storm test's): a few parameters and
    attributes, small weights."""
    import optuna.distributions as od

    path = workdir / "tiny-weights.bin"
    path.write_bytes(os.urandom(weights_bytes))
    attrs = {"worker": "", "plan": {f"p{i}": 0.5 for i in range(params)}, "val_accuracy": 50.0,
             "constraint_names": ["size", "accuracy"], WEIGHTS_KEY: ""}
    return {"directions": ["minimize", "maximize"], "values": [0.2, 50.0],
            "distributions": {f"p{i}": od.distribution_to_json(od.FloatDistribution(0.0, 0.9))
                              for i in range(params)},
            "user_attrs": attrs, "constraints": [-0.1, -1.0], "weights_file": str(path),
            "weights_bytes": weights_bytes, "attr_json_bytes": len(json.dumps(attrs))}


def full_width_weights(path: Path) -> int:
    """The lab's full-width VGG as a fine-grained trial at size 0.25 saves it (what a GPU trial uploads)."""
    import torch

    from autoprune.model import build_model
    from autoprune.plan import PruningPlan, prune
    from autoprune.plan import layers_for

    torch.manual_seed(0)
    model = build_model("vgg", width=1.0)
    plan = PruningPlan("fine_grained", {n: 0.75 for n in layers_for("fine_grained")}, "", tuple(model.channels))
    pruned = prune(model, plan).model
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in pruned.state_dict().items()},
                "autoprune": {"arch": pruned.arch(), "plan": plan.to_dict(), "trial": 0}}, path)
    return path.stat().st_size


# --- one load run ----------------------------------------------------------------


def spawn_worker(spec_path: Path, index: int, url: str, logdir: Path) -> subprocess.Popen:
    env = dict(os.environ, **{URL_ENV: url, "AUTOPRUNE_BENCH_SPAWNED": repr(time.time()),
                              "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
    log = open(logdir / f"w{index:03d}.log", "ab")
    # Its own session, as a worker started from its own shell or machine (see workers_scaling.py).
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path), str(index)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def run_load(url: str, server: Server, template: dict, workdir: Path, workers: int, seconds: float,
             per_worker: int, rng: random.Random, kills: int = 0, mid_trial: bool = False,
             timeout: float | None = None, poll_seconds: float | None = None) -> dict:
    """N workers on a fresh study of N x per_worker trials, ``kills`` of them SIGKILLed and restarted.

    Each victim is killed at a random moment of the run (with ``mid_trial``, at the first moment
    after it that finds the victim inside a trial) and a replacement is started at once.
    """
    import optuna

    from autoprune.artifacts import open_store
    from autoprune.storage import open_storage

    storm = kills > 0
    tag = f"coord-{workers}w-{seconds:g}s{'-storm' if storm else ''}-{uuid.uuid4().hex[:6]}"
    rundir = workdir / tag
    (rundir / "events").mkdir(parents=True)
    total = workers * per_worker
    storage = open_storage(url, heartbeat_seconds=HEARTBEAT)
    optuna.create_study(study_name=tag, storage=storage, directions=template["directions"])
    open_store({"kind": "db"}, storage, create=True)
    spec = {"study": tag, "total": total, "seconds": seconds, "heartbeat": HEARTBEAT,
            "events": str(rundir / "events"), "go": str(rundir / "go"),
            **{k: template[k] for k in ("distributions", "user_attrs", "constraints", "values")},
            "weights_file": template["weights_file"], "poll_seconds": poll_seconds}
    spec_path = rundir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    procs = {i: spawn_worker(spec_path, i, url, rundir) for i in range(workers)}
    deadline = time.time() + 120 + 3 * workers
    while time.time() < deadline:
        ready = sum(1 for p in (rundir / "events").glob("*.jsonl") if '"ready"' in p.read_text())
        dead = [i for i, p in procs.items() if p.poll() is not None]
        if dead:
            raise SystemExit(f"worker {dead[0]} exited during start-up: {tail(rundir / f'w{dead[0]:03d}.log')}")
        if ready == workers:
            break
        time.sleep(0.2)
    else:
        raise SystemExit(f"{workers} workers were not ready after the start-up timeout")
    before = server.stats()
    (rundir / "go").touch()
    go = time.time()
    expected = total * seconds / workers
    killed = []
    plan = sorted((go + rng.uniform(0.05, 0.8) * expected, v) for v in rng.sample(range(workers), kills))
    timeout = timeout or max(300.0, 10 * expected)
    next_index = workers
    while any(p.poll() is None for p in procs.values()):
        now = time.time()
        if now - go > timeout:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
            break
        if plan and now >= plan[0][0] and (not mid_trial or in_trial(rundir / "events", procs[plan[0][1]].pid)):
            _, victim = plan.pop(0)
            proc = procs[victim]
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed.append({"worker": f"{socket.gethostname()}:{proc.pid}", "at": round(time.time() - go, 3)})
                procs[next_index] = spawn_worker(spec_path, next_index, url, rundir)
                next_index += 1
            continue
        time.sleep(0.01)
    after = server.stats()
    timed_out = time.time() - go > timeout
    failed = {i: p.returncode for i, p in procs.items() if p.returncode not in (0, -signal.SIGKILL)}
    study = optuna.load_study(study_name=tag, storage=storage)
    check = verify(study, total, {k["worker"] for k in killed})
    result = {"workers": workers, "trial_seconds": seconds, "trials": total, "storm": storm,
              "timed_out": timed_out, "worker_errors": {i: tail(rundir / f"w{i:03d}.log") for i in failed},
              **check, **measure(rundir / "events", go, before, after, total)}
    if storm:
        result["kills"] = killed
    return result


def in_trial(events_dir: Path, pid: int) -> bool:
    """Whether worker ``pid``'s last event is a trial's start: it is inside its objective, not yet told."""
    for path in events_dir.glob(f"*-{pid}.jsonl"):
        lines = path.read_text().splitlines()
        return bool(lines) and lines[-1].startswith('{"ev": "start"')
    return False


def tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# --- checks ----------------------------------------------------------------------


def verify(study, total: int, killed: set[str]) -> dict:
    """Exactly ``total`` complete, nothing RUNNING or WAITING, no origin completed twice, and each
    failed trial a killed worker's (or one that never recorded its worker), retried exactly once
    with its parameters. Returns the figures and ``problems`` (empty when all hold)."""
    from optuna.trial import TrialState

    trials = study.get_trials()
    states = [t.state for t in trials]
    problems = []
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if len(complete) != total:
        problems.append(f"{len(complete)} complete trials, not {total}")
    left = [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    if left:
        problems.append(f"trials left running or queued: {left}")
    numbers = [t.number for t in trials]
    if len(set(numbers)) != len(numbers):
        problems.append("a trial number is doubled")
    origins = [t.system_attrs.get("failed_trial", t.number) for t in complete]
    if len(set(origins)) != len(origins):
        problems.append("a trial (or its retry) completed twice")
    failed = [t for t in trials if t.state == TrialState.FAIL]
    retried = 0
    for t in failed:
        worker = t.user_attrs.get("worker")
        if worker is not None and worker not in killed:
            problems.append(f"trial {t.number} failed, and its worker {worker} was not killed")
        retries = [r for r in trials if (r.system_attrs.get("retry_history") or [None])[-1] == t.number]
        if len(retries) != 1:
            problems.append(f"failed trial {t.number} has {len(retries)} retries, not 1")
            continue
        if any(retries[0].params.get(k) != v for k, v in t.params.items()):
            problems.append(f"the retry of trial {t.number} runs other parameters")
        retried += 1
    other = [t.number for t in trials if t.state not in (TrialState.COMPLETE, TrialState.FAIL,
                                                         TrialState.RUNNING, TrialState.WAITING)]
    if other:
        problems.append(f"trials in other states: {other}")
    by_killed = [t for t in trials if t.user_attrs.get("worker") in killed and t.state != TrialState.COMPLETE]
    return {"complete": len(complete), "failed": len(failed), "retried_once": retried,
            "killed_trials": len(failed), "killed_workers_unfinished_trials": len(by_killed),
            "left_running_or_queued": len(left), "states": {s.name: states.count(s) for s in set(states)},
            "exact": not problems, "problems": problems}


# --- figures from the workers' events --------------------------------------------


def _q(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _ms(x):
    return None if x is None else round(1000 * x, 2)


def measure(events_dir: Path, go: float, before: dict, after: dict, total: int) -> dict:
    """Coordination per trial and per worker, from the events the workers wrote."""
    windows, work, first_waits, startups, counted = [], [], [], [], 0
    gap, held, wait, in_trial, tell, upload, rt, sent, cpu, rt_claim, commits = ([] for _ in range(11))
    last_told = go
    for path in sorted(events_dir.glob("*.jsonl")):
        events = []
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:  # the last line of a killed worker
                pass
        ready = next((e for e in events if e["ev"] == "ready"), None)
        if ready is not None:
            startups.append(ready["t"] - ready["spawned"])
        trials = [e for e in events if e["ev"] == "trial" and "told" in e]
        if not trials:
            continue
        first_waits.append(trials[0].get("lock_wait", 0.0))
        # The window: from the tell of this worker's first trial to that of its last, so each trial in it
        # holds one ask (the first ask, when every worker asks at once, is reported apart).
        windows.append(trials[-1]["told"]["t"] - trials[0]["told"]["t"])
        work.append(sum(e["slept"] for e in trials[1:]))
        counted += len(trials) - 1
        last_told = max(last_told, trials[-1]["told"]["t"])
        for prev, e in zip(trials, trials[1:]):
            in_trial.append(e["end"]["t"] - e["start"]["t"] - e["slept"])
            tell.append(e["told"]["t"] - e["end"]["t"])
            if "upload" in e:
                upload.append(e["upload"])
            gap.append(e["start"]["t"] - prev["told"]["t"])
            wait.append(e.get("lock_wait", 0.0))
            held.append(e.get("lock_held", 0.0))
            rt.append(e["told"]["rt"] - prev["told"]["rt"])
            sent.append(e["told"]["sent"] - prev["told"]["sent"])
            cpu.append(e["told"]["cpu"] - prev["told"]["cpu"])
            rt_claim.append(e["start"]["rt"] - prev["told"]["rt"])
            if "commits" in e["told"]:
                commits.append(e["told"]["commits"] - prev["told"]["commits"])
    span = last_told - go
    window = sum(windows)
    coordination = window - sum(work)
    server_cpu = (after["cpu"] - before["cpu"]) if after["cpu"] is not None and before["cpu"] is not None else None
    per_trial = {
        "between_trials_ms": {"median": _ms(_q(gap, 0.5)), "p95": _ms(_q(gap, 0.95))},
        "lock_wait_ms": {"median": _ms(_q(wait, 0.5)), "p95": _ms(_q(wait, 0.95)),
                         "mean": _ms(statistics.fmean(wait) if wait else None)},
        "lock_held_ms": {"median": _ms(_q(held, 0.5)), "p95": _ms(_q(held, 0.95)),
                         "mean": _ms(statistics.fmean(held) if held else None)},
        "in_trial_writes_ms": {"median": _ms(_q(in_trial, 0.5)), "p95": _ms(_q(in_trial, 0.95))},
        "upload_ms": {"median": _ms(_q(upload, 0.5)), "p95": _ms(_q(upload, 0.95)),
                      "mean": _ms(statistics.fmean(upload) if upload else None)},
        "tell_ms": {"median": _ms(_q(tell, 0.5)), "p95": _ms(_q(tell, 0.95))},
        "round_trips": {"mean": round(statistics.fmean(rt), 1) if rt else None, "median": _q(rt, 0.5)},
        "round_trips_between_trials": {"mean": round(statistics.fmean(rt_claim), 1) if rt_claim else None},
        "bytes_sent": {"mean": round(statistics.fmean(sent)) if sent else None},
        "commits": {"mean": round(statistics.fmean(commits), 1) if commits else None},
        "worker_cpu_ms": {"mean": _ms(statistics.fmean(cpu) if cpu else None)},
    }
    return {
        "coordination_fraction": round(coordination / window, 4) if window else None,
        "coordination_ms_per_trial": _ms(coordination / counted) if counted else None,
        "per_trial": per_trial,
        "lock_utilisation": round(sum(held) / span, 3) if span > 0 else None,
        # CPU the workers' coordination used per second (the stub's wait uses none): with the server's,
        # against this host's cores, how much of the measured time is waiting for a CPU.
        "workers_cpu_cores_busy": round(sum(cpu) / span, 2) if span > 0 else None,
        "trials_per_second": round(total / span, 2) if span > 0 else None,
        "seconds": round(span, 2),
        "first_ask_wait_ms": {"median": _ms(_q(first_waits, 0.5)), "max": _ms(max(first_waits, default=None))},
        "startup_s": {"median": round(_q(startups, 0.5), 2) if startups else None,
                      "max": round(max(startups), 2) if startups else None},
        "server": {"wal_bytes_per_trial": round((after["wal"] - before["wal"]) / total),
                   "cpu_ms_per_trial": _ms(server_cpu / total) if server_cpu is not None else None,
                   "cpu_cores_busy": round(server_cpu / span, 2) if server_cpu is not None and span > 0 else None},
    }


# --- the critical section at scale, and the artifacts ------------------------------


def profile_claims(url: str, server: Server, template: dict, running=(0, 64, 256, 1024), complete: int = 500,
                   repeats: int = 20) -> list[dict]:
    """``claim_trial`` under the quota lock, uncontended, on studies holding R running trials.

    R running trials stand for R workers (their worker is this live process, their heartbeats
    fresh), beside ``complete`` finished trials with the template's attributes. Each claimed
    trial is told at once (untimed), so R stays R.
    """
    import optuna
    import optuna.distributions as od
    from optuna.trial import TrialState, create_trial

    from autoprune.storage import open_storage, worker_id
    from autoprune.runner import claim_trial, quota_lock

    storage = open_storage(url, heartbeat_seconds=HEARTBEAT)
    dists = {n: od.json_to_distribution(t) for n, t in template["distributions"].items()}
    params = {n: (d.low + d.high) / 2 if hasattr(d, "low") else d.choices[0] for n, d in dists.items()}
    done = create_trial(state=TrialState.COMPLETE, values=template["values"], params=params, distributions=dists,
                        user_attrs={**template["user_attrs"], "worker": "elsewhere:1"},
                        system_attrs={"constraints": template["constraints"]})
    out = []
    for r in running:
        study = optuna.create_study(study_name=f"coord-profile-{r}-{uuid.uuid4().hex[:6]}", storage=storage,
                                    directions=template["directions"], sampler=optuna.samplers.RandomSampler(0))
        for _ in range(complete):
            study.add_trial(done)
        me = worker_id()
        for _ in range(r):
            study.add_trial(create_trial(state=TrialState.RUNNING, params=params, distributions=dists,
                                         user_attrs={"worker": me}))
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study._storage.record_heartbeat(t._trial_id)
        lock = quota_lock(url, study)
        held, rts, cpu, commits = [], [], [], []
        for i in range(repeats + 3):
            rt0, c0, s0 = COUNTS["round_trips"], COUNTS["commits"], server.cpu()
            t0 = time.perf_counter()
            with lock():
                trial_id, _, _ = claim_trial(study, complete + r + 10 * repeats, local=False, interval=HEARTBEAT)
            t1 = time.perf_counter()
            rt1, c1, s1 = COUNTS["round_trips"], COUNTS["commits"], server.cpu()
            study.tell(study._storage.get_trial_number_from_id(trial_id), template["values"])
            if i >= 3:  # the first claims fill this process's trial cache, as a worker's first ask does
                held.append(t1 - t0)
                rts.append(rt1 - rt0)
                commits.append(c1 - c0)
                if s0 is not None and s1 is not None:
                    cpu.append(s1 - s0)
        out.append({"running": r, "complete": complete,
                    "held_ms": {"median": _ms(_q(held, 0.5)), "p95": _ms(_q(held, 0.95))},
                    "round_trips": _q(rts, 0.5), "commits": _q(commits, 0.5),
                    "server_cpu_ms": _ms(statistics.fmean(cpu)) if cpu else None})
        print(f"  critical section with {r} running trials: {out[-1]['held_ms']['median']} ms, "
              f"{out[-1]['round_trips']} round trips", flush=True)
    return out


def profile_artifacts(url: str, server: Server, path: Path, repeats: int = 3) -> dict:
    """Upload and fetch ``path`` through the study database's artifact store."""
    import optuna
    from optuna.artifacts import upload_artifact

    from autoprune.artifacts import open_store
    from autoprune.storage import open_storage

    storage = open_storage(url, heartbeat_seconds=HEARTBEAT)
    store = open_store({"kind": "db"}, storage, create=True)
    study = optuna.create_study(study_name=f"coord-artifacts-{uuid.uuid4().hex[:6]}", storage=storage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trial = study.ask()
    up, down, cpu, wal, sent, ids = [], [], [], [], [], []
    for _ in range(repeats):
        s0, b0, t0 = server.stats(), COUNTS["bytes_sent"], time.perf_counter()
        ids.append(upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial))
        t1, b1, s1 = time.perf_counter(), COUNTS["bytes_sent"], server.stats()
        up.append(t1 - t0)
        sent.append(b1 - b0)
        wal.append(s1["wal"] - s0["wal"])
        if s0["cpu"] is not None:
            cpu.append(s1["cpu"] - s0["cpu"])
        t0 = time.perf_counter()
        with store.open_reader(ids[-1]) as reader:
            reader.read()
        down.append(time.perf_counter() - t0)
    for artifact_id in ids:
        store.remove(artifact_id)
    study.tell(trial, 0.0)
    return {"bytes": path.stat().st_size, "upload_s": round(statistics.median(up), 3),
            "fetch_s": round(statistics.median(down), 3), "bytes_sent": round(statistics.median(sent)),
            "wal_bytes": round(statistics.median(wal)),
            "server_cpu_s": round(statistics.median(cpu), 3) if cpu else None}


# --- the projection ----------------------------------------------------------------


def _line(points: list[tuple[float, float]]):
    """The least-squares line through ``points``, its slope held >= 0 (a cost never falls as trials run)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = max(0.0, sum((x - mx) * (y - my) for x, y in points) / var) if var else 0.0
    return lambda x: my + slope * (x - mx)


def project(runs: list[dict], claims: list[dict], artifacts: dict, load_weights_bytes: int, rtt_ms: float,
            commit_ms: float, server_cores: float, minutes=(1, 5, 30), goal: float = 0.05,
            max_utilisation: float = 0.7) -> dict:
    """Workers one study serves at each trial length before coordination passes ``goal``, and why.

    Per trial: the work a worker does outside the lock (measured with the fewest workers, its
    weights upload swapped for the full-width one, plus ``rtt_ms`` per round trip for a LAN and
    ``commit_ms`` per commit for a server that flushes its WAL, where this one runs with fsync
    off), the lock's hold with R = N running trials (the profile, with the same additions), and
    the wait for the lock as an M/D/1 queue of asks. The database server must stay below
    ``max_utilisation`` of ``server_cores``.
    """
    base = min((r for r in runs if not r["storm"] and r.get("coordination_ms_per_trial") is not None),
               key=lambda r: (r["workers"], -r["trial_seconds"]))
    pt = base["per_trial"]
    wait_ms = pt["lock_wait_ms"].get("mean") or pt["lock_wait_ms"]["median"] or 0.0
    outside_s = (base["coordination_ms_per_trial"] - wait_ms - pt["lock_held_ms"]["mean"]
                 - (pt["upload_ms"]["mean"] or 0.0)) / 1000 + artifacts["upload_s"]
    rt_lock = _line([(c["running"], c["round_trips"]) for c in claims])(base["workers"])
    commits_lock = _line([(c["running"], c.get("commits") or 0) for c in claims])(base["workers"])
    rt_outside = max(0.0, pt["round_trips"]["mean"] - rt_lock)
    commits_outside = max(0.0, (pt.get("commits", {}).get("mean") or 0.0) - commits_lock)
    outside_s += (rt_outside * rtt_ms + commits_outside * commit_ms) / 1000
    hold = _line([(c["running"], (c["held_ms"]["median"] + c["round_trips"] * rtt_ms
                                  + (c.get("commits") or 0) * commit_ms) / 1000) for c in claims])
    claim_cpu = _line([(c["running"], (c["server_cpu_ms"] or 0.0) / 1000) for c in claims])
    load_art_cpu = (artifacts["server_cpu_s"] or 0.0) * load_weights_bytes / artifacts["bytes"]
    base_cpu = (base["server"]["cpu_ms_per_trial"] or 0.0) / 1000
    rest_cpu = max(0.0, base_cpu - claim_cpu(base["workers"]) - load_art_cpu)
    art_cpu = artifacts["server_cpu_s"] or 0.0

    def at(n: int, trial_s: float) -> dict:
        h = max(0.0, hold(n))
        coord = outside_s + h
        rate = n / (trial_s + coord)
        rho = rate * h
        wait = math.inf if rho >= 1 else rho * h / (2 * (1 - rho))
        coord += wait
        db_cpu = rest_cpu + max(0.0, claim_cpu(n)) + art_cpu
        util = rate * db_cpu / server_cores
        return {"workers": n, "coordination_s": coord, "fraction": coord / (trial_s + coord), "lock_rho": rho,
                "lock_s": h + wait, "outside_lock_s": coord - h - wait, "server_utilisation": util,
                "artifact_share_of_server": art_cpu / db_cpu if db_cpu else 0.0,
                "artifact_wal_mib_per_s": rate * artifacts["wal_bytes"] / 2 ** 20,
                "artifact_tib_per_day": rate * artifacts["wal_bytes"] * 86400 / 2 ** 40}

    def ok(p: dict) -> bool:
        return p["fraction"] <= goal and p["lock_rho"] < 1 and p["server_utilisation"] <= max_utilisation

    rows = []
    for m in minutes:
        trial_s = 60.0 * m
        lo, hi = 0, 1
        while ok(at(hi, trial_s)) and hi < 10 ** 7:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if ok(at(mid, trial_s)) else (lo, mid)
        limit = at(hi, trial_s)
        if limit["server_utilisation"] > max_utilisation:
            why = "artifacts" if limit["artifact_share_of_server"] > 0.5 else "database"
        elif limit["lock_rho"] >= 1 or limit["lock_s"] > limit["outside_lock_s"]:
            why = "lock"
        else:
            why = "per-trial overhead"
        at_max = at(max(lo, 1), trial_s)
        rows.append({"trial_minutes": m, "max_workers": lo, "limit": why,
                     "at_max": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in at_max.items()},
                     "just_past": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in limit.items()}})
    return {"rows": rows, "assumptions": {
        "goal": f"coordination <= {goal:.0%} of a worker's time", "lan_round_trip_ms": rtt_ms,
        "commit_flush_ms": commit_ms,
        "server_cores": server_cores, "server_max_utilisation": max_utilisation,
        "weights_per_trial_bytes": artifacts["bytes"],
        "weights": "every trial feasible, uploading the lab's full-width VGG weights (fine-grained, size 0.25)",
        "base_run": f"{base['workers']} workers, {base['trial_seconds']:g}-second trials",
        "outside_lock_s_per_trial": round(outside_s, 4), "round_trips_outside_lock": round(rt_outside, 1),
        "commits_outside_lock": round(commits_outside, 1), "round_trips_in_lock": round(rt_lock, 1),
        "commits_in_lock": round(commits_lock, 1),
        "lock_hold": "claim_trial profile: a least-squares line in the running trials (slope >= 0)",
        "lock_wait": "M/D/1 queue of asks at rate workers / (trial + coordination)",
        "server_cpu_s_per_trial_excluding_claims_and_artifacts": round(rest_cpu, 4),
        "server_cpu_s_per_artifact_upload": art_cpu}}


# --- README ------------------------------------------------------------------------

MARK_START = "<!-- coordination-load:start -->"
MARK_END = "<!-- coordination-load:end -->"


def _f(x, spec: str = ".1f", unit: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{unit}"


def _cell(r: dict | None) -> str:
    """A run's coordination share, or why it has none."""
    if r is None:
        return "-"
    if r["timed_out"]:
        return f"timed out ({r['complete']} of {r['trials']} trials in {r['seconds']:.0f} s)"
    return _f(None if r["coordination_fraction"] is None else 100 * r["coordination_fraction"], ".1f", "%")


def readme_block(result: dict, before: dict | None = None) -> str:
    def key(r):
        return r["workers"], r["trial_seconds"], r["storm"]

    earlier = {key(r): r for r in (before or {}).get("runs", [])}
    head = "| workers | trial | coordination | lock held (median) | lock wait (median / p95) | round trips / trial " \
           "| bytes sent / trial | server CPU / trial | exactly N |"
    if before:
        head += " before: coordination, round trips / trial |"
    lines = [f"Measured by `{result['command']}` on {result['machine']} ({result['date'][:10]}); "
             f"PostgreSQL {result['server']['version'].split()[1]} on the same host "
             f"(fsync {result['server']['fsync']}). Each trial replays a real trial's writes and uploads "
             f"its weights ({result['template']['weights_bytes'] / 2 ** 20:.2f} MiB); coordination is a "
             f"worker's time outside the stub's wait, after its first ask."
             + (f" *Before*: {before['label']}, same command." if before else ""), "", head,
             "|" + " --- |" * (head.count("|") - 1)]
    for r in result["runs"]:
        pt = r["per_trial"]
        row = (f"| {r['workers']}{' (kill storm)' if r['storm'] else ''} | {r['trial_seconds']:g} s "
               f"| {_cell(r)} | {_f(pt['lock_held_ms']['median'], '.1f', ' ms')} "
               f"| {_f(pt['lock_wait_ms']['median'])} / {_f(pt['lock_wait_ms']['p95'], '.1f', ' ms')} "
               f"| {_f(pt['round_trips']['mean'], '.0f')} "
               f"| {_f(None if pt['bytes_sent']['mean'] is None else pt['bytes_sent']['mean'] / 1024, '.0f', ' KiB')} "
               f"| {_f(r['server']['cpu_ms_per_trial'], '.0f', ' ms')} "
               f"| {'yes' if r['exact'] else 'NO: ' + '; '.join(r['problems'])[:80]}"
               + (f" ({len(r['kills'])} killed, {r['killed_trials']} trials failed and retried once)"
                  if r["storm"] else "") + " |")
        if before:
            b = earlier.get(key(r))
            row += f" {_cell(b)}, {_f(b and b['per_trial']['round_trips']['mean'], '.0f')} |"
        lines.append(row)
    claims = result["claims"]
    lines += ["", "The locked count-and-ask (`claim_trial`), alone, with R trials running: "
              + ", ".join(f"R = {c['running']}: {c['held_ms']['median']:.1f} ms ({c['round_trips']} round trips)"
                          for c in claims) + "."
              + (" Before: " + ", ".join(f"{c['held_ms']['median']:.0f} ms ({c['round_trips']})"
                                        for c in before["claims"]) + "." if before else ""),
              f"The lab's full-width weights ({result['artifacts']['bytes'] / 2 ** 20:.1f} MiB) in the database: "
              f"{result['artifacts']['upload_s']:.2f} s to upload, {result['artifacts']['fetch_s']:.2f} s to fetch, "
              f"{result['artifacts']['wal_bytes'] / 2 ** 20:.1f} MiB of WAL"
              + (f", {result['artifacts']['server_cpu_s']:.2f} s of server CPU" if result['artifacts']['server_cpu_s']
                 is not None else "") + " per upload"
              + (f" (before: {before['artifacts']['upload_s']:.1f} s, {before['artifacts']['server_cpu_s']:.1f} s "
                 f"of server CPU)" if before and before["artifacts"].get("server_cpu_s") is not None else "")
              + ".", ""]
    p = result["projection"]
    a = p["assumptions"]
    lines += ["**Projection** (written by the benchmark): workers one study serves before coordination passes 5% "
              f"of a worker's time, every trial uploading the full-width weights, a {a['lan_round_trip_ms']:g} ms "
              f"round trip to the server, {a['commit_flush_ms']:g} ms per commit, a server of "
              f"{a['server_cores']:g} cores kept below {a['server_max_utilisation']:.0%} busy:", "",
              "| trial length | workers | limit | at that many: lock (hold + wait) | server busy | weights written "
              "to the database |" + (" before: workers, limit |" if before else ""),
              "| --- | --- | --- | --- | --- | --- |" + (" --- |" if before else "")]
    old = {row["trial_minutes"]: row for row in (before or {}).get("projection", {}).get("rows", [])}
    for row in p["rows"]:
        m = row["at_max"]
        line = (f"| {row['trial_minutes']} min | {row['max_workers']:,} | {row['limit']} "
                f"| {1000 * m['lock_s']:.0f} ms | {100 * m['server_utilisation']:.0f}% "
                f"| {m['artifact_wal_mib_per_s']:.0f} MiB/s of WAL ({m['artifact_tib_per_day']:.1f} TiB a day) |")
        if before:
            b = old.get(row["trial_minutes"])
            line += f" {b['max_workers']:,}, {b['limit']} |" if b else " - |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def update_readme(block: str) -> bool:
    return replace_marked(REPO / "README.md", MARK_START, MARK_END, block)


# --- main ----------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2], int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", help="a PostgreSQL URL; default: a throwaway server started here")
    parser.add_argument("--workers", default="4,16,64", help="worker counts (default 4,16,64)")
    parser.add_argument("--trial-seconds", default="0.5,2", help="stub trial lengths (default 0.5,2)")
    parser.add_argument("--run-seconds", type=float, default=24.0,
                        help="about how long each run's trials take: trials per worker = this / trial seconds")
    parser.add_argument("--no-storm", action="store_true", help="skip the kill storm")
    parser.add_argument("--storm-workers", type=int, default=64)
    parser.add_argument("--storm-trial-seconds", type=float, default=2.0)
    parser.add_argument("--profile-running", default="0,64,256,1024",
                        help="running trials in the critical-section profile (default 0,64,256,1024)")
    parser.add_argument("--rtt-ms", type=float, default=0.5, help="projection: a LAN round trip (default 0.5)")
    parser.add_argument("--commit-ms", type=float, default=1.0,
                        help="projection: a commit's WAL flush on a durable server (default 1; this one has fsync off)")
    parser.add_argument("--server-cores", type=float, default=float(os.cpu_count() or 1),
                        help="projection: the database server's cores (default: this machine's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/coordination_load.json"))
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--compare", help="an earlier results file, shown beside these in README's table")
    parser.add_argument("--label", default="", help="a note stored with the results (e.g. which code ran)")
    args = parser.parse_args()
    count_round_trips()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from autoprune.storage import redact

    rng = random.Random(args.seed)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server it started on the way out
    with tempfile.TemporaryDirectory(prefix="autoprune-coord-") as tmp:
        workdir = Path(tmp)
        pg_env = None
        if args.storage:
            if not args.storage.startswith(("postgresql://", "postgresql+psycopg2://")):
                raise SystemExit("--storage must be a PostgreSQL URL (postgresql://USER:PASSWORD@HOST:5432/DB)")
            url, where = args.storage, redact(args.storage)
        else:
            url, pg_env = start_postgres(workdir)
            where = "a throwaway cluster started by .ci/postgres.sh on this host"
        try:
            result = run_all(args, url, where, workdir, rng)
        finally:
            if pg_env is not None:
                stop_postgres(pg_env)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    before = json.loads(Path(args.compare).read_text()) if args.compare else None
    if before is not None:
        # Its projection anew, by this code and these assumptions, so that the two compare.
        before["projection"] = project(before["runs"], before["claims"], before["artifacts"],
                                       before["template"]["weights_bytes"], args.rtt_ms, args.commit_ms,
                                       args.server_cores)
        result["compared_with"] = {"file": args.compare, "label": before.get("label", ""),
                                   "projection": before["projection"]}
        out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_readme and update_readme(readme_block(result, before)):
        print("README.md scaling figures updated")


def run_all(args, url: str, where: str, workdir: Path, rng: random.Random) -> dict:
    server = Server(url)
    load_before = os.getloadavg()
    print("template: one real trial (tiny CPU setup)...", flush=True)
    template = template_trial(workdir)
    runs = []
    for workers in [int(x) for x in _floats(args.workers)]:
        for seconds in _floats(args.trial_seconds):
            per_worker = max(3, round(args.run_seconds / seconds))
            print(f"{workers} workers, {seconds:g}-second trials, {workers * per_worker} trials...", flush=True)
            runs.append(run_load(url, server, template, workdir, workers, seconds, per_worker, rng))
            report_run(runs[-1])
    if not args.no_storm:
        workers, seconds = args.storm_workers, args.storm_trial_seconds
        per_worker = max(3, round(args.run_seconds / seconds))
        print(f"kill storm: {workers} workers, {seconds:g}-second trials, a quarter killed...", flush=True)
        runs.append(run_load(url, server, template, workdir, workers, seconds, per_worker, rng,
                             kills=max(1, workers // 4), mid_trial=True))
        report_run(runs[-1])
    print("critical-section profile...", flush=True)
    claims = profile_claims(url, server, template, tuple(int(x) for x in _floats(args.profile_running)))
    print("artifact profile (the lab's full-width weights)...", flush=True)
    full = workdir / "full-width.pt"
    full_width_weights(full)
    artifacts = profile_artifacts(url, server, full)
    projection = project(runs, claims, artifacts, template["weights_bytes"], args.rtt_ms, args.commit_ms,
                         args.server_cores)
    for row in projection["rows"]:
        print(f"  {row['trial_minutes']}-minute trials: {row['max_workers']:,} workers (limit: {row['limit']})")
    return {
        "benchmark": "coordination_load",
        "label": args.label,
        "command": " ".join(["python", "benchmarks/coordination_load.py",
                             *[a if not a.startswith("postgresql") else "URL" for a in sys.argv[1:]]]),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPUs, the workers as processes on this one host with the server",
        "cpu_count": os.cpu_count(),
        "storage": where,
        "server": server.info,
        "heartbeat_seconds": HEARTBEAT,
        "sampler": "random (the stub's suggest; TPE's own compute is a trial's work, not coordination)",
        "template": {k: template[k] for k in ("weights_bytes", "attr_json_bytes")}
        | {"user_attrs": len(template["user_attrs"]), "params": len(template["distributions"])},
        "load_average_1_5_15_before": [round(x, 2) for x in load_before],
        "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        "runs": runs, "claims": claims, "artifacts": artifacts, "projection": projection,
    }


def report_run(r: dict) -> None:
    pt = r["per_trial"]
    print(f"  coordination {_cell(r)} ({r['coordination_ms_per_trial']} ms/trial), "
          f"lock held {pt['lock_held_ms']['median']} ms, wait {pt['lock_wait_ms']['median']} / "
          f"{pt['lock_wait_ms']['p95']} ms, {pt['round_trips']['mean']} round trips, "
          f"{pt['bytes_sent']['mean']} bytes/trial, server {r['server']['cpu_ms_per_trial']} ms CPU/trial; "
          f"{r['complete']} complete, exact: {r['exact']} {r['problems'][:3]}"
          + (f"; {len(r['kills'])} killed, {r['killed_trials']} trials failed" if r["storm"] else ""), flush=True)


if __name__ == "__main__":
    main()
