"""Setting a study up: check the setup, then the dense model, the priors and the search space.

:func:`prepare` is what the creator of a study runs once (``autoprune search``;
joining workers read its results from the study, see :mod:`autoprune.study`):
load the data, the dense model (a checkpoint, or one trained here and cached),
the sensitivity priors and warm starts, and build the search space. It returns
the trial context and the figures the study records as user attributes.
:func:`check_setup` is what ``--dry-run`` runs: writable folders, the data,
the checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from pathlib import Path

import torch

from . import metrics
from .config import StudyConfig
from .errors import AutopruneError
from .files import file_digest
from .kinds import KINDS
from .latency import Meter
from . import model as lab
from .model import vgg_channels
from .objective import TrialContext
from .plan import plan_for
from .sources import build_model, prunable, save_checkpoint
from .space import SearchSpace, study_latency_budget
from .storage import is_server_url, redact, redacted_config, storage_file
from .train import DENSE_RECIPE, TrainConfig, evaluate, fit, resolve_device

log = logging.getLogger("autoprune")


def build_dense(config: StudyConfig, device: str | None = None):
    """The study's dense model, untrained, as ``[model]`` describes it (``device="meta"``: shapes only)."""
    m = config.model
    with torch.device(device or "cpu"):
        return build_model(m.source, m.num_classes, exclude=m.exclude, **m.build_kwargs())


def load_dense_checkpoint(config: StudyConfig, path: str | None = None):
    """The ``[model] checkpoint`` (or ``path``, the study's copy), refused unless it is the dense model
    ``[model]`` describes: the lab's VGG at its width, or the source's model with these options."""
    return read_dense(config, path)[0]


def read_dense(config: StudyConfig, path: str | None = None) -> tuple:
    """:func:`load_dense_checkpoint`'s model and the arch the file itself records (None for the lab's VGG
    or a bare state dict), from one read of the file."""
    m = config.model
    path = path or m.checkpoint
    if m.source == "vgg":
        expected = vgg_channels(m.width)
        model, _ = lab.load_checkpoint(path)
        if list(model.channels) != expected:
            raise AutopruneError(
                f"checkpoint {path} has conv widths {list(model.channels)}, but the study asks "
                f"for width {m.width} ({expected}); set [model] width to match or use another checkpoint"
            )
        return model, None
    obj = lab.read_checkpoint(path)
    meta = obj.get("autoprune") if isinstance(obj.get("autoprune"), dict) else {}
    arch = meta.get("arch") if isinstance(meta.get("arch"), dict) else {}
    said = arch.get("source", arch.get("name"))
    if said is not None and said != m.source:
        raise AutopruneError(f"checkpoint {path} holds a {said} model, but the study asks for {m.source}; set "
                             f"[model] source to match or use another checkpoint")
    if arch.get("widths"):
        raise AutopruneError(f"checkpoint {path} is a channel-pruned model; a study starts from the dense one: "
                             f"give its checkpoint")
    try:
        lab.check_state_dict(build_dense(config, "meta").state_dict(), obj["state_dict"])
    except AutopruneError as exc:
        raise AutopruneError(f"checkpoint {path} does not fit [model] source {m.source} as configured: {exc}; "
                             f"fix [model] (kwargs, width, cifar_stem, num_classes) or use another checkpoint") from None
    model = build_dense(config)
    model.load_state_dict(obj["state_dict"])
    return model.eval(), arch or None


def _dense_recipe(config: StudyConfig, data) -> dict:
    m = config.model
    recipe = dict(data=data.spec, width=m.width, epochs=m.train_epochs, val_size=len(data.val),
                  data_seed=config.data.seed, seed=config.study.seed)
    if m.source != "vgg":  # the lab's VGG keeps its recipe (and its cached models)
        recipe.update(source=m.source, kwargs=m.build_kwargs(), exclude=list(m.exclude), num_classes=m.num_classes)
    return recipe


def model_text(config: StudyConfig) -> str:
    """``vgg width 0.25``, or the source with its options (``cifar:resnet20 width=0.5``)."""
    m = config.model
    if m.source == "vgg":
        return f"vgg width {m.width:g}"
    options = {**m.build_kwargs(), **({"exclude": m.exclude} if m.exclude else {})}
    return " ".join([m.source, *(f"{k}={v}" for k, v in options.items())])


def _model_slug(config: StudyConfig) -> str:
    m = config.model
    if m.source == "vgg":
        return f"vgg-w{m.width:g}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", m.source)[:60]


