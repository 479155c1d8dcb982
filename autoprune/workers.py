"""Many workers on one study: join through the study, count trials exactly, survive dead workers.

``autoprune search STUDY.toml`` creates a study (dense model, priors, space) and
runs trials; ``autoprune worker --storage URL --study NAME`` joins it from any
machine. A worker needs nothing but the storage: the study records its config
(``config``), dense figures and accuracy floor, the search space bounds
(``space_upper``, so no sensitivity scan is re-run) and its dense checkpoint,
uploaded as an artifact (``checkpoint_artifact_id``) into the study's artifact
store (see :mod:`autoprune.artifacts`). The creator marks the study ``ready``
last; joiners wait for that mark. One process at a time looks for, creates and
sets up a study (:func:`setup_lock`). A failed setup deletes the half-made
study; one left half made by a creator that is gone (a dead process on this
host, or none recorded) is deleted and set up anew by the next search.

The trial loop (:func:`run_trials`) is shared by the creator and the workers.
Exactly ``total`` trials finish complete: under a per-study lock (a PostgreSQL
advisory lock; a file lock beside SQLite and journal files) a worker fails the
trials of dead workers (stale heartbeats; dead processes on this host) and
queues them again, counts COMPLETE and RUNNING trials, and asks for a trial only
while ``complete + running < total`` (``ask`` pops queued retries first). When
the remaining trials are all running elsewhere it polls: one of them may die
and come back as a retry. Each retry reruns the failed trial's parameters; a
trial interrupted by Ctrl-C is failed and queued again in the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.trial import TrialState

from .artifacts import descriptor_for, is_server_url, open_store, study_artifact_store
from .config import StudyConfig
from .errors import AutopruneError
from .files import atomic_path
from .storage import (_alive, _retry, error_reason, file_lock, open_storage, rdb_storage, recover_dead_local_trials,
                      redact, setup_lock_path, storage_file, with_driver, worker_id)

if TYPE_CHECKING:
    from .objective import TrialContext
# The trial objective (and torch) is imported where a worker builds it: the coordination layer
# (run_trials, its locks and counts) imports without torch, so a benchmark can run it in many processes.

log = logging.getLogger("autoprune")

READY_TIMEOUT_S = 300.0  # how long a joiner waits for the creator to finish setting up
ORPHAN_S = 600.0  # without a quota lock, a RUNNING trial that never got a worker is retried after this
CONNECT_TRIES = 3


# --- connecting --------------------------------------------------------------


def connect_storage(url: str, heartbeat_seconds: int = 30, tries: int = CONNECT_TRIES,
                    first_wait: float = 1.0, create: bool = True) -> optuna.storages.BaseStorage:
    """``open_storage`` with, for server databases, a checked connection first.

    An unreachable server is retried ``tries`` times with a doubling wait
    (1 s, 2 s, ...), then reported naming its host and port; a refused login
    or a missing database is reported at once. No message holds the password.
    """
    if is_server_url(url):
        _preflight(url, tries, first_wait)
    return open_storage(url, heartbeat_seconds=heartbeat_seconds, create=create)


def _preflight(url: str, tries: int, first_wait: float) -> None:
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    given, shown, url = url, redact(url), with_driver(url)
    try:
        u = make_url(url)
    except Exception:
        raise AutopruneError(f"cannot read the storage URL {shown}; expected e.g. "
                             f"postgresql://USER:PASSWORD@HOST:5432/DB") from None
    backend = u.get_backend_name()
    server = {"postgresql": "PostgreSQL", "mysql": "MySQL", "mariadb": "MariaDB"}.get(backend, backend)
    host = u.host or "localhost"
    port = u.port or {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}.get(backend, "default port")
    where = f"{server} server at {host} port {port}"
    args = {"connect_timeout": 5} if backend in ("postgresql", "mysql", "mariadb") else {}
    try:
        engine = sa.create_engine(url, poolclass=NullPool, connect_args=args)
    except Exception as exc:  # no driver, bad URL
        raise AutopruneError(f"cannot open storage {shown}: {error_reason(exc, given, url)}"
                             + ("; pip install 'autoprune[postgres]'" if backend == "postgresql" else "")) from None
    start, reason = time.monotonic(), ""
    try:
        for attempt in range(tries):
            try:
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
                return
            except sa.exc.SQLAlchemyError as exc:
                reason = error_reason(exc, given, url)
                low = reason.lower()
                if "authentication failed" in low or "password" in low or "access denied" in low:
                    raise AutopruneError(
                        f"cannot open storage {shown}: the {where} refused the login of user "
                        f"{u.username!r} (password authentication failed); check the user and password "
                        f"in the URL") from None
                if "does not exist" in low or "unknown database" in low:
                    raise AutopruneError(f"cannot open storage {shown}: {reason}; create the database "
                                         f"first (e.g. createdb {u.database})") from None
                if attempt + 1 < tries:
                    wait = first_wait * 2 ** attempt
                    log.warning("cannot reach the %s (try %d of %d): %s; retrying in %.0fs",
                                where, attempt + 1, tries, reason, wait)
                    time.sleep(wait)
    finally:
        engine.dispose()
    raise AutopruneError(
        f"cannot open storage {shown}: cannot reach the {where} after {tries} tries over "
        f"{time.monotonic() - start:.0f}s ({reason}); is the server running and reachable from this machine?")


def find_study(storage, name: str) -> optuna.Study | None:
    try:
        storage.get_study_id_from_name(name)
    except KeyError:
        return None
    return optuna.load_study(study_name=name, storage=storage)


def load_existing_study(storage, name: str, url: str) -> optuna.Study:
    study = find_study(storage, name)
    if study is None:
        names = sorted(optuna.get_all_study_names(storage))
        known = ", ".join(names) if names else "none"
        raise AutopruneError(f"no study named {name!r} in {redact(url)}; studies there: {known} "
                             f"(create one with: autoprune search STUDY.toml --storage URL)")
    return study


def is_ready(study: optuna.Study) -> bool:
    """Whether the study's creator finished setting it up (``ready``, or made before that mark)."""
    attrs = study.user_attrs
    return bool(attrs.get("ready")) or ("created_by" not in attrs and "config" in attrs and "space_upper" in attrs
                                        and "checkpoint" in attrs and bool(study.get_trials(deepcopy=False)))


