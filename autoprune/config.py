"""Study configs: TOML files loaded into validated dataclasses.

Relative paths in a config (the npz data file, a checkpoint, a ``sqlite:///``
or ``journal:`` storage file) are resolved against the directory of the TOML
file, so a study runs the same from any working directory. Every table and key
is checked: an unknown key is an error that names it and lists the valid ones,
and a value of the wrong type an error that names the type wanted.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AutopruneError

SAMPLERS = ("tpe", "random", "gp", "nsga2")
LAB_GRID = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # the lab's sensitivity scan
EXTENDED_GRID = (0.95, 0.98, 0.99)  # fine-grained targets below ~0.2 need larger ratios
OBJECTIVES = ("size", "macs", "latency", "accuracy")  # latency: measured latency_fraction (channel studies)


@dataclass
class StudySection:
    name: str = "autoprune"
    kind: str = "fine_grained"  # fine_grained | channel
    trials: int = 20
    storage: str = ""  # default sqlite:///reports/<name>/study.db
    sampler: str = "tpe"  # tpe | random | gp | nsga2
    seed: int = 0
    # Default: minimise size (fine) or MACs (channel) fraction, maximise val accuracy.
    objectives: list[str] = field(default_factory=list)
    criterion: str = ""  # channel importance: norm (default) | none | bn_scale | l1
    out_dir: str = ""  # default reports/<name>
    # Multi-objective studies sample each trial's budget in [budget_low, 1] x the cap
    # (size, or MACs for channel studies) to spread trials along the front; 1 = the cap only.
    budget_low: float = 0.5
    heartbeat_seconds: int = 30  # RDB storages: a trial silent for 3x this is failed and retried
    # Where trial weights and the dense checkpoint go: "" = "db" (inside the study's own database)
    # for server storages (postgresql://, mysql://), else <out_dir>/artifacts; or a directory
    # (shared by all workers, e.g. on NFS) or "db". See README "Scaling out".
    artifacts: str = ""


@dataclass
class ModelSection:
    # Where the dense model comes from (autoprune.sources): "vgg" (the lab's), "torchvision:NAME",
    # "cifar:resnet20" (He et al.'s CIFAR ResNets) or "module:package.module:factory" (your own).
    source: str = "vgg"
    name: str = "vgg"  # the lab's model name, kept for studies stored before [model] source
    width: float = 1.0  # the lab's VGG and the CIFAR ResNets: channel multiplier of the dense model
    kwargs: dict = field(default_factory=dict)  # the source's options (e.g. width_mult for mobilenet_v2)
    cifar_stem: bool = False  # torchvision: adapt the stem to 32x32 inputs (3x3 stride-1 conv, no max pool)
    exclude: list[str] = field(default_factory=list)  # graph models: layers whose channel groups stay dense
    num_classes: int = 10
    checkpoint: str = ""  # empty: train a dense model first (cached in the study's out_dir)
    train_epochs: int = 30  # only when training the dense model here

    def build_kwargs(self) -> dict:
        """The source's options as :func:`autoprune.sources.build_model` takes them (with num_classes, exclude)."""
        kwargs = dict(self.kwargs)
        if self.source == "vgg" or self.width != 1.0:
            kwargs["width"] = self.width
        if self.cifar_stem:
            kwargs["cifar_stem"] = True
        return kwargs

    def check(self) -> None:
        """The source's name and the options it takes (the model itself is built by the setup check)."""
        from .sources import split_source

        split_source(self.source)
        if self.name != "vgg":
            raise AutopruneError(f"[model] name {self.name!r}: models other than the lab's VGG are chosen by "
                                 f"[model] source (e.g. source = \"torchvision:{self.name}\"); drop name")
        if self.source == "vgg" and (self.kwargs or self.exclude):
            raise AutopruneError("[model] kwargs and exclude are for other sources; the lab's VGG takes width")
        if self.cifar_stem and not self.source.startswith("torchvision:"):
            raise AutopruneError(f"[model] cifar_stem adapts torchvision models to 32x32 inputs; {self.source} "
                                 "needs none: drop it")


@dataclass
class DataSection:
    spec: str = "cifar10"
    root: str = ""
    download: bool = False
    val_size: int = 0  # 0: min(5000, train/5)
    seed: int = 0


