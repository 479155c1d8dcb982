"""Run a study: config -> set up (or join) the study -> Optuna trials -> re-scores -> summary.

``run_search`` is what ``autoprune search`` calls. It checks the setup first
(:func:`autoprune.prepare.check_setup`, what ``--dry-run`` runs), creates the
study (:mod:`autoprune.study`: the dense model, priors and space of
:func:`autoprune.prepare.prepare`, published in the study) or joins it, then
runs trials (:func:`autoprune.runner.run_trials`) until the study holds the
requested number of finished (complete) trials; re-running the same command
resumes. ``run_worker`` is what ``autoprune worker`` calls: it joins an
existing study from any machine and runs the same trial loop. The study's user
attributes record the config, the dense figures, the priors and the space
signature, so a study is self-describing.
"""

from __future__ import annotations

import logging
import sys
import time
import zlib

import optuna
from optuna.trial import TrialState

from .config import StudyConfig
from .errors import AutopruneError
from .objective import Objective, TrialContext
from .pick import format_score, is_feasible, leaders, qualified, study_scores
from .prepare import check_setup
from .rescore import rescore_trials, rescores
from .runner import run_trials
from .storage import open_storage, redact, storage_file, storage_kind, worker_id
from .study import connect_storage, create_or_join, load_existing_study, study_config, wait_ready, worker_context

log = logging.getLogger("autoprune")

optuna.logging.set_verbosity(optuna.logging.WARNING)  # autoprune prints its own trial lines