def dead_creator(study: optuna.Study) -> str | None:
    """Why the study's creator is known to be gone (a dead process on this host), or None."""
    host, _, pid = study.user_attrs.get("created_by", "").rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
        return f"its creator (process {pid} on this host) died while setting it up"
    return None


def wait_ready(study: optuna.Study, timeout: float = READY_TIMEOUT_S) -> dict:
    """The study's user attributes once its creator has finished setting it up."""
    deadline = time.monotonic() + timeout
    said = False
    while True:
        if is_ready(study):
            return study.user_attrs
        gone = dead_creator(study)
        if gone or time.monotonic() > deadline:
            why = gone or f"its creator has not finished setting it up after {timeout:.0f}s (or died doing so)"
            raise AutopruneError(
                f"study {study.study_name!r} is not ready: {why}; run its autoprune search again, which sets "
                f"it up anew (or delete it: optuna delete-study --study-name {study.study_name} --storage URL)")
        if not said:
            log.info("study %r: waiting for its creator to finish setting it up", study.study_name)
            said = True
        time.sleep(1.0)


# --- creating and joining ----------------------------------------------------

# The parts of a config that define the search: a study refuses a joiner whose differ.
_IDENTITY = {"study": ("kind", "criterion", "budget_low"), "model": ("name", "width", "num_classes"),
             "constraints": None, "pruning": None, "finetune": None, "priors": ("enabled", "grid", "tolerance")}