def dense_cache_path(config: StudyConfig, data) -> Path:
    """Where a dense model trained here is cached: by recipe beside the study's folder (shared by studies)."""
    key = hashlib.sha256(repr(sorted(_dense_recipe(config, data).items())).encode()).hexdigest()[:12]
    return config.out_dir.parent / "cache" / f"dense-{_model_slug(config)}-{key}.pt"


def study_checkpoint(config: StudyConfig, model, path: str, stored_arch: dict | None) -> str:
    """The checkpoint the study records and publishes: ``path`` when it describes ``model`` (the lab's VGG,
    or a checkpoint saved with its arch: ``stored_arch``, as :func:`read_dense` found it), else a copy saved
    with the arch beside the dense-model cache, so that the scan and every worker rebuild the model from the
    file alone."""
    if config.model.source == "vgg" or stored_arch == lab.arch_of(model):
        return path
    copy = config.out_dir.parent / "cache" / f"dense-{_model_slug(config)}-{file_digest(path)[:12]}.pt"
    if not copy.is_file():
        save_checkpoint(model, copy, made_by="autoprune search (the dense checkpoint with its arch)",
                        checkpoint=str(path))
        log.info("dense model: %s saved with its architecture as %s (what the study records)", path, copy)
    return str(copy)


def dense_model(config: StudyConfig, data, device, progress: bool):
    """The study's dense model: its checkpoint, or one trained here (cached); ``(model, checkpoint path)``."""
    m = config.model
    if m.checkpoint:
        model, stored_arch = read_dense(config)
        return model, study_checkpoint(config, model, m.checkpoint, stored_arch)
    path = dense_cache_path(config, data)
    if path.is_file():
        log.info("dense model: reusing %s (trained earlier with the same recipe)", path)
        return load_dense_checkpoint(config, str(path)), str(path)
    log.info("dense model: training %s for %d epochs on %s (no [model] checkpoint given)",
             model_text(config), m.train_epochs, data.describe())
    torch.manual_seed(config.study.seed)  # the initial weights too: the same config trains the same dense model
    model = build_dense(config).to(device)
    history = fit(model, data, TrainConfig(epochs=m.train_epochs, seed=config.study.seed, **DENSE_RECIPE),
                  progress=progress, desc="dense")
    save_checkpoint(model, path, made_by="autoprune search (dense)", val_accuracy=history[-1]["val_accuracy"],
                    **_dense_recipe(config, data))
    return model.cpu().eval(), str(path)


# --- checks before any work ----------------------------------------------------


def check_writable(folder: Path, what: str, fix: str) -> None:
    """Refuse a folder that can be neither written nor created; creates nothing."""
    try:
        if "\0" in str(folder):
            raise ValueError("it holds a NUL character")
        probe = Path(os.path.abspath(folder))
        while not probe.exists():
            if probe.is_symlink():
                raise AutopruneError(f"cannot write the {what} {folder}: {probe} is a broken link; {fix}")
            probe = probe.parent
        if not probe.is_dir():
            raise AutopruneError(f"cannot write the {what} {folder}: {probe} is a file, not a folder; {fix}")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise AutopruneError(f"cannot write the {what} {folder}: {probe} is not writable "
                                 f"(permissions or a read-only file system); {fix}")
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte
        raise AutopruneError(f"cannot use the {what} {str(folder)[:200]!r}: {exc}; {fix}") from None