@dataclass
class ConstraintsSection:
    max_size_fraction: float = 0.25  # nonzero size / dense size (fraction, not percent)
    min_accuracy: float | None = None  # percent; default 92.5 unless max_accuracy_drop is set
    max_accuracy_drop: float | None = None  # points below dense validation accuracy
    max_macs_fraction: float | None = None
    # Channel studies: a latency cap, repaired before fine-tuning by the [latency] lookup table's prediction
    # (like size and MACs), then checked on the measured latency. A fraction (0-1) of the dense model's latency
    # (predicted for the repair; measured beside the dense model for the check), or milliseconds; one of them.
    max_latency_fraction: float | None = None
    max_latency_ms: float | None = None


@dataclass
class PruningSection:
    """Channel pruning options (see autoprune/channel.py)."""

    # Kept channels rounded to a multiple of this (never 0, never above the dense width), in plans, budget
    # repair (costed on the rounded widths) and exports: hardware-friendly widths. 1: the lab's rounding.
    round_to: int = 1


@dataclass
class FinetuneSection:
    epochs: int = 5
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 512
    early_stop: bool = True
    # Stop after epoch e of E when val accuracy < floor - margin * (E - e). On the subset,
    # the last of two cosine epochs recovered up to 4.2 points (channel trials): 6 leaves room.
    early_stop_margin: float = 6.0  # points per remaining epoch
    # Knowledge distillation from the dense model (the teacher) in every fine-tune: loss =
    # (1 - weight) CE + weight T^2 KL(teacher || student) at temperature T (Hinton et al.).
    distill: bool = False
    distill_temperature: float = 4.0  # T, > 0
    distill_weight: float = 0.5  # in [0, 1]: the distillation term's share of the loss


@dataclass
class PriorsSection:
    enabled: bool = True
    # Ratios the sensitivity scan tries. Unset: the lab's 0.4 ... 0.9, extended for fine-grained
    # studies to 0.95, 0.98, 0.99 as far as the lowest sampled size needs (see scan_grid).
    grid: list[float] | None = None
    tolerance: float = 5.0  # points of validation accuracy a layer may lose alone
    enqueue_allocation: bool = True  # the prior allocation (at the cap) is the first trial
    # One-shot rules whose allocations at the cap are enqueued next, so the search starts from the
    # best of them: uniform, global, lamp (fine-grained); uniform, tp_magnitude, tp_lamp, tp_bn_scale
    # (channel; tp_*: Torch-Pruning's global channel pruning, the 'pruning' extra). Default (unset):
    # lamp and global for fine-grained, uniform for channel; [] for none.
    warm_start: list[str] | None = None

    # Centred space (autoprune/space.py): sample each layer as a deviation from the best warm start
    # (by BatchNorm-recalibrated validation score at the cap), within a factor exp(spread) of its
    # kept fraction; false: anywhere in [0, upper bound].
    centre: bool = True
    spread: float = 0.693  # ln 2: a layer keeps between half and twice the centre's weights

    def scan_grid(self, kind: str, lowest_target: float) -> list[float]:
        """The scan's ratios: ``grid`` if set, else the lab's, extended so a target can be reached.

        A fine-grained target fraction s needs the large layers pruned beyond
        1 - s (the small, sensitive ones stay denser), so the grid runs to the
        first of 0.9, 0.95, 0.98, 0.99 at or above 1 - s / 2. Channel studies
        scan the lab's grid (a ratio near 1 leaves a narrow VGG no channel).
        """
        if self.grid is not None:
            return list(self.grid)
        grid = list(LAB_GRID)
        if kind == "fine_grained":
            for ratio in EXTENDED_GRID:
                if grid[-1] >= 1 - lowest_target / 2:
                    break
                grid.append(ratio)
        return grid

    def warm_start_rules(self, kind: str) -> list[str]:
        if self.warm_start is not None:
            return list(self.warm_start)
        return ["lamp", "global"] if kind == "fine_grained" else ["uniform"]