def check_same_search(study: optuna.Study, config: StudyConfig) -> None:
    stored = study.user_attrs.get("config")
    directions = ["maximize" if o == "accuracy" else "minimize" for o in config.objectives]
    diffs = []
    if [d.name.lower() for d in study.directions] != directions:
        diffs.append(f"objectives {[d.name.lower() for d in study.directions]} in the study vs {directions} here")
    if isinstance(stored, dict):
        mine = config.to_dict()
        for section, keys in _IDENTITY.items():
            theirs, ours = stored.get(section, {}), mine[section]
            for key in keys or ours:
                if key in theirs and theirs[key] != ours[key]:
                    diffs.append(f"[{section}] {key}: {theirs[key]!r} in the study vs {ours[key]!r} here")
    if diffs:
        raise AutopruneError(
            f"study {study.study_name!r} already exists with another search space or objectives "
            f"({'; '.join(diffs[:3])}); use another --study-name or storage (nothing was changed)")


def setup_lock(url: str, storage, name: str):
    """A context manager under which one process at a time looks for, takes over or creates study ``name``.

    A file lock beside SQLite and journal files; a PostgreSQL advisory lock; none elsewhere.
    """
    path = setup_lock_path(url)
    if path is not None:
        return file_lock(path)
    rdb = rdb_storage(storage)
    if rdb is not None and rdb.engine.dialect.name == "postgresql":
        return _pg_lock(rdb.engine, _lock_key(f"autoprune-setup:{name}"))
    return contextlib.nullcontext()


def abandoned(study: optuna.Study) -> str | None:
    """Why a half-made study can be set up anew (its creator is gone, nothing ran in it), or None.

    Call under :func:`setup_lock`: a creator holds it from ``create_study`` until the study is
    ready, so a study seen there without a recorded creator was left by one that died.
    """
    if is_ready(study) or any(t.state != TrialState.WAITING for t in study.get_trials(deepcopy=False)):
        return None
    if "created_by" not in study.user_attrs:
        return "no creator is recorded"
    return dead_creator(study)


def create_or_join(config: StudyConfig, storage, url: str, device="auto", progress: bool = True):
    """The study named by ``config``, created (and set up) here or joined: (study, ctx, created).

    A study left half made by a creator that is gone is deleted and set up again here.
    """
    from .search import prepare

    name = config.study.name
    with setup_lock(url, storage, name):
        study = find_study(storage, name)
        why = study is not None and abandoned(study)
        if why:
            log.warning("study %r was left half made (%s): setting it up anew", name, why)
            optuna.delete_study(study_name=name, storage=storage)
            study = None
    if study is None:
        ctx, info = prepare(config, device, progress)
        directions = ["maximize" if o == "accuracy" else "minimize" for o in config.objectives]
        with setup_lock(url, storage, name):
            try:
                study = optuna.create_study(storage=storage, study_name=name, directions=directions)
            except optuna.exceptions.DuplicatedStudyError:  # another process created it meanwhile
                log.info("study %r was created by another process meanwhile: joining it", name)
                study = optuna.load_study(study_name=name, storage=storage)
            else:
                publish(study, config, info, ctx, storage, url)
                return study, ctx, True
    check_same_search(study, config)
    wait_ready(study)
    return study, worker_context(study, url, device, progress), False