def check_setup(config: StudyConfig) -> dict:
    """Check everything ``autoprune search`` needs before it does any work; what it would do.

    The folders it writes (the study's out_dir, the storage file's folder, the artifact
    directory, the dense-model cache) must be writable or creatable; the data spec and the
    checkpoint must load. Bad setup raises a one-line :class:`AutopruneError`. Writes nothing
    (``autoprune search --dry-run`` prints the returned dict).
    """
    from .artifacts import descriptor_for

    config.validate()
    url, out = config.storage_url, config.out_dir
    storage = storage_file(url)
    if storage is None and not is_server_url(url):
        raise AutopruneError(f"storage {redact(url)} is not sqlite:///PATH, journal:PATH or a database server "
                             f"URL (postgresql://USER:PASSWORD@HOST:5432/DB); fix [study] storage or --storage")
    m, d = config.model, config.data
    check_writable(out, "study's out_dir", "set [study] out_dir to a writable folder")
    if not m.checkpoint:
        check_writable(out.parent / "cache", "dense-model cache", "set [study] out_dir to a writable folder "
                       "(the dense model is cached beside it) or give [model] checkpoint")
    if storage is not None:
        check_writable(storage.parent, "storage file's folder", "fix [study] storage or --storage")
        if storage.exists() and not storage.is_file():
            raise AutopruneError(f"the storage file {storage} is a folder; point [study] storage or --storage "
                                 f"at a file")
    artifacts = descriptor_for(config.study.artifacts, url, out)
    if artifacts["kind"] == "file":
        check_writable(Path(artifacts["path"]), "artifact directory", "fix [study] artifacts")
    build_dense(config, "meta")  # the source and its options, checked without allocating the model
    if m.checkpoint:
        try:
            model = load_dense_checkpoint(config)
            dense = f"checkpoint {m.checkpoint} ({model_text(config)}, {metrics.count_params(model):,} params)"
        except AutopruneError as exc:
            if storage is not None and not storage.exists():  # a new study: it needs the checkpoint
                raise
            # A search joining the study on another machine uses the study's copy instead.
            dense = f"only the study's copy: {exc} (fine if the study exists, else the search stops there)"
    try:  # never downloads: that is work, and a dry run writes nothing
        data = dataclasses.replace(config, data=dataclasses.replace(d, download=False)).load_data()
        data_text = data.describe()
    except AutopruneError:
        if not (d.download and d.spec == "cifar10"):
            raise
        root = Path(d.root or "data")
        check_writable(root, "CIFAR-10 download folder", "fix [data] root")
        data, data_text = None, f"cifar10: downloaded into {root} first"
    if not m.checkpoint:
        cache = dense_cache_path(config, data) if data is not None else None
        dense = (f"reuse the dense model cached at {cache}" if cache is not None and cache.is_file() else
                 f"train a dense {model_text(config)} for {m.train_epochs} epochs (cached in {out.parent / 'cache'})")
    return {"study": config.study.name, "kind": config.study.kind, "objectives": config.objectives,
            "trials": config.study.trials, "storage": redact(url), "out_dir": str(out),
            "artifacts": artifacts.get("path", "in the study's database"), "data": data_text, "dense": dense,
            "priors": (f"sensitivity scan over {scan_grid(config)} (cached in the out_dir)"
                       if config.priors.enabled else "off"),
            "latency": _latency_setup(config)}


def _latency_setup(config: StudyConfig) -> str:
    lat = config.latency
    if not KINDS[config.study.kind].changes_shape:
        return "not measured (fine-grained trials run dense-shaped)"
    return (f"{lat.runtime} on {lat.device}, {lat.threads or 'all'} thread(s), batch {lat.batch_sizes}, "
            f"{lat.repeats} repeats beside the dense model" + (
                f"; per-layer tables cached in {config.latency_cache_dir}" if lat.predict else ""))


def format_setup(s: dict) -> str:
    rows = [("study", f"{s['study']} ({s['kind']}, objectives {', '.join(s['objectives'])}): "
                      f"{s['trials']} complete trials wanted"),
            ("storage", s["storage"]), ("out dir", s["out_dir"]), ("artifacts", s["artifacts"]),
            ("data", s["data"]), ("dense model", s["dense"]), ("priors", s["priors"]),
            ("latency", s.get("latency", ""))]
    return "\n".join(["dry run: the setup checks passed; nothing was written"]
                     + [f"{k:<13}{v}" for k, v in rows])