def make_sampler(name: str, seed: int, n_trials: int) -> optuna.samplers.BaseSampler:
    startup = min(10, max(4, n_trials // 4))
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True,
                                          constant_liar=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, n_trials // 3)))
    raise AutopruneError(f"unknown sampler {name!r}; use tpe, random, gp or nsga2")


def worker_seed(config: StudyConfig, study: optuna.Study, created: bool) -> int:
    """The sampler seed: reproducible for the creator, distinct for each joining worker."""
    existing = len(study.get_trials(deepcopy=False))
    seed = config.study.seed + existing
    return seed if created else seed + 1 + zlib.crc32(worker_id().encode()) % 1_000_003


def _line(study: optuna.Study, trial: optuna.trial.FrozenTrial, done: int, total: int, cost: str) -> str:
    a = trial.user_attrs
    if trial.state != TrialState.COMPLETE:
        return f"[{done}/{total}] trial {trial.number} {trial.state.name.lower()}"
    feasible = is_feasible(trial)
    best = best_feasible(study)
    best_txt = (f"best feasible: #{best.number} {cost} {best.user_attrs[cost]:.4f} "
                f"acc {best.user_attrs['val_accuracy']:.2f}%" if best else "best feasible: none yet")
    stage = a.get("fidelity", "full")
    early = f" (stopped: {stage}, {a['finetune_epochs_done']} fine-tune epochs)" if stage != "full" else ""
    return (f"[{done}/{total}] trial {trial.number}: {cost} {a[cost]:.4f}  val {a['val_accuracy']:.2f}% "
            f"(before fine-tune {a['val_accuracy_before_finetune']:.2f}%)  "
            f"feasible {'yes' if feasible else 'no'}{early}  | {best_txt}  | {a['finetune_seconds']:.1f}s")


def best_feasible(study: optuna.Study):
    """The deployable feasible trial with the highest (re-scored) validation accuracy, or None."""
    config = StudyConfig.from_dict(study.user_attrs.get("config", {}))
    feasible = qualified(study, config)
    score = study_scores(study)
    cost = config.cost_attr  # ties in accuracy go to the smaller model
    return max(feasible, key=lambda t: (score[t.number].estimate, -t.user_attrs.get(cost, 0.0), -t.number),
               default=None)


def rescore_leaders(study: optuna.Study, ctx: TrialContext) -> list[int]:
    """The end of a search: re-score the ``[select] top_k`` leaders, then the leader by estimate if it was not.

    A trial outside the first top_k can lead once the re-scored ones have come
    down; it is re-scored too (at most top_k more), so the pick is always a
    re-scored trial.
    """
    sel = ctx.config.select
    if sel.top_k == 0:
        return []
    first = leaders(study, ctx.config, sel.top_k)
    if first:
        log.info("re-scoring the %d leading trials (%s) with %d more fine-tunes each: the best of many noisy "
                 "first scores is biased upwards", len(first), ", ".join(f"#{t.number}" for t in first), sel.seeds)
    done = rescore_trials(study, ctx, first, sel.seeds)
    for _ in range(sel.top_k):
        best = best_feasible(study)
        if best is None or best.number in rescores(study):
            break
        log.info("trial %d now leads on its first score minus the mean selection gap: re-scoring it too", best.number)
        done += rescore_trials(study, ctx, [best], sel.seeds)
    return done


def run_search(config: StudyConfig, *, device="auto", progress: bool = True) -> dict:
    """Run (or resume) the study until it holds ``config.study.trials`` complete trials."""
    start = time.perf_counter()
    check_setup(config)  # an unwritable folder or a bad checkpoint is found now, not after the dense training
    url = config.storage_url
    total = config.study.trials
    storage = connect_storage(url, heartbeat_seconds=config.study.heartbeat_seconds)
    log.info("study %r in %s: %d finished trials wanted", config.study.name, redact(url), total)
    study, ctx, created = create_or_join(config, storage, url, device, progress)
    study.sampler = make_sampler(config.study.sampler, worker_seed(config, study, created), total)
    ran = run_trials(study, Objective(ctx), total, url, on_trial=_printer(study, total, config.cost_attr, _line))
    rescore_leaders(study, ctx)
    return summarize(study, config, time.perf_counter() - start, ran)


def summarize(study: optuna.Study, config: StudyConfig, seconds: float, ran: int) -> dict:
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    feasible = [t for t in trials if is_feasible(t)]
    cost = config.cost_attr
    front = sorted(study.best_trials, key=lambda t: t.user_attrs[cost])  # constraint-aware in Optuna
    best = best_feasible(study)
    score = study_scores(study)
    first_feasible = min((t.number for t in feasible), default=None)
    saved = sum(t.user_attrs.get("finetune_seconds_saved", 0.0) for t in trials)
    return {
        "study": study.study_name,
        "cost": cost,
        "storage": redact(config.storage_url),
        "finished_trials": len(trials),
        "feasible_trials": len(feasible),
        "first_feasible_trial": first_feasible,
        "ran_this_session": ran,
        "seconds": seconds,
        "finetune_seconds": sum(t.user_attrs.get("finetune_seconds", 0.0) for t in trials),
        "finetune_seconds_saved_by_early_stop": saved,
        "rescored_trials": sorted(rescores(study)),
        "best_feasible": None if best is None else {"trial": best.number, **_brief(best, cost, score)},
        "pareto_front": [{"trial": t.number, **_brief(t, cost, score)} for t in front],
    }


def _brief(t, cost, score):
    a = t.user_attrs
    return {cost: a[cost], "val_accuracy": a["val_accuracy"], "test_accuracy": a["test_accuracy"],
            "plan": a["plan"], "score": score[t.number].to_dict()}


def format_summary(s: dict) -> str:
    cost = s["cost"]
    lines = [f"study {s['study']} ({s['storage']}): {s['finished_trials']} finished, {s['feasible_trials']} feasible, "
             f"first feasible: trial {s['first_feasible_trial']}; {s['seconds']:.0f}s this run, "
             f"{s['finetune_seconds_saved_by_early_stop']:.0f}s of fine-tuning saved by early stop"]
    if s["best_feasible"]:
        b = s["best_feasible"]
        rescored = format_score(b["score"])
        lines.append(f"best feasible: trial {b['trial']}  {cost} {b[cost]:.4f}  val {b['val_accuracy']:.2f}%  "
                     f"test {b['test_accuracy']:.2f}% (test: for reporting only)" + (f"  {rescored}" if rescored else ""))
    lines.append(f"Pareto front (feasible trials, {cost} vs first validation accuracy):")
    for r in s["pareto_front"]:
        rescored = format_score(r["score"])
        lines.append(f"  trial {r['trial']:>4}  {cost} {r[cost]:.4f}  val {r['val_accuracy']:.2f}%  "
                     f"test {r['test_accuracy']:.2f}%" + (f"  {rescored}" if rescored else ""))
    return "\n".join(lines)


# --- the worker command ------------------------------------------------------


def run_worker(url: str, study_name: str, *, device="auto", trials: int | None = None,
               progress: bool = True) -> dict:
    """``autoprune worker``: join an existing study and run trials until it holds N complete ones."""
    if trials is not None and trials < 1:
        raise AutopruneError(f"--trials must be >= 1, got {trials}")
    path = storage_file(url)
    if path is not None and not path.is_file():
        what = "journal file" if storage_kind(url) == "journal" else "database file"
        raise AutopruneError(f"{what} {path} not found; no study to join there")
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