def publish(study: optuna.Study, config: StudyConfig, info: dict, ctx: TrialContext, storage, url: str) -> None:
    """Record everything a worker needs in a new study, then mark it ready.

    If that fails (a full disk, Ctrl-C) the half-made study and its uploaded checkpoint are
    removed before the error is raised, so the same command can simply run again.
    """
    store, artifact_id = None, None
    try:
        study.set_user_attr("created_by", worker_id())
        for key, value in info.items():
            study.set_user_attr(key, value)
        starts = {}
        if config.priors.enabled and config.priors.enqueue_allocation and info.get("prior_allocation"):
            starts["prior allocation"] = info["prior_allocation"]
        starts.update(info.get("warm_starts") or {})
        for name, ratios in starts.items():
            clipped = [n for n, v in ratios.items() if v > ctx.space.upper.get(n, 0.0) + 1e-9]
            if clipped:
                log.info("warm start %s: %s clipped to the prior bounds, then shifted back onto the cap", name,
                         ", ".join(clipped))
            study.enqueue_trial(ctx.space.initial_params(ratios), user_attrs={"warm_start": name})
        if starts:
            log.info("enqueued as the first trials, at the cap: %s (then the sampler searches around them)",
                     ", ".join(starts))
        descriptor = descriptor_for(config.study.artifacts, url, config.out_dir)
        store = open_store(descriptor, storage, create=True)
        study.set_user_attr("artifact_store", descriptor)
        if descriptor["kind"] == "file":
            study.set_user_attr("artifact_dir", descriptor["path"])
        from optuna.artifacts import upload_artifact

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            artifact_id = upload_artifact(artifact_store=store, file_path=info["checkpoint"], study_or_trial=study)
        study.set_user_attr("checkpoint_artifact_id", artifact_id)
        ctx.artifact_store = store
        study.set_user_attr("ready", True)
    except BaseException as exc:
        _discard(study, storage, store, artifact_id)
        if isinstance(exc, OSError):
            raise AutopruneError(
                f"setting up study {study.study_name!r} failed: {exc.strerror or exc}; the half-made study was "
                f"removed, so once that is fixed the same command starts afresh") from None
        raise
    log.info("study %r created in %s; workers join with: autoprune worker --storage URL --study %s",
             study.study_name, redact(url), study.study_name)


