"""The trial loop shared by the search and its workers: count trials exactly, survive dead workers.

:func:`run_trials` runs trials until the study holds exactly ``total`` complete
ones. Under a per-study lock (a PostgreSQL advisory lock; a file lock beside
SQLite and journal files) a worker fails the trials of dead workers (stale
heartbeats; dead processes on this host) and queues them again, counts
COMPLETE and RUNNING trials, and asks for a trial only while
``complete + running < total`` (``ask`` pops queued retries first). When the
remaining trials are all running elsewhere it polls: one of them may die and
come back as a retry. Each retry reruns the failed trial's parameters; a trial
interrupted by Ctrl-C is failed and queued again in the same way.

Imports without torch (the objective is passed in): a benchmark runs this loop
in many light processes (benchmarks/coordination_load.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings

import optuna
from optuna.trial import TrialState

from .storage import (file_lock, lock_key, pg_lock, rdb_storage, recover_dead_local_trials, redact, retry_callback,
                      storage_file, worker_id)

log = logging.getLogger("autoprune")

ORPHAN_S = 600.0  # without a quota lock, a RUNNING trial that never got a worker is retried after this


# --- the quota lock ----------------------------------------------------------


def quota_lock(url: str, study: optuna.Study):
    """A callable returning a context manager that serializes 'count, then ask' across workers."""
    name = f"autoprune-quota:{study.study_name}"
    path = storage_file(url)
    if path is not None:
        return lambda: file_lock(f"{path}.autoprune-quota.lock")
    rdb = rdb_storage(study._storage)
    if rdb is not None and rdb.engine.dialect.name == "postgresql":
        return lambda: pg_lock(rdb.engine, lock_key(name))
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
                    retry_callback()(study, study._storage.get_trial(trial_id))
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
                retry_callback()(study, study._storage.get_trial(trial_id))
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
        retry_callback()(study, study._storage.get_trial(trial._trial_id))
        log.info("trial %d was interrupted: marked failed and queued again for the next run", trial.number)
    if error is not None:
        raise error
    return frozen