def prepare(config: StudyConfig, device="auto", progress: bool = True) -> tuple[TrialContext, dict]:
    """Load data and the dense model, compute priors and the space: a worker's context."""
    device = resolve_device(device)
    data = config.load_data().to(device)
    dense, checkpoint = dense_model(config, data, device, progress)
    dense.to(device).eval()
    costs = prunable(dense).cost_model()  # the model's layers, channel groups and exact costs
    num_classes = config.model.num_classes
    dense_val = evaluate(dense, data.val)
    floor = config.accuracy_floor(dense_val)
    figures = {"params": metrics.count_params(dense), "macs": metrics.count_macs(dense),
               "val_accuracy": dense_val, "test_accuracy": evaluate(dense, data.test)}
    meter, lat_budget = None, None
    if KINDS[config.study.kind].changes_shape:  # a smaller network: timed beside the dense one
        meter = Meter.from_config(config.latency, config.latency_cache_dir)
        figures.update(meter.dense_figures(dense))  # with the table: the latency fit, beside uniform prunes
        lat_budget = study_latency_budget(config, costs, num_classes, meter.table, meter.fit)
        if lat_budget is not None:
            figures["latency_budget_fraction"] = lat_budget[0]
    targets = PriorTargets(config, costs, num_classes, lat_budget)
    log.info("dense model %s: val %.2f%% on %d images; accuracy floor %.2f%%", checkpoint, dense_val,
             len(data.val), floor)
    upper, allocation, prior_info, warm, centre = None, None, {}, {}, None
    if config.priors.enabled:
        upper, allocation, prior_info = compute_study_priors(config, dense, checkpoint, data, progress, targets)
        warm = warm_starts(config, dense, targets)
        starts = {"prior allocation": allocation, **warm}
        upper = widen_for_starts(upper, starts)
        if config.priors.centre:
            name, scores = choose_centre(config, dense, data, starts)
            centre = starts[name]
            prior_info.update(space_centre=name, centre_scores=scores)
    space = SearchSpace.for_study(config, costs, upper, num_classes, centre=centre,
                                  starts=list(warm.values()) + ([allocation] if allocation else []),
                                  latency_budget=lat_budget)
    # Stored redacted: anyone who opens the study (optuna-dashboard too) reads it; workers take the
    # real URL from their own command line.
    info = {"config": redacted_config(config), "space_signature": space.signature(), "space_upper": space.upper,
            "space_centre_ratios": space.centre, "space_spread": space.spread or None,
            "dense": figures, "accuracy_floor": floor, "checkpoint": str(checkpoint),
            "checkpoint_sha256": file_digest(checkpoint), "data": data.describe(),
            "prior_allocation": allocation, "warm_starts": warm, **prior_info}
    ctx = TrialContext(config=config, space=space, dense=dense, data=data, floor=floor, dense_figures=figures,
                       progress=progress, latency=meter)
    return ctx, info


def _budget_low(config) -> float:
    """The lowest budget a trial samples, as a fraction of the cap (1: single-objective, always the cap)."""
    return config.study.budget_low if len(config.objectives) > 1 else 1.0


def scan_grid(config) -> list[float]:
    """The sensitivity scan's ratios: the configured grid, or one that reaches the lowest sampled budget."""
    return config.priors.scan_grid(config.study.kind, config.budget_cap * _budget_low(config))


def widen_for_starts(upper: dict[str, float], starts: dict[str, dict[str, float]]) -> dict[str, float]:
    """Bounds that hold every enqueued start exactly as its rule made it (never clipped, never shifted)."""
    wide = dict(upper)
    for name, ratios in starts.items():
        opened = [n for n, r in ratios.items() if n in wide and r > wide[n] + 1e-12]
        for n in opened:
            wide[n] = float(ratios[n])
        if opened:
            log.info("bounds: %s opened to hold the %s warm start as the rule made it", ", ".join(
                f"{n} {upper[n]:.2f} -> {wide[n]:.3f}" for n in opened), name)
    return wide


def choose_centre(config, dense, data, starts: dict[str, dict]) -> tuple[str, dict[str, float]]:
    """The start a centred space is built around, and each start's cheap score (percent).

    Fine-grained: the start with the best BatchNorm-recalibrated validation
    score, which ranks fine-grained configs like the fine-tune does. Channel:
    that score hardly ranks channel configs, so the first one-shot rule
    (uniform by default), as the rule a person would try first.
    """
    from .objective import cheap_score

    kind = config.study.kind
    if not KINDS[kind].cheap_score_ranks:
        rules = [n for n in starts if n != "prior allocation"] or list(starts)
        log.info("space: centred on the %s allocation (the cheap score does not rank %s configs)", rules[0],
                 KINDS[kind].title)
        return rules[0], {}
    # scored as its warm-start trial will run: the study's criterion, zero ratios left out
    scores = {name: cheap_score(dense, plan_for(dense, kind, {n: r for n, r in ratios.items() if r > 0},
                                                config.study.criterion), data, config)
              for name, ratios in starts.items()}
    best = max(scores, key=lambda n: (scores[n], -list(starts).index(n)))
    log.info("space: centred on the %s allocation, the best cheap score (BatchNorm-recalibrated val: %s)", best,
             ", ".join(f"{n} {v:.2f}%" for n, v in scores.items()))
    return best, scores