def _discard(study: optuna.Study, storage, store, artifact_id: str | None) -> None:
    """Best effort: delete a study that failed to set up (a later search would take it over anyway)."""
    try:
        if artifact_id is not None:
            store.remove(artifact_id)
        optuna.delete_study(study_name=study.study_name, storage=storage)
    except Exception as exc:
        log.warning("could not remove the half-made study %r (%s); the next autoprune search takes it over",
                    study.study_name, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "autoprune"


def study_checkpoint(study: optuna.Study, store) -> str:
    """A local copy of the study's dense checkpoint: its recorded path if the bytes match, else the artifact."""
    from .search import file_digest

    attrs = study.user_attrs
    path, digest = attrs.get("checkpoint", ""), attrs.get("checkpoint_sha256")
    if path and Path(path).is_file() and (digest is None or file_digest(path) == digest):
        return path
    artifact_id = attrs.get("checkpoint_artifact_id")
    if not artifact_id or store is None:
        raise AutopruneError(f"the study's dense checkpoint {path} is not on this machine and the study has no "
                             f"uploaded copy (it was created before workers could join); copy it to that path")
    # The cache file is named by a hash, never by the study's text (an id like /../../x would escape the cache).
    name = (digest if re.fullmatch(r"[0-9a-f]{64}", str(digest))
            else hashlib.sha256(str(artifact_id).encode()).hexdigest())
    local = cache_dir() / f"dense-{name[:16]}.pt"
    if local.is_file() and (digest is None or file_digest(local) == digest):
        return str(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(local) as tmp:
        try:
            with store.open_reader(artifact_id) as reader, open(tmp, "wb") as f:
                shutil.copyfileobj(reader, f)
        except AutopruneError:
            raise
        except Exception as exc:
            raise AutopruneError(f"cannot fetch the study's dense checkpoint (artifact {artifact_id}): "
                                 f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None
        if digest is not None and file_digest(tmp) != digest:
            raise AutopruneError(f"the study's dense checkpoint artifact {artifact_id} does not match its recorded "
                                 f"sha256 {digest[:12]}...; the study's artifact store is damaged")
    log.info("dense checkpoint: fetched from the study's artifact store to %s", local)
    return str(local)


def study_config(study: optuna.Study, url: str) -> StudyConfig:
    stored = study.user_attrs.get("config")
    if not isinstance(stored, dict):
        raise AutopruneError(f"study {study.study_name!r} has no stored config: it was not made by autoprune "
                             f"search, so a worker cannot join it")
    config = StudyConfig.from_dict(stored).validate()
    config.study.name = study.study_name
    config.study.storage = url
    return config


def worker_context(study: optuna.Study, url: str, device="auto", progress: bool = True) -> TrialContext:
    """A worker's TrialContext, built from what the study records (no dense training, no scan)."""
    from .model import load_checkpoint
    from .objective import TrialContext
    from .space import SearchSpace
    from .train import resolve_device

    attrs = study.user_attrs
    config = study_config(study, url)
    device = resolve_device(device)
    data = config.load_data().to(device)
    store = study_artifact_store(study)
    dense, _ = load_checkpoint(study_checkpoint(study, store))
    space = SearchSpace.for_study(config, dense.channels, attrs.get("space_upper"), dense.num_classes)
    if attrs.get("space_centre_ratios") is not None:  # a centred space: its centre and ranges as recorded
        space.centre = dict(attrs["space_centre_ratios"])
        space.spread = {n: tuple(v) for n, v in attrs["space_spread"].items()}
    if attrs.get("space_signature") not in (None, space.signature()):
        raise AutopruneError(f"the search space rebuilt from study {study.study_name!r} has signature "
                             f"{space.signature()}, not the recorded {attrs['space_signature']}; the study's "
                             f"checkpoint or attributes were changed")
    log.info("joined study %r in %s: %s trials, dense val %.2f%%, floor %.2f%%", study.study_name, redact(url),
             config.study.kind, attrs["dense"]["val_accuracy"], attrs["accuracy_floor"])
    return TrialContext(config=config, space=space, dense=dense.to(device).eval(), data=data,
                        floor=attrs["accuracy_floor"], dense_figures=attrs["dense"], artifact_store=store,
                        progress=progress)


def worker_seed(config: StudyConfig, study: optuna.Study, created: bool) -> int:
    """The sampler seed: reproducible for the creator, distinct for each joining worker."""
    existing = len(study.get_trials(deepcopy=False))
    seed = config.study.seed + existing
    return seed if created else seed + 1 + zlib.crc32(worker_id().encode()) % 1_000_003


# --- the quota lock ----------------------------------------------------------


@contextlib.contextmanager
def _pg_lock(engine, key: int):
    import sqlalchemy as sa

    with engine.connect() as conn, conn.begin():  # released at the end of the transaction, or if we die
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
        yield


def _lock_key(name: str) -> int:
    """A PostgreSQL advisory lock key for ``name``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def quota_lock(url: str, study: optuna.Study):
    """A callable returning a context manager that serializes 'count, then ask' across workers."""
    name = f"autoprune-quota:{study.study_name}"
    path = storage_file(url)
    if path is not None:
        return lambda: file_lock(f"{path}.autoprune-quota.lock")
    rdb = rdb_storage(study._storage)
    if rdb is not None and rdb.engine.dialect.name == "postgresql":
        return lambda: _pg_lock(rdb.engine, _lock_key(name))
    log.warning("no cross-process lock for %s: several workers may finish a few trials more than asked",
                redact(url))
    return contextlib.nullcontext


# --- the trial loop ----------------------------------------------------------


class _Heartbeat:
    """Records the trial's heartbeat every ``interval`` seconds until the trial ends (errors: retried)."""

    def __init__(self, storage, trial_id: int, interval: int):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"heartbeat-{trial_id}")

    def _run(self):
        while not self.stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as exc:  # a network blip: the next beat may get through
                log.warning("heartbeat of trial id %d failed: %s", self.trial_id, str(exc).splitlines()[0][:200])

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def _heartbeat_interval(study: optuna.Study) -> int | None:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    storage = study._storage
    return storage.get_heartbeat_interval() if is_heartbeat_enabled(storage) else None


def reclaim(study: optuna.Study, local: bool, orphan_after: float = ORPHAN_S) -> None:
    """Fail and queue again the trials of dead workers (call under the quota lock).

    ``orphan_after``: a RUNNING trial with no worker recorded is failed once it is that old. A
    worker records itself in the same critical section as its ask, so one seen under a real
    quota lock belongs to a worker that died in between: ``run_trials`` passes 0 there.
    """
    interval = _heartbeat_interval(study)
    if interval is not None:
        stale = _stale(study, interval)
        if stale is None:  # not a database: Optuna's own check
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
        for trial_id in stale or ():
            try:
                if study._storage.set_trial_state_values(trial_id, TrialState.FAIL):
                    _retry()(study, study._storage.get_trial(trial_id))
            except optuna.exceptions.UpdateFinishedTrialError:
                pass
    if local:
        recover_dead_local_trials(study)
    now = time.time()
    for trial_id, number, started in _workerless(study):
        if started is not None and now - started < orphan_after:
            continue
        try:
            if study._storage.set_trial_state_values(trial_id, TrialState.FAIL):
                _retry()(study, study._storage.get_trial(trial_id))
                log.info("trial %d never got a worker (its asker died): failed and queued again", number)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass


_COUNT_SQL = "SELECT state, COUNT(*) FROM trials WHERE study_id = :study GROUP BY state"
_WORKERLESS_SQL = ("SELECT t.trial_id, t.number, t.datetime_start FROM trials t WHERE t.study_id = :study AND "
                   "t.state = 'RUNNING' AND NOT EXISTS (SELECT 1 FROM trial_user_attributes a "
                   "WHERE a.trial_id = t.trial_id AND a.key = 'worker')")


_STALE_SQL = ("SELECT t.trial_id FROM trials t JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
              "WHERE t.study_id = :study AND t.state = 'RUNNING' AND h.heartbeat < CURRENT_TIMESTAMP - :grace")


def _stale(study: optuna.Study, interval: int) -> list[int] | None:
    """Ids of the RUNNING trials whose last heartbeat is older than the grace period; None off PostgreSQL.

    What ``optuna.storages.fail_stale_trials`` finds, in one query: Optuna loads every running
    trial with its heartbeat, so under the quota lock each ask cost time in proportion to the
    number of workers (benchmarks/coordination_load.py).
    """
    import datetime as dt

    rdb = rdb_storage(study._storage)
    if rdb is None or rdb.engine.dialect.name != "postgresql":  # interval arithmetic differs elsewhere
        return None
    grace = rdb.grace_period if rdb.grace_period is not None else 2 * interval
    import sqlalchemy as sa

    with rdb.engine.connect() as conn:
        return [int(r[0]) for r in conn.execute(sa.text(_STALE_SQL),
                                                {"study": study._study_id, "grace": dt.timedelta(seconds=grace)})]


def _study_sql(study: optuna.Study, sql: str, **types) -> list | None:
    """Rows of ``sql`` on Optuna's own tables for a database storage; None for other storages.

    The loop's critical section asks only counts and the few trials without a worker:
    Optuna's trial reads load every unfinished trial with its params and attributes, so
    under the lock they made each ask cost time in proportion to the number of workers.
    """
    rdb = rdb_storage(study._storage)
    if rdb is None:
        return None
    import sqlalchemy as sa

    with rdb.engine.connect() as conn:
        query = sa.text(sql).columns(**types) if types else sa.text(sql)  # types: SQLite returns text
        return list(conn.execute(query, {"study": study._study_id}))


def trial_counts(study: optuna.Study) -> tuple[int, int, int]:
    """(complete, running, waiting) trials in ``study``: one COUNT query on a database storage."""
    rows = _study_sql(study, _COUNT_SQL)
    if rows is None:
        trials = study.get_trials(deepcopy=False,
                                  states=(TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING))
        rows = [(t.state.name, 1) for t in trials]
    counts = {name: 0 for name in ("COMPLETE", "RUNNING", "WAITING")}
    for state, n in rows:
        name = getattr(state, "name", state)  # a TrialState or its name, as the database returns it
        if name in counts:
            counts[name] += int(n)
    return counts["COMPLETE"], counts["RUNNING"], counts["WAITING"]


def _workerless(study: optuna.Study) -> list[tuple[int, int, float | None]]:
    """(trial id, number, start time) of the RUNNING trials that record no worker."""
    import sqlalchemy as sa

    rows = _study_sql(study, _WORKERLESS_SQL, trial_id=sa.Integer, number=sa.Integer, datetime_start=sa.DateTime)
    if rows is None:
        return [(t._trial_id, t.number, t.datetime_start.timestamp() if t.datetime_start else None)
                for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if "worker" not in t.user_attrs]
    return [(int(tid), int(number), start.timestamp() if start is not None else None)
            for tid, number, start in rows]


def claim_trial(study: optuna.Study, total: int, *, local: bool, interval: int | None,
                exclusive: bool = False) -> tuple[int | None, int, int]:
    """The trial loop's critical section (call under the quota lock): (trial id or None, complete, running).

    Fails and queues again the trials of dead workers, counts, and asks for a trial only while
    ``complete + running < total``; the new trial records its worker and first heartbeat before
    the lock is released. ``exclusive``: the lock is a real one (see :func:`reclaim`). Build
    the ``optuna.Trial`` after the lock (``optuna.Trial(study, trial_id)``): that reads the trial.
    """
    reclaim(study, local=local, orphan_after=0.0 if exclusive else ORPHAN_S)
    complete, running, waiting = trial_counts(study)
    if complete >= total or complete + running >= total:
        return None, complete, running
    try:
        trial_id = ask(study, worker_id(), queued=waiting > 0)
        if interval is not None:
            study._storage.record_heartbeat(trial_id)
    except optuna.exceptions.UpdateFinishedTrialError:
        # Failed as workerless by another worker: only if this lock was lost (its connection dropped).
        return None, complete, running + 1
    return trial_id, complete, running + 1


def ask(study: optuna.Study, worker: str, queued: bool = True) -> int:
    """``study.ask()`` recording ``worker`` (a queued trial first: a retry, a warm start); the trial id.

    On a database storage it reads no trial: ``Study.ask`` looks for queued trials in Optuna's
    trial cache, which first reads every unfinished trial with its params and attributes, so
    under the quota lock each ask cost time in proportion to the number of workers. Here the
    queue is read only when ``queued`` (from the count), in SQL, and a new trial is created
    RUNNING with its worker in one transaction.
    """
    rdb = rdb_storage(study._storage)
    local = getattr(study, "_thread_local", None)  # where Study.ask resets the sampler's view of the study
    if rdb is None or local is None or not hasattr(local, "cached_all_trials"):
        with warnings.catch_warnings():  # "heartbeat is supposed to be used with optimize": it is, here
            warnings.simplefilter("ignore", UserWarning)
            trial = study.ask()
        trial.set_user_attr("worker", worker)
        return trial._trial_id
    storage, trial_id = study._storage, None
    for waiting in (rdb.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.WAITING,))
                    if queued else ()):
        try:
            if storage.set_trial_state_values(waiting._trial_id, TrialState.RUNNING):
                trial_id = waiting._trial_id
                storage.set_trial_user_attr(trial_id, "worker", worker)  # a retry carries its dead worker's
                break
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    if trial_id is None:
        trial_id = storage.create_new_trial(study._study_id, template_trial=optuna.trial.create_trial(
            state=TrialState.RUNNING, user_attrs={"worker": worker}))
    local.cached_all_trials = None  # as Study.ask does: the sampler reads the study afresh for this trial
    return trial_id