@dataclass
class FidelitySection:
    """Cheap scores and the multi-fidelity ladder (see autoprune/objective.py)."""

    bn_recal_batches: int = 4  # cheap score: BatchNorm stats recomputed on this many training batches; 0: off
    bn_recal_batch_size: int = 128
    ladder: bool = False  # rank cheaply; fine-tune only the promising (fine-grained studies only)
    promote_top: float = 0.5  # stage 1 -> 2: BN-recal score in this top fraction (at equal cost)
    full_top: float = 0.5  # stage 2 -> 3: accuracy after 1 epoch in this top fraction (at equal cost)
    warmup_trials: int = 4  # the first trials always climb the whole ladder
    # Screen many, fine-tune few: a trial scores this many candidates on its budget (the proposal and
    # perturbations of it) by BN recalibration and fine-tunes the best; 0 or 1: off.
    screen: int = 0
    screen_spread: float = 0.25  # perturbation: each layer's kept fraction times exp(N(0, spread))


@dataclass
class SelectSection:
    """How the pick survives noise (see autoprune/rescore.py)."""

    # At the end of a search the top_k feasible, fully fine-tuned trials (by first validation
    # score) are fine-tuned again with `seeds` other seeds; pick, export, report and the summary
    # rank by the re-scored mean. 0: off (rank by the first score, the maximum of noisy estimates).
    top_k: int = 5
    seeds: int = 2


@dataclass
class LatencySection:
    """How channel trials' latency is measured and predicted (see autoprune/latency.py)."""

    runtime: str = "torch"  # torch (eager) | onnxruntime (the exported ONNX model; the 'onnx' extra)
    # Intra-op threads, fixed for every measurement (a latency is only comparable at one count);
    # 0: one per CPU core this process may use.
    threads: int = 1
    batch_sizes: list[int] = field(default_factory=lambda: [1])  # latency_ms is at the first
    warmup: int = 10  # untimed runs per model before timing
    repeats: int = 50  # timed runs per model (the median is recorded, and the interquartile range)
    device: str = "cpu"  # cpu | cuda
    # Predict from a per-layer lookup table too (latency_predicted_ms, latency_prediction_error),
    # cached per machine, runtime, threads and batch in the dense-model cache folder.
    predict: bool = True