class PriorTargets:
    """The closed-form cost (params or MACs) and targets that priors and warm starts are made at.

    The study's budget metric and cap; with a latency budget, MACs at the MACs of the uniform plan
    at each latency target: the priors' costs are closed-form, and uniform pruning at that MACs
    fraction is uniform pruning at the latency target, which the repair then holds every trial to.
    """

    def __init__(self, config, costs, num_classes=10, latency_budget=None):
        """``costs``: the dense model's :class:`autoprune.budget.CostModel` (or the lab's VGG conv widths)."""
        from .budget import as_cost_model

        self.config, self.costs, self.num_classes = config, as_cost_model(costs, num_classes), num_classes
        self.latency_budget = latency_budget
        self.metric = "macs" if latency_budget is not None else config.budget_metric

    def at(self, share: float = 1.0) -> float:
        """The target for ``share`` x the cap, a fraction of dense in ``metric``."""
        if self.latency_budget is None:
            return self.config.budget_cap * share
        from . import budget

        cap, predictor = self.latency_budget
        round_to = self.config.pruning.round_to
        try:
            ratios = budget.channel_budget(self.costs, cap * share, "latency", num_classes=self.num_classes,
                                           round_to=round_to, latency=predictor)
        except AutopruneError:  # below what uniform pruning reaches: as far as it goes
            ratios = budget.channel_upper_bounds(self.costs)
        return budget.channel_cost_fraction(self.costs, ratios, "macs", self.num_classes, round_to)


def warm_starts(config, dense, targets: PriorTargets | None = None) -> dict[str, dict[str, float]]:
    """The one-shot rules' allocations at the cap ([priors] warm_start): rule -> ratios."""
    from .priors import one_shot_allocation

    kind = config.study.kind
    targets = targets or PriorTargets(config, prunable(dense).cost_model(), config.model.num_classes)
    cap = targets.at(1.0)
    return {rule: one_shot_allocation(rule, dense, kind, cap, targets.metric)
            for rule in config.priors.warm_start_rules(kind)}


def compute_study_priors(config, dense, checkpoint, data, progress, targets: PriorTargets | None = None):
    """Sensitivity scan (cached) -> per-layer upper bounds and a prior allocation at the cap.

    The bounds must leave room for the whole budget range the study samples
    (down to ``budget_low`` x the cap), or every proposal is projected onto the
    same corner of the space; the allocation, the study's first trial, is made
    for the cap itself, with the bounds the cap alone needs.
    """
    from .priors import compute_priors
    from .sensitivity import scan_cached

    kind = config.study.kind
    df, dense_acc, cached = scan_cached(checkpoint, data, kind, scan_grid(config), config.study.criterion,
                                        config.out_dir, progress, source=config.model.source)
    low = _budget_low(config)
    targets = targets or PriorTargets(config, prunable(dense).cost_model(), config.model.num_classes)
    metric = targets.metric
    # The priors' curves end at the largest scanned ratio. A latency budget's lowest share may ask for MACs
    # beyond it (a fit with a large fixed or activation share needs near-empty layers for a low latency),
    # though its trials sample the size budget, not the latency cap: those bounds open to that ratio instead.
    largest = max(r for r in scan_grid(config) if r < 1)
    reach = (KINDS[kind].cost_fraction(targets.costs, dict.fromkeys(KINDS[kind].units(targets.costs), largest),
                                       metric) if targets.latency_budget is not None else 0.0)

    def at(share):
        target = targets.at(share)
        if target < reach:
            log.info("priors: the latency budget at %g x its cap needs MACs %.4f, beyond the scan (every layer at "
                     "its largest scanned ratio %g reaches %.4f): the bounds open that far", share, target, largest,
                     reach)
            target = reach
        log.info("priors at %s fraction %.4f (%s%s):", "size" if metric == "params" else metric, target,
                 "the cap" if share == 1.0 else f"the lowest sampled budget, {low:g} x the cap: the bounds",
                 "; MACs of uniform pruning at the latency budget" if targets.latency_budget else "")
        return compute_priors(df, dense_acc, targets.costs, kind, target, tolerance=config.priors.tolerance,
                              metric=metric, num_classes=config.model.num_classes)

    bounds = at(low)
    first = bounds if low == 1.0 else at(1.0)
    info = {"prior_upper": bounds.upper, "prior_rule": bounds.rule, "prior_tolerance": bounds.tolerance,
            "sensitivity_cached": cached}
    return bounds.upper, first.allocation, info