def run_trials(study: optuna.Study, objective, total: int, url: str, on_trial=None,
               poll_seconds: float | None = None, timings=None) -> int:
    """Run trials until the study holds exactly ``total`` complete ones; returns how many ran here.

    ``objective(trial)`` returns the value(s); ``on_trial(frozen, done)`` is called after each.
    An exception in ``objective`` fails its trial and is raised (as ``Study.optimize`` does).
    ``timings(name, seconds)``, if given, hears "lock_wait" and "lock_held" for every round
    of the critical section (benchmarks/coordination_load.py measures with it).
    """
    lock = quota_lock(url, study)
    exclusive = lock is not contextlib.nullcontext
    interval = _heartbeat_interval(study)
    # Heartbeats find dead workers anywhere; without them (journal) dead local processes are
    # checked at every round. With them, only at start: a quick resume on the same machine.
    local_each_round = interval is None
    poll = poll_seconds or (1.0 if interval is None else min(5.0, max(0.5, interval / 2)))
    ran, waiting_since, first = 0, None, True
    while True:
        asked = time.perf_counter()
        with lock():
            got = time.perf_counter()
            trial_id, complete, running = claim_trial(study, total, local=first or local_each_round,
                                                      exclusive=exclusive, interval=interval)
        if timings is not None:
            timings("lock_wait", got - asked)
            timings("lock_held", time.perf_counter() - got)
        first = False
        if trial_id is None:
            if complete >= total:
                break
            if waiting_since is None:
                waiting_since = time.monotonic()
                log.info("%d of %d trials complete, %d running elsewhere: waiting for them (a dead worker's "
                         "trial comes back as a retry)", complete, total, running)
            time.sleep(poll)
            continue
        waiting_since = None
        frozen = _run_one(study, optuna.Trial(study, trial_id), objective, interval)
        ran += 1
        if on_trial is not None and frozen is not None:
            on_trial(frozen, trial_counts(study)[0])
    return ran