@dataclass
class StudyConfig:
    study: StudySection = field(default_factory=StudySection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    constraints: ConstraintsSection = field(default_factory=ConstraintsSection)
    pruning: PruningSection = field(default_factory=PruningSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    priors: PriorsSection = field(default_factory=PriorsSection)
    fidelity: FidelitySection = field(default_factory=FidelitySection)
    select: SelectSection = field(default_factory=SelectSection)
    latency: LatencySection = field(default_factory=LatencySection)
    source: str = ""  # the TOML file it came from

    # --- derived values -------------------------------------------------------

    @property
    def objectives(self) -> list[str]:
        return self.study.objectives or [("size" if self.study.kind == "fine_grained" else "macs"), "accuracy"]

    @property
    def cost_attr(self) -> str:
        """Trial attribute of the cost side of the front: size_fraction or macs_fraction."""
        costs = [o for o in self.objectives if o != "accuracy"]
        cost = costs[0] if costs else ("size" if self.study.kind == "fine_grained" else "macs")
        return f"{cost}_fraction"

    @property
    def latency_budget(self) -> bool:
        """A channel study with a latency cap: trials are repaired onto it by the predicted latency."""
        c = self.constraints
        return self.study.kind == "channel" and (c.max_latency_fraction is not None or c.max_latency_ms is not None)

    @property
    def budget_metric(self) -> str:
        """What trials are repaired onto: "macs" (channel studies with a MACs cap) or "params" (nonzero size)."""
        c = self.constraints
        return "macs" if self.study.kind == "channel" and c.max_macs_fraction is not None else "params"

    @property
    def budget_cap(self) -> float:
        """The cap of ``budget_metric``, a fraction of dense."""
        c = self.constraints
        return c.max_macs_fraction if self.budget_metric == "macs" else c.max_size_fraction

    @property
    def out_dir(self) -> Path:
        return Path(self.study.out_dir or f"reports/{self.study.name}")

    @property
    def latency_cache_dir(self) -> Path:
        """Per-layer latency tables, beside the dense-model cache (shared by studies; keyed per machine)."""
        return self.out_dir.parent / "cache" / "latency"

    @property
    def storage_url(self) -> str:
        return self.study.storage or f"sqlite:///{self.out_dir / 'study.db'}"

    def load_data(self):
        """The study's train / validation / test splits (autoprune.data.Data), on the CPU."""
        from .data import load_data

        d = self.data
        return load_data(d.spec, data_root=d.root or None, download=d.download, val_size=d.val_size or None,
                         seed=d.seed)

    def finetune_recipe(self):
        """The trials' fine-tune as an autoprune.train.TrainConfig (seeded by the study seed).

        The distillation values ride along; whether a teacher is used is ``[finetune] distill``
        (autoprune.objective.finetune passes the dense model).
        """
        from .train import TrainConfig

        ft = self.finetune
        return TrainConfig(epochs=ft.epochs, lr=ft.lr, momentum=ft.momentum, weight_decay=ft.weight_decay,
                           batch_size=ft.batch_size, seed=self.study.seed,
                           distill_temperature=ft.distill_temperature, distill_weight=ft.distill_weight)

    def accuracy_floor(self, dense_val_accuracy: float) -> float:
        """The accuracy constraint in percent, absolute or relative to dense."""
        c = self.constraints
        if c.max_accuracy_drop is not None:
            return dense_val_accuracy - c.max_accuracy_drop
        return 92.5 if c.min_accuracy is None else c.min_accuracy

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StudyConfig":
        """Rebuild a config from :meth:`to_dict` output (a study's ``config`` user attr).

        Keys this version does not know are ignored (a study written by a newer
        autoprune still opens); missing keys take their defaults.
        """
        if not isinstance(d, dict):
            raise AutopruneError(f"a study config must be a dict, got {type(d).__name__}")
        sections = {}
        for name, section_cls in _TABLES.items():
            table = d.get(name) or {}
            if not isinstance(table, dict):
                raise AutopruneError(f"[{name}] in the study's stored config must be a table, got {_toml(table)}")
            known = _hints(section_cls)
            sections[name] = section_cls(**{k: v for k, v in table.items() if k in known})
        config = cls(**sections, source=str(d.get("source") or ""))
        return config.check_types("the study's stored config")

    def check_types(self, where: str = "") -> "StudyConfig":
        """Every value against its field's type (floats finite); ``where`` (default: the source) ends the error."""
        where = where or self.source
        for name, section_cls in _TABLES.items():
            section = getattr(self, name)
            for key, hint in _hints(section_cls).items():
                value = getattr(section, key)
                if not _fits(value, hint):
                    raise AutopruneError(f"[{name}] {key} must be {_wanted(hint)}, got {_toml(value)} "
                                         f"({_why(value, hint)})" + (f" in {where}" if where else ""))
        return self

    def validate(self) -> "StudyConfig":
        """Types, then every name, number and combination, before any work starts."""
        self.check_types()
        s, c, f = self.study, self.constraints, self.finetune
        if not STUDY_NAME.fullmatch(s.name):
            raise AutopruneError(f"study name {s.name!r} cannot be a folder name: use 1 to 100 letters, digits, '.', "
                                 f"'_' or '-', not starting with '.' ([study] name or --study-name)")
        if s.kind not in ("fine_grained", "channel"):
            raise AutopruneError(f"[study] kind must be fine_grained or channel, got {s.kind!r}")
        if s.sampler not in SAMPLERS:
            raise AutopruneError(f"[study] sampler must be one of {', '.join(SAMPLERS)}, got {s.sampler!r}")
        bad = [o for o in self.objectives if o not in OBJECTIVES]
        if bad or not 1 <= len(self.objectives) <= 2 or "accuracy" not in self.objectives:
            raise AutopruneError(
                f"[study] objectives must be ['accuracy'] or a cost (size, macs or latency) with 'accuracy', "
                f"got {self.objectives}"
            )
        if s.kind == "fine_grained" and "macs" in self.objectives:
            raise AutopruneError("[study] fine-grained pruning leaves dense MACs unchanged; use objectives "
                                 "['size', 'accuracy']")
        if s.kind == "fine_grained" and "latency" in self.objectives:
            raise AutopruneError("[study] fine-grained pruning leaves dense latency unchanged (zeros do not make a "
                                 "dense kernel faster); use objectives ['size', 'accuracy'] or kind = \"channel\"")
        from .data import MAX_SEED

        m, d, fi, p = self.model, self.data, self.fidelity, self.priors
        m.check()
        ranges = [  # (table, key, ok, rule); types (and finiteness) are checked above
            ("study", "trials", s.trials >= 1, ">= 1"),
            ("study", "seed", 0 <= s.seed <= MAX_SEED, f"in [0, {MAX_SEED}]"),
            ("study", "budget_low", 0 < s.budget_low <= 1, "in (0, 1]"),
            ("study", "heartbeat_seconds", s.heartbeat_seconds >= 1, ">= 1"),
            ("model", "width", m.width > 0, "> 0"),
            ("model", "num_classes", m.num_classes >= 2, ">= 2"),
            ("model", "train_epochs", m.train_epochs >= 1, ">= 1"),
            ("data", "val_size", d.val_size >= 0, ">= 0 (0: the default)"),
            ("data", "seed", 0 <= d.seed <= MAX_SEED, f"in [0, {MAX_SEED}]"),
            ("constraints", "max_size_fraction", 0 < c.max_size_fraction <= 1, "in (0, 1]"),
            ("finetune", "epochs", f.epochs >= 1, ">= 1"),
            ("finetune", "batch_size", f.batch_size >= 1, ">= 1"),
            ("finetune", "lr", f.lr > 0, "> 0"),
            ("finetune", "momentum", 0 <= f.momentum < 1, "in [0, 1)"),
            ("finetune", "weight_decay", f.weight_decay >= 0, ">= 0"),
            ("finetune", "early_stop_margin", f.early_stop_margin >= 0, ">= 0 points"),
            ("finetune", "distill_temperature", f.distill_temperature > 0, "> 0"),
            ("finetune", "distill_weight", 0 <= f.distill_weight <= 1, "in [0, 1]"),
            ("priors", "tolerance", p.tolerance >= 0, ">= 0 points"),
            ("priors", "spread", 0 < p.spread <= 5, "in (0, 5] (log kept fraction)"),
            ("fidelity", "bn_recal_batches", fi.bn_recal_batches >= 0, ">= 0"),
            ("fidelity", "bn_recal_batch_size", fi.bn_recal_batch_size >= 1, ">= 1"),
            ("fidelity", "warmup_trials", fi.warmup_trials >= 0, ">= 0"),
            ("fidelity", "promote_top", 0 < fi.promote_top <= 1, "a fraction in (0, 1]"),
            ("fidelity", "full_top", 0 < fi.full_top <= 1, "a fraction in (0, 1]"),
            ("select", "top_k", 0 <= self.select.top_k <= 1000, "in [0, 1000] (0: off)"),
            ("select", "seeds", 1 <= self.select.seeds <= 100, "in [1, 100]"),
            ("fidelity", "screen", fi.screen >= 0, ">= 0 (0 or 1: off)"),
            ("fidelity", "screen_spread", 0 < fi.screen_spread <= 2, "in (0, 2]"),
            ("latency", "threads", 0 <= self.latency.threads <= 1024, "in [0, 1024] (0: one per CPU core)"),
            ("latency", "warmup", 0 <= self.latency.warmup <= 10_000, "in [0, 10000]"),
            ("latency", "repeats", 1 <= self.latency.repeats <= 100_000, "in [1, 100000]"),
            ("latency", "batch_sizes", bool(self.latency.batch_sizes) and all(
                1 <= b <= 4096 for b in self.latency.batch_sizes), "a non-empty list of integers in [1, 4096]"),
        ]
        for table, key, ok, rule in ranges:
            if not ok:
                raise AutopruneError(f"[{table}] {key} must be {rule}, got {getattr(getattr(self, table), key)}")
        if c.min_accuracy is not None and c.max_accuracy_drop is not None:
            raise AutopruneError("[constraints] set min_accuracy or max_accuracy_drop, not both")
        if c.min_accuracy is not None and not 0 <= c.min_accuracy <= 100:
            raise AutopruneError(f"[constraints] min_accuracy is a percentage in [0, 100], got {c.min_accuracy}")
        if c.max_accuracy_drop is not None and not 0 <= c.max_accuracy_drop <= 100:
            raise AutopruneError(f"[constraints] max_accuracy_drop must be in [0, 100] points, got {c.max_accuracy_drop}")
        if c.max_macs_fraction is not None and not 0 < c.max_macs_fraction <= 1:
            raise AutopruneError(f"[constraints] max_macs_fraction must be in (0, 1], got {c.max_macs_fraction}")
        if c.max_latency_ms is not None and not c.max_latency_ms > 0:
            raise AutopruneError(f"[constraints] max_latency_ms must be > 0, got {c.max_latency_ms}")
        if c.max_latency_fraction is not None and not 0 < c.max_latency_fraction <= 1:
            raise AutopruneError(f"[constraints] max_latency_fraction is a fraction of the dense model's latency "
                                 f"in (0, 1], got {c.max_latency_fraction}")
        latency_caps = [k for k in ("max_latency_fraction", "max_latency_ms") if getattr(c, k) is not None]
        if len(latency_caps) == 2:
            raise AutopruneError("[constraints] set max_latency_fraction or max_latency_ms, not both (one latency "
                                 "budget is repaired onto)")
        if latency_caps and s.kind != "channel":
            raise AutopruneError(f"[constraints] {latency_caps[0]} needs kind = \"channel\": fine-grained pruning "
                                 f"keeps dense shapes, so its latency does not change; drop {latency_caps[0]}")
        if latency_caps and not self.latency.predict:
            raise AutopruneError(f"[constraints] {latency_caps[0]} is repaired before fine-tuning by the predicted "
                                 f"latency: set [latency] predict = true")
        from .channel import ROUND_TO_MAX

        if not 1 <= self.pruning.round_to <= ROUND_TO_MAX:
            raise AutopruneError(f"[pruning] round_to must be in [1, {ROUND_TO_MAX}] (1: the lab's rounding), got "
                                 f"{self.pruning.round_to}")
        if self.pruning.round_to > 1 and s.kind != "channel":
            raise AutopruneError("[pruning] round_to rounds kept channels: it needs kind = \"channel\"; leave it 1 "
                                 "for fine-grained studies")
        if fi.ladder and fi.bn_recal_batches == 0:
            raise AutopruneError("[fidelity] ladder needs the cheap score: set bn_recal_batches >= 1")
        if fi.screen > 1 and fi.bn_recal_batches == 0:
            raise AutopruneError("[fidelity] screen scores candidates by BN recalibration: set bn_recal_batches >= 1")
        if self.priors.grid is not None and not (self.priors.grid and all(0 < g < 1 for g in self.priors.grid)):
            raise AutopruneError(f"[priors] grid must be ratios in (0, 1), got {self.priors.grid}")
        self.check_latency()
        from .priors import ONE_SHOT_RULES, one_shot_rule

        rules = ONE_SHOT_RULES[s.kind]
        bad = [r for r in self.priors.warm_start_rules(s.kind) if r not in rules]
        if bad:
            raise AutopruneError(f"[priors] warm_start: unknown rule {bad[0]!r} for {s.kind} pruning; "
                                 f"use some of {', '.join(rules)}")
        try:  # a missing optional extra is refused now, not after the dense model and the scan
            for rule in self.priors.warm_start_rules(s.kind):
                if (check := one_shot_rule(rule, s.kind).check) is not None:
                    check()
        except AutopruneError as exc:
            raise AutopruneError(f"[priors] warm_start: {exc}") from None
        return self

    def check_latency(self) -> None:
        """[latency]: a known runtime and device; for a channel study (the one that measures) installed."""
        from .latency import DEVICES, get_runtime

        lat = self.latency
        try:
            get_runtime(lat.runtime, check=self.study.kind == "channel")
        except AutopruneError as exc:
            raise AutopruneError(f"[latency] runtime: {exc}") from None
        if lat.device not in DEVICES:
            raise AutopruneError(f"[latency] device must be one of {', '.join(DEVICES)}, got {lat.device!r}")
        if lat.device == "cuda" and self.study.kind == "channel":
            import torch

            if not torch.cuda.is_available():
                raise AutopruneError("[latency] device cuda: this machine has no CUDA device; set device = \"cpu\"")


# A study name becomes the folder reports/<name>/ and its sqlite:///reports/<name>/study.db.
STUDY_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
_TABLES = {f.name: type(f.default_factory()) for f in dataclasses.fields(StudyConfig) if f.name != "source"}


@functools.cache
def _hints(cls) -> dict:
    """A section's field types (the annotations are strings under ``from __future__ import annotations``)."""
    return typing.get_type_hints(cls)


def _fits(value, hint) -> bool:
    if hint is bool or hint is str or hint is type(None):
        return isinstance(value, hint)
    if hint is int or hint is float:  # a TOML integer is a fine float; a boolean is neither
        kinds = int if hint is int else (int, float)
        return isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_fits(v, typing.get_args(hint)[0]) for v in value)
    if hint is dict:  # a source's options: their own check is the source's (autoprune.sources)
        return isinstance(value, dict)
    if isinstance(hint, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    raise TypeError(f"no check for field type {hint}")  # a field added with a new type: add it above


def _wanted(hint) -> str:
    if typing.get_origin(hint) is list:
        return "a list of " + {float: "finite numbers", int: "integers"}.get(typing.get_args(hint)[0], "strings")
    if isinstance(hint, types.UnionType):  # X | None: TOML has no null, so just X
        return " or ".join(_wanted(h) for h in typing.get_args(hint) if h is not type(None))
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
            dict: "a table"}[hint]


def _toml(value) -> str:
    """``value`` as written in TOML, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml, value)) + "]"
    return repr(value)


def _why(value, hint) -> str:
    """What is wrong with ``value``: its TOML type, "not finite", or what its first odd item is."""
    lists = [h for h in (hint, *typing.get_args(hint)) if typing.get_origin(h) is list]
    if isinstance(value, list) and lists:
        odd = next(v for v in value if not _fits(v, typing.get_args(lists[0])[0]))
        return f"{_toml(odd)} is {_why(odd, None)}"
    if isinstance(value, float) and not math.isfinite(value):
        return "not finite"
    for kind, noun in ((bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"),
                       (list, "an array"), (dict, "a table"), (type(None), "unset")):
        if isinstance(value, kind):
            return noun
    return type(value).__name__


def _section(name: str, cls, table, where: str):
    if not isinstance(table, dict):
        raise AutopruneError(f"[{name}] in {where} must be a table")
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in table:
        if key not in valid:
            raise AutopruneError(f"unknown key {key!r} in [{name}] of {where}; valid keys: {', '.join(valid)}")
    try:
        return cls(**table)
    except TypeError as exc:
        raise AutopruneError(f"[{name}] in {where}: {exc}") from None


def _resolve(base: Path, value: str) -> str:
    return value if not value or Path(value).is_absolute() else str((base / value).resolve())


def _resolve_storage(base: Path, url: str) -> str:
    """A ``sqlite:///PATH`` or ``journal:PATH`` URL with a relative PATH made absolute against ``base``."""
    for prefix in ("sqlite:///", "journal:"):
        if url.startswith(prefix) and url[len(prefix):] not in ("", ":memory:"):
            return prefix + _resolve(base, url[len(prefix):])
    return url


def config_from_tables(raw: dict, where: str) -> StudyConfig:
    """A config from TOML-like tables (``{"study": {...}, ...}``), every key and type checked (not yet
    :meth:`StudyConfig.validate`); ``where`` names the origin in errors."""
    for key in raw:
        if key not in _TABLES:
            raise AutopruneError(f"unknown table [{key}] in {where}; valid tables: {', '.join(_TABLES)}")
    sections = {name: _section(name, cls, raw.get(name, {}), where) for name, cls in _TABLES.items()}
    return StudyConfig(**sections, source=where).check_types()


def load_config(path: str | Path, **overrides) -> StudyConfig:
    """Read a study TOML file; ``overrides`` set ``[study]`` keys (e.g. trials=12)."""
    path = Path(path)
    if not path.is_file():
        raise AutopruneError(f"study config not found: {path}; pass a TOML file such as studies/demo.toml")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise AutopruneError(f"{path} is not valid TOML: {exc}") from None
    config = config_from_tables(raw, str(path))
    base = path.resolve().parent
    d = config.data
    if d.spec.startswith("npz:"):
        d.spec = "npz:" + _resolve(base, d.spec[4:])
    d.root = _resolve(base, d.root)
    config.model.checkpoint = _resolve(base, config.model.checkpoint)
    config.study.storage = _resolve_storage(base, config.study.storage)
    for key, value in overrides.items():  # after resolving: a --storage path stays relative to the cwd
        if value is not None:
            setattr(config.study, key, value)
    return config.validate()