def _run_one(study: optuna.Study, trial: optuna.Trial, objective, interval: int | None):
    """Run one asked trial and tell its result; None when another worker declared it dead meanwhile."""
    beat = _Heartbeat(study._storage, trial._trial_id, interval) if interval else contextlib.nullcontext()
    values, state, error = None, None, None
    with beat:
        try:
            values = objective(trial)
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except (Exception, KeyboardInterrupt) as exc:
            state, error = TrialState.FAIL, exc
    # No read before the tell (tell refuses a trial another worker failed) nor after (it returns the trial):
    # each trial read is ~8 round trips.
    taken, frozen = False, None
    try:
        frozen = study.tell(trial, values if state is None else None, state=state)
    except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
        taken = study._storage.get_trial(trial._trial_id).state.is_finished()
        if not taken:
            raise
    if taken:
        log.warning("trial %d was declared dead by another worker (no heartbeat for the grace period) and "
                    "queued again; this run's result is dropped", trial.number)
        if isinstance(error, KeyboardInterrupt):
            raise error
        return None
    if isinstance(error, KeyboardInterrupt):
        # Queued again as a killed worker's trial is, so a resume reruns it: an enqueued trial
        # (the prior allocation, a warm start) would otherwise never run.
        _retry()(study, study._storage.get_trial(trial._trial_id))
        log.info("trial %d was interrupted: marked failed and queued again for the next run", trial.number)
    if error is not None:
        raise error
    return frozen


# --- the worker command ------------------------------------------------------


def run_worker(url: str, study_name: str, *, device="auto", trials: int | None = None,
               progress: bool = True) -> dict:
    """``autoprune worker``: join an existing study and run trials until it holds N complete ones."""
    from .objective import Objective
    from .search import _line, make_sampler, summarize

    if trials is not None and trials < 1:
        raise AutopruneError(f"--trials must be >= 1, got {trials}")
    if url.startswith("journal:") and not Path(url[len("journal:"):]).is_file():
        raise AutopruneError(f"journal file {url[len('journal:'):]} not found; no study to join there")
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        raise AutopruneError(f"database file {url[len('sqlite:///'):]} not found; no study to join there")
    start = time.perf_counter()
    # The heartbeat period is the study's: read it from the study's config before opening for real.
    storage = connect_storage(url, create=False)
    study = load_existing_study(storage, study_name, url)
    wait_ready(study)
    heartbeat = int(study_config(study, url).study.heartbeat_seconds)
    if heartbeat != 30:
        storage = open_storage(url, heartbeat_seconds=heartbeat, create=False)
        study = optuna.load_study(study_name=study_name, storage=storage)
    ctx = worker_context(study, url, device, progress)
    config = ctx.config
    total = trials or config.study.trials
    study.sampler = make_sampler(config.study.sampler, worker_seed(config, study, created=False), total)
    ran = run_trials(study, Objective(ctx), total, url, on_trial=_printer(study, total, config.cost_attr, _line))
    return summarize(study, config, time.perf_counter() - start, ran)


def _printer(study, total, cost, line):
    def on_trial(frozen, done):
        print(line(study, frozen, done, total, cost), flush=True, file=sys.stderr)

    return on_trial
