"""Deployment latency: runtimes, measurement, ONNX export and a per-layer lookup-table predictor.

* Runtimes are a registry (:data:`RUNTIMES`, :func:`register`): ``torch``
  (eager) and ``onnxruntime`` (the model exported to ONNX, run by ONNX
  Runtime; the ``onnx`` extra). A runtime turns a model and an input shape into
  a session whose ``run()`` does one forward pass at a fixed thread count; a
  new runtime is one class and one :func:`register` call.
* :func:`measure` times several models in one run: warm-up, then repeats
  interleaved model by model, so load that drifts during the run hits each of
  them alike; per batch size the median and the interquartile range.
  :class:`Meter` does this for a channel trial with the dense model beside it,
  so every trial records the latency ratio measured side by side.
* :class:`LatencyTable` sums a config's layers, the NetAdapt / HALP way: each
  layer shape is timed once alone on the target runtime and cached in a JSON
  file keyed by machine, runtime (and version), threads, batch size and
  device; a config's sum is the per-call overhead (a near-empty model on the
  same runtime) plus each layer's time less that overhead. Layers come from the
  architecture dict (``model.arch()``, ``sources.arch_of``), so a plan is
  predicted without building the pruned model: the lab's VGG from its conv
  widths (3x3 conv + BatchNorm + ReLU (+ max pool) entries, and the pooled
  linear head), any other model by tracing its skeleton on the meta device
  (one entry per conv or linear call, the conv alone).
* :class:`LatencyFit` turns table sums into latency: measured = fixed_ms +
  scale * table sum + element_ns * activation elements, fitted at setup through
  the dense model and near its uniform 0.25 / 0.5 / 0.75 prunes measured side by
  side, every part >= 0. The fixed part (dispatch, the runtime's per-call work)
  does not shrink with the widths, and is a large share of a narrow model; the
  activation part is the work outside the timed layers that scales with channels
  x pixels, not MACs (a traced model's BatchNorms, activations, residual adds).
  :class:`PredictedFraction` (the latency budget's cost over any
  :class:`autoprune.budget.CostModel`) and the trials' ``latency_predicted_ms``
  (:func:`calibrated_ms`) use that one rule, as shares of the dense model's latency.
* :func:`onnx_export` writes the ONNX file an export ships, checked against
  torch's outputs with ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from .errors import AutopruneError
from .files import atomic_write

log = logging.getLogger("autoprune")

ONNX_EXTRA = "pip install 'autoprune[onnx]'"
ONNX_MODULES = ("onnx", "onnxruntime")
ONNX_OPSET = 17
ONNX_TOLERANCE = 1e-4  # largest |ONNX Runtime - torch| output difference an export accepts
INPUT_SHAPE = (3, 32, 32)  # one CIFAR image
DEVICES = ("cpu", "cuda")
TABLE_FORMAT = 1


def missing_modules(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def need_onnx(what: str) -> None:
    """Refuse ``what`` in one line when the ``onnx`` extra is not installed."""
    missing = missing_modules(ONNX_MODULES)
    if missing:
        raise AutopruneError(f"{what} needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                             f"not installed; {ONNX_EXTRA}")


def resolve_threads(threads: int) -> int:
    """``threads``, or for 0 one per CPU core this process may use."""
    if threads:
        return int(threads)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# --- ONNX ----------------------------------------------------------------------


def to_onnx(model: nn.Module, input_shape: tuple[int, ...]) -> bytes:
    """``model`` (eval mode, on the CPU) as ONNX bytes with a dynamic batch axis; weights inline."""
    need_onnx("ONNX export")
    model = copy.deepcopy(model).cpu().eval()
    x = torch.zeros(2, *input_shape[1:])
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation notices are not the user's concern
        try:
            # The TorchScript-based exporter: ~0.1 s a layer where the dynamo one takes seconds, which
            # matters when a lookup table exports every new layer shape.
            torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=ONNX_OPSET, input_names=["input"],
                              output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
            return buf.getvalue()
        except Exception as exc:  # a torch whose legacy exporter is gone or fails on this model
            log.debug("TorchScript-based ONNX export failed (%s); trying the dynamo exporter", exc)
        try:
            program = torch.onnx.export(model, (x,), dynamo=True, verbose=False, opset_version=ONNX_OPSET,
                                        input_names=["input"], output_names=["output"],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
            return program.model_proto.SerializeToString()
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise AutopruneError(f"torch cannot export this model to ONNX: {reason[:160]}; please report "
                                 f"this") from None


def onnx_session(data: bytes, threads: int = 1, device: str = "cpu"):
    """An ONNX Runtime inference session at a fixed thread count, fully optimised, errors only logged."""
    need_onnx("the onnxruntime runtime")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = resolve_threads(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise AutopruneError("ONNX Runtime here has no CUDA provider; pip install onnxruntime-gpu, or measure on "
                             "the cpu device")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    return ort.InferenceSession(data, options, providers=providers)


def onnx_max_difference(data: bytes, model: nn.Module, batch_size: int = 2, seed: int = 0) -> float:
    """Largest |ONNX Runtime - torch| over the outputs for a seeded random batch of the model's input shape."""
    x = torch.randn(batch_size, *input_shape_of(model), generator=torch.Generator().manual_seed(seed))
    model = copy.deepcopy(model).cpu().eval()
    session = onnx_session(data)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    if got.shape != want.shape:
        raise AutopruneError(f"the ONNX export gives outputs of shape {list(got.shape)}, torch "
                             f"{list(want.shape)}; please report this")
    return float(np.abs(got - want).max())


def onnx_export(model: nn.Module, atol: float = ONNX_TOLERANCE) -> tuple[bytes, dict]:
    """``model`` as ONNX bytes, checked: ONNX Runtime's outputs within ``atol`` of torch's (batches 1 and 3), on
    its input shape (:func:`input_shape_of`: a CIFAR image unless its arch records another)."""
    shape = input_shape_of(model)
    data = to_onnx(model, (1, *shape))
    diff = max(onnx_max_difference(data, model, batch_size=b) for b in (1, 3))
    if not diff <= atol:
        raise AutopruneError(f"the ONNX export differs from the model by {diff:g} (more than {atol:g}); please "
                             f"report this")
    import onnxruntime

    return data, {"written": True, "opset": ONNX_OPSET, "max_abs_difference": diff, "tolerance": atol,
                  "onnxruntime": onnxruntime.__version__,
                  "input": f"input: float32 [batch, {', '.join(str(d) for d in shape)}]"}


# --- runtimes ------------------------------------------------------------------


class Runtime:
    """A way to run a model: subclasses give ``name``, the modules they need and :meth:`session`."""

    name = ""
    needs: tuple[str, ...] = ()  # importable modules; a missing one is refused by check()
    extra = ""  # how to install them

    def check(self) -> None:
        missing = missing_modules(self.needs)
        if missing:
            raise AutopruneError(f"latency runtime {self.name!r} needs {' and '.join(missing)}, which "
                                 f"{'is' if len(missing) == 1 else 'are'} not installed; {self.extra}")

    def version(self) -> str:
        raise NotImplementedError

    def session(self, model: nn.Module, input_shape: tuple[int, ...], threads: int,
                device: str = "cpu") -> contextlib.AbstractContextManager[Callable[[], object]]:
        """A context whose value runs one forward pass of ``model`` on a fixed input of ``input_shape``."""
        raise NotImplementedError


class TorchRuntime(Runtime):
    name = "torch"

    def version(self) -> str:
        return torch.__version__

    @contextlib.contextmanager
    def session(self, model, input_shape, threads, device="cpu") -> Iterator[Callable[[], object]]:
        if device == "cuda" and not torch.cuda.is_available():
            raise AutopruneError("latency device cuda: this machine has no CUDA device; measure on the cpu")
        net = copy.deepcopy(model).to(device).eval()  # a copy: the caller's model stays where it is
        x = torch.zeros(*input_shape, device=device)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        before = torch.get_num_threads()
        torch.set_num_threads(resolve_threads(threads))  # process-wide: restored on exit
        try:
            with torch.inference_mode():
                def run():
                    out = net(x)
                    sync()
                    return out

                yield run
        finally:
            torch.set_num_threads(before)


class OnnxRuntime(Runtime):
    name = "onnxruntime"
    needs = ONNX_MODULES
    extra = ONNX_EXTRA

    def version(self) -> str:
        import onnxruntime

        return onnxruntime.__version__

    @contextlib.contextmanager
    def session(self, model, input_shape, threads, device="cpu") -> Iterator[Callable[[], object]]:
        session = onnx_session(to_onnx(model, input_shape), threads, device)
        feed = {session.get_inputs()[0].name: np.zeros(input_shape, dtype=np.float32)}
        yield lambda: session.run(None, feed)


RUNTIMES: dict[str, Runtime] = {}


def register(runtime: Runtime) -> Runtime:
    RUNTIMES[runtime.name] = runtime
    return runtime


register(TorchRuntime())
register(OnnxRuntime())


def get_runtime(name: str, check: bool = True) -> Runtime:
    """The registered runtime ``name`` (its modules checked), or a one-line error naming the choices."""
    if not isinstance(name, str) or name not in RUNTIMES:
        raise AutopruneError(f"unknown latency runtime {name!r}; choose one of {', '.join(RUNTIMES)}")
    runtime = RUNTIMES[name]
    if check:
        runtime.check()
    return runtime


# --- measurement ---------------------------------------------------------------


def summarize(samples_ms: list[float]) -> dict:
    """Median and spread of timed runs (milliseconds): quartiles by statistics.quantiles' default method."""
    if not samples_ms:
        raise ValueError("no samples")
    q1, _, q3 = statistics.quantiles(samples_ms, n=4) if len(samples_ms) > 1 else (samples_ms[0],) * 3
    return {"median_ms": statistics.median(samples_ms), "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1,
            "min_ms": min(samples_ms), "max_ms": max(samples_ms), "repeats": len(samples_ms)}


def time_runs(runs: dict[str, Callable[[], object]], warmup: int, repeats: int,
              clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Milliseconds per run of each callable: ``warmup`` untimed runs each, then ``repeats`` rounds that run
    every callable once in turn (interleaved: drift in the machine's load hits each alike)."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = clock()
            run()
            samples[name].append(1000.0 * (clock() - start))
    return samples


def measure(models: dict[str, nn.Module], *, runtime: str = "torch", threads: int = 1,
            batch_sizes: tuple[int, ...] | list[int] = (1,), warmup: int = 10, repeats: int = 50,
            device: str = "cpu", clock: Callable[[], float] = time.perf_counter,
            input_shape: Sequence[int] = INPUT_SHAPE) -> dict[str, dict[int, dict]]:
    """Latency of each model on inputs of ``input_shape`` (one example: C, H, W), measured side by side:
    ``{name: {batch_size: summarize(...)}}``."""
    rt = get_runtime(runtime)
    out: dict[str, dict[int, dict]] = {name: {} for name in models}
    for b in batch_sizes:
        with contextlib.ExitStack() as stack:
            runs = {name: stack.enter_context(rt.session(m, (int(b), *input_shape), threads, device))
                    for name, m in models.items()}
            for name, samples in time_runs(runs, warmup, repeats, clock).items():
                out[name][int(b)] = summarize(samples)
    return out


# --- the lookup-table predictor ------------------------------------------------


class _Head(nn.Module):
    """The VGG's head: global average pooling, then the linear layer."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.fc = nn.Linear(in_features, out_features)

    def forward(self, x):
        return self.fc(x.mean([2, 3]))


@dataclass(frozen=True)
class Layer:
    """One entry of the table: a layer shape, timed alone at its place's input size."""

    kind: str  # conv (3x3 conv + BatchNorm + ReLU), head (mean pool + linear), overhead (one ReLU)
    in_channels: int
    out_channels: int
    size: int  # input height = width
    pool: bool = False  # a 2x2 max pool follows (conv)

    @property
    def key(self) -> str:
        if self.kind == "conv":
            return f"conv3x3 {self.in_channels}->{self.out_channels} @{self.size}" + (" +pool" if self.pool else "")
        if self.kind == "head":
            return f"head {self.in_channels}->{self.out_channels} @{self.size}"
        return f"overhead {self.in_channels}x{self.size}x{self.size}"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.size, self.size)

    @property
    def out_elements(self) -> int:
        """The conv's output elements for one example (before its pool); the head's logits."""
        return self.out_channels * self.size * self.size if self.kind == "conv" else self.out_channels

    def module(self) -> nn.Module:
        if self.kind == "conv":
            parts = [nn.Conv2d(self.in_channels, self.out_channels, 3, padding=1, bias=False),
                     nn.BatchNorm2d(self.out_channels), nn.ReLU(inplace=True)]
            return nn.Sequential(*parts, *([nn.MaxPool2d(2)] if self.pool else [])).eval()
        if self.kind == "head":
            return _Head(self.in_channels, self.out_channels).eval()
        return nn.ReLU().eval()


def vgg_layers(arch: dict) -> list[Layer]:
    """The lab's VGG as table entries, from its conv widths (``arch['channels']``)."""
    from .model import VGG_PLAN

    layers: list[Layer] = []
    widths = iter(arch["channels"])
    c, size = INPUT_SHAPE[0], INPUT_SHAPE[1]
    for v in VGG_PLAN:
        if v == "M":
            layers[-1] = dataclasses.replace(layers[-1], pool=True)
            size //= 2
            continue
        out = int(next(widths))
        layers.append(Layer("conv", c, out, size))
        c = out
    return layers + [Layer("head", c, int(arch["num_classes"]), size)]


def _dims(v) -> str:
    return v if isinstance(v, str) else "x".join(str(int(d)) for d in v)


@dataclass(frozen=True)
class Conv:
    """A traced conv call (any model but the lab's VGG), timed alone: its norm and activation, like the rest of
    the forward pass between the timed layers, are what :class:`LatencyFit` absorbs."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    bias: bool
    size: tuple[int, ...]  # the input's spatial size (H, W for a 2-d conv)
    padding_mode: str = "zeros"

    @property
    def key(self) -> str:
        return (f"conv{len(self.size)}d {self.in_channels}->{self.out_channels} k{_dims(self.kernel)} "
                f"s{_dims(self.stride)} p{_dims(self.padding)} d{_dims(self.dilation)} g{self.groups}"
                + (" bias" if self.bias else "") + ("" if self.padding_mode == "zeros" else f" {self.padding_mode}")
                + f" @{_dims(self.size)}")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.in_channels, *self.size)

    @property
    def out_elements(self) -> int:
        """The output's elements for one example: what the norm, activation and adds after it work through."""
        n = self.out_channels
        for i, size in enumerate(self.size):
            k, stride, dilation = self.kernel[i], self.stride[i], self.dilation[i]
            if isinstance(self.padding, str):  # "same" keeps the size (stride 1); "valid" pads nothing
                pad = dilation * (k - 1) / 2 if self.padding == "same" else 0
            else:
                pad = self.padding[i]
            n *= int((size + 2 * pad - dilation * (k - 1) - 1) // stride + 1)
        return n

    def module(self) -> nn.Module:
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(self.size) - 1]
        return conv(self.in_channels, self.out_channels, self.kernel, self.stride, self.padding, self.dilation,
                    self.groups, self.bias, self.padding_mode).eval()


@dataclass(frozen=True)
class Linear:
    """A traced linear call, timed alone on its input's shape (one example: (..., in_features))."""

    in_features: int
    out_features: int
    bias: bool
    shape: tuple[int, ...]

    @property
    def key(self) -> str:
        return f"linear {self.in_features}->{self.out_features}" + (" bias" if self.bias else "") + \
            f" @{_dims(self.shape)}"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.shape

    @property
    def out_elements(self) -> int:
        return self.out_features * math.prod(self.shape[:-1])

    def module(self) -> nn.Module:
        return nn.Linear(self.in_features, self.out_features, self.bias).eval()


TRACED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # the layers a traced model's entries are


def trace_layers(model: nn.Module, input_size: Sequence[int], device: str = "meta") -> list[Conv | Linear]:
    """Every conv and linear call of ``model`` on one zero example of ``input_size`` (C, H, W), in call order (a
    layer called twice is two entries). On the meta device nothing is computed: shapes only."""
    found: list[Conv | Linear] = []

    def hook(m, args, out):
        x = args[0]
        if isinstance(m, nn.Linear):
            found.append(Linear(m.in_features, m.out_features, m.bias is not None, tuple(x.shape[1:])))
        else:
            found.append(Conv(m.in_channels, m.out_channels, tuple(m.kernel_size), tuple(m.stride),
                              m.padding if isinstance(m.padding, str) else tuple(m.padding), tuple(m.dilation),
                              m.groups, m.bias is not None, tuple(x.shape[2:]), m.padding_mode))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, TRACED)]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return found


@lru_cache(maxsize=1024)  # a budget's bisection asks for few distinct widths; each costs a trace
def _traced(arch_json: str) -> tuple:
    from .sources import INPUT_SIZE, from_arch

    arch = json.loads(arch_json)
    # The caller holds this model (or its cost model): its source's code is imported in this process already.
    model = from_arch(arch, trusted_source=arch["source"], device="meta")
    return tuple(trace_layers(model, arch.get("input_size", INPUT_SIZE)))


def traced_layers(arch: dict) -> list[Conv | Linear]:
    """A graph model's entries from its arch (``source``, ..., ``widths``): the skeleton rebuilt on the meta
    device (:func:`autoprune.sources.from_arch`, no weights) and traced; memoised per arch."""
    return list(_traced(json.dumps(arch, sort_keys=True)))


LAYERS: dict[str, Callable[[dict], list[Layer]]] = {"vgg": vgg_layers}  # the lab's layouts, by arch name


def layers_of(arch: dict | nn.Module) -> list:
    """A model's table entries, from the model or its arch dict: the lab's VGG by its layout (:data:`LAYERS`),
    a model of any other source (an arch with ``source``) traced (:func:`traced_layers`)."""
    if isinstance(arch, nn.Module):
        from .model import arch_of

        arch = arch_of(arch)
    if "source" in arch:
        return traced_layers(arch)
    name = arch.get("name", "vgg")
    if name not in LAYERS:
        raise AutopruneError(f"no latency table layout for model {name!r}; known: {', '.join(LAYERS)}")
    return LAYERS[name](arch)


def activation_elements(arch: dict | nn.Module) -> int:
    """The output elements of a model's table entries for one example: the work that BatchNorm, activations,
    residual adds and pools do scales with these (channels x pixels), not with the convs' MACs."""
    return sum(layer.out_elements for layer in layers_of(arch))


def input_shape_of(model: nn.Module) -> tuple[int, ...]:
    """One example's shape (C, H, W): the arch's ``input_size``, else one CIFAR image."""
    from .model import ARCH_ATTR

    arch = getattr(model, ARCH_ATTR, None)  # the lab's VGG has none: CIFAR
    return tuple(int(v) for v in arch.get("input_size", INPUT_SHAPE)) if isinstance(arch, dict) else INPUT_SHAPE


def machine() -> dict:
    """What identifies this machine's timings: host, CPU model and count, OS."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"host": platform.node(), "cpu": cpu, "cpus": os.cpu_count(), "system": platform.system(),
            "arch": platform.machine()}


class LatencyTable:
    """Per-layer latencies on one runtime, threads, batch size and device, cached per machine.

    ``cache_dir`` None keeps the table in memory. The file's name carries a hash of
    :meth:`key`, so a different runtime (or version), thread count, batch size,
    device or machine reads and writes another file. ``timed`` counts the layers
    this object timed (not read from the cache).
    """

    def __init__(self, runtime: str = "torch", threads: int = 1, batch_size: int = 1, device: str = "cpu",
                 cache_dir: str | os.PathLike | None = None, warmup: int = 10, repeats: int = 50,
                 clock: Callable[[], float] = time.perf_counter):
        self.runtime = get_runtime(runtime)
        self.threads, self.batch_size, self.device = resolve_threads(threads), int(batch_size), device
        self.warmup, self.repeats, self.clock = warmup, repeats, clock
        self.timed = 0
        self._unsaved = False
        self.entries: dict[str, dict] = {}
        self._key = {"format": TABLE_FORMAT, "machine": machine(), "runtime": self.runtime.name,
                     "runtime_version": self.runtime.version(), "torch": torch.__version__, "threads": self.threads,
                     "batch_size": self.batch_size, "device": self.device}
        digest = hashlib.sha256(json.dumps(self._key, sort_keys=True).encode()).hexdigest()[:12]
        self.path = (Path(cache_dir) / f"{self.runtime.name}-{device}-t{self.threads}-b{self.batch_size}-{digest}.json"
                     if cache_dir is not None else None)
        self.entries.update(self._read())

    def key(self) -> dict:
        """Everything a timing depends on; a table is reused only where all of it matches."""
        return dict(self._key)

    def _read(self) -> dict:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            stored = json.loads(self.path.read_text())
            if stored.get("key") == self.key() and isinstance(stored.get("entries"), dict):
                return {k: v for k, v in stored["entries"].items() if isinstance(v, dict) and "median_ms" in v}
        except (OSError, ValueError, AttributeError):
            pass
        log.warning("latency table %s is unreadable or for another setup; timing afresh", self.path)
        return {}

    def save(self) -> None:
        """Merge into the cache file (another worker may have added entries meanwhile), whole or not at all."""
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.entries = {**self._read(), **self.entries}
            atomic_write(self.path, json.dumps({"key": self.key(), "entries": self.entries}, indent=1,
                                               sort_keys=True) + "\n")
            self._unsaved = False
        except OSError as exc:  # a cache that cannot be written costs time, not correctness
            log.warning("cannot write the latency table %s: %s", self.path, exc.strerror or exc)

    def ms(self, layer: Layer) -> float:
        """The layer's median time alone, from the table or timed now (and added)."""
        if layer.key not in self.entries:
            shape = (self.batch_size, *layer.input_shape)
            with self.runtime.session(layer.module(), shape, self.threads, self.device) as run:
                samples = time_runs({"layer": run}, self.warmup, self.repeats, self.clock)["layer"]
            self.entries[layer.key] = summarize(samples)
            self.timed += 1
            self._unsaved = True
        return float(self.entries[layer.key]["median_ms"])

    def breakdown(self, arch: dict | nn.Module) -> dict[str, float]:
        """Predicted milliseconds per layer (the per-call overhead taken out) and ``overhead``."""
        layers = layers_of(arch)
        overhead = self.ms(Layer("overhead", INPUT_SHAPE[0], INPUT_SHAPE[0], INPUT_SHAPE[1]))
        # Each entry was one call: its time includes the runtime's per-call cost, which a whole model
        # pays once. Clamped: a layer cheaper than the overhead costs nothing, never less.
        parts = {f"{i}: {layer.key}": max(0.0, self.ms(layer) - overhead) for i, layer in enumerate(layers)}
        if self._unsaved:
            self.save()
        return {"overhead": overhead, **parts}

    def predict_ms(self, arch: dict | nn.Module) -> float:
        return sum(self.breakdown(arch).values())


FIT_RATIOS = (0.25, 0.5, 0.75)  # the uniform prunes measured beside the dense model to fit latency at setup


class Footprint(NamedTuple):
    """What a config's latency is predicted from: its table sum (ms) and its activation elements."""

    table_ms: float
    elements: int


def footprint(table: "LatencyTable", arch: dict | nn.Module) -> Footprint:
    return Footprint(table.predict_ms(arch), activation_elements(arch))


@dataclass(frozen=True)
class LatencyFit:
    """Measured latency = ``fixed_ms`` + ``scale`` x a model's table sum + ``element_ns`` x its activation
    elements / 1e6, on one runtime, threads and batch.

    Fitted at setup (:meth:`Meter.dense_figures`) on the dense model and its uniform prunes
    (:data:`FIT_RATIOS`) measured side by side. ``fixed_ms`` is what a forward pass costs whatever the widths
    (dispatch, the runtime's per-call work); ``scale`` the timed layers' part; ``element_ns`` the work outside
    them that scales with activations, not MACs (a traced model's entries are its convs alone: its
    BatchNorms, activations and residual adds are here). Uniform prunes tell the two apart: MACs fall with the
    square of the kept share, activations with the share. Predictions use the dense model's shares
    (``fixed_fraction``, ``activation_fraction``), so a worker on another machine applies the fit to its own
    table (:meth:`fraction`).
    """

    fixed_ms: float
    scale: float
    fixed_fraction: float
    element_ns: float = 0.0  # per activation element (of one example at the batch size timed)
    activation_fraction: float = 0.0

    @classmethod
    def through(cls, dense: Footprint | tuple, *others: tuple) -> "LatencyFit":
        """The least-squares fit through the dense model's point and near the others'; a point is (table sum ms,
        activation elements, measured ms). Through the dense point because every prediction stands on the
        dense model measured beside it.

        Every part is held >= 0 (a part of latency cannot be negative; noise may tilt a free fit past that):
        the best fit over the faces of that region, so a term the points do not support is left at 0. The
        pruned models no faster than dense: every config as slow as dense (the widths do not matter), with a
        warning. The dense model alone: latency in proportion to the table.
        """
        s0, e0, m0 = (float(v) for v in dense)
        if not (s0 > 0 and m0 > 0):
            raise AutopruneError(f"cannot fit latency to a dense table sum of {s0} ms measured at {m0} ms; "
                                 f"please report this")
        deltas = [(float(s) - s0, float(e) - e0, float(m) - m0) for s, e, m in others]
        if not deltas:  # the dense model alone: latency in proportion to the table (the rule without a fit)
            return cls(0.0, m0 / s0, 0.0)

        def loss(b: float, c: float) -> float:
            return sum((dm - b * ds - c * de) ** 2 for ds, de, dm in deltas)

        def line(xs: list[float], ys: list[float]) -> float:  # least squares through the origin
            spread = sum(x * x for x in xs)
            return sum(x * y for x, y in zip(xs, ys)) / spread if spread > 0 else 0.0

        ds, de, dm = ([d[i] for d in deltas] for i in range(3))
        candidates = [(0.0, 0.0), (line(ds, dm), 0.0)]
        if e0 > 0:
            candidates.append((0.0, line(de, dm)))
            sss, see, sse = sum(x * x for x in ds), sum(x * x for x in de), sum(x * y for x, y in zip(ds, de))
            det = sss * see - sse * sse
            if det > 1e-12 * max(sss * see, 1e-300):
                sdm, edm = sum(x * y for x, y in zip(ds, dm)), sum(x * y for x, y in zip(de, dm))
                candidates.append(((see * sdm - sse * edm) / det, (sss * edm - sse * sdm) / det))
            # no fixed part: b = t m0 / s0, c = (1 - t) m0 / e0, t in [0, 1]; the loss is a parabola in t
            u = [m0 * (x / s0 - y / e0) for x, y in zip(ds, de)]  # d(prediction)/dt
            v = [y * m0 / e0 - z for y, z in zip(de, dm)]  # the residual at t = 0, negated
            t = min(1.0, max(0.0, -line(u, v)))
            candidates.append((t * m0 / s0, (1 - t) * m0 / e0))
        candidates.append((m0 / s0, 0.0))  # latency in proportion to the table: the rule without a fit
        feasible = [(b, c) for b, c in candidates if b >= 0 and c >= 0 and m0 - b * s0 - c * e0 >= -1e-9 * m0]
        scale, per_element = min(feasible, key=lambda bc: loss(*bc))
        if scale == 0 and per_element == 0:
            log.warning("latency fit: the pruned models measured no faster than dense (%s vs %.3f ms); the widths "
                        "are taken not to matter", ", ".join(f"{m:.3f}" for _, _, m in others), m0)
        fixed = max(0.0, m0 - scale * s0 - per_element * e0)
        return cls(fixed, scale, fixed / m0, per_element * 1e6, per_element * e0 / m0)

    @classmethod
    def from_figures(cls, figures: dict | None) -> "LatencyFit | None":
        """The fit a study recorded with its dense figures (:meth:`figures`), or None (a study made before)."""
        f = figures or {}
        if "latency_fit_fixed_fraction" not in f:
            return None
        return cls(float(f["latency_fit_fixed_ms"]), float(f["latency_fit_scale"]),
                   float(f["latency_fit_fixed_fraction"]), float(f.get("latency_fit_element_ns", 0.0)),
                   float(f.get("latency_fit_activation_fraction", 0.0)))

    def figures(self) -> dict:
        return {"latency_fit_fixed_ms": self.fixed_ms, "latency_fit_scale": self.scale,
                "latency_fit_fixed_fraction": self.fixed_fraction, "latency_fit_element_ns": self.element_ns,
                "latency_fit_activation_fraction": self.activation_fraction}

    def ms(self, point: Footprint) -> float:
        """Predicted milliseconds on the machine that made the fit."""
        return self.fixed_ms + self.scale * point.table_ms + self.element_ns * 1e-6 * point.elements

    def fraction(self, point: Footprint, dense: Footprint) -> float:
        """A config's predicted latency as a fraction of the dense model's: the fixed share as it is, the
        activation share in proportion to the elements, the rest to the table sums (this machine's table)."""
        rest = 1.0 - self.fixed_fraction - self.activation_fraction
        return (self.fixed_fraction + self.activation_fraction * point.elements / max(dense.elements, 1)
                + rest * point.table_ms / dense.table_ms)


TABLE_ONLY = LatencyFit(0.0, 1.0, 0.0)  # no fit: latency in proportion to the table's sum


def calibrated_ms(point: Footprint, dense: Footprint, dense_measured_ms: float,
                  fit: LatencyFit | None = None) -> float:
    """A model's predicted latency beside a measured dense model: the fit's :meth:`LatencyFit.fraction` (the
    table's share without one) times the dense model's measured latency (what a trial records)."""
    return (fit or TABLE_ONLY).fraction(point, dense) * dense_measured_ms


class PredictedFraction:
    """The latency budget's cost over any model: a config's predicted latency as a fraction of the dense
    model's (:meth:`LatencyFit.fraction` with the study's fit; without one the table's share), memoised per
    width tuple (a budget's bisection asks for few distinct ones).

    ``costs``: a :class:`autoprune.budget.CostModel` (or the lab's VGG conv widths); it is called with what
    ``costs.widths(kept)`` gives: every conv's width (the lab's VGG) or group -> kept width (graph models).
    ``dense_ms``: the dense model's predicted latency (the fit at its footprint; without a fit the table's sum).
    """

    def __init__(self, table: LatencyTable, costs, num_classes: int = 10, fit: LatencyFit | None = None):
        from .budget import as_cost_model

        costs = as_cost_model(costs, num_classes)
        if costs.arch is None:
            raise AutopruneError("this cost model describes no architecture, so its latency cannot be predicted; "
                                 "make it with prunable(model).cost_model()")
        self.table, self.arch, self.fit = table, costs.arch, fit or TABLE_ONLY
        self.fixed_fraction = self.fit.fixed_fraction  # what no widths go below
        self.dense = footprint(table, self.arch)
        self.dense_ms = self.fit.ms(self.dense)
        self._seen: dict[tuple, Footprint] = {}

    def arch_at(self, widths) -> dict:
        """The dense arch at ``widths``: every conv's width (the lab's VGG) or group -> kept (graph models)."""
        if isinstance(widths, dict):
            return {**self.arch, "widths": {**self.arch.get("widths", {}), **{k: int(v) for k, v in widths.items()}}}
        return {**self.arch, "channels": [int(c) for c in widths]}

    def footprint(self, widths) -> Footprint:
        """The table's sum and the activation elements at ``widths``."""
        key = tuple(sorted((k, int(v)) for k, v in widths.items())) if isinstance(widths, dict) else tuple(
            int(c) for c in widths)
        if key not in self._seen:
            self._seen[key] = footprint(self.table, self.arch_at(widths))
        return self._seen[key]

    def ms(self, widths) -> float:
        """Predicted milliseconds at ``widths`` (on the dense model's predicted latency)."""
        return self(widths) * self.dense_ms

    def __call__(self, widths) -> float:
        return self.fit.fraction(self.footprint(widths), self.dense)


# --- a study's latency figures -------------------------------------------------

DENSE_FIGURES = ("latency_ms", "latency_iqr_ms", "latency_batch_size", "latency_runtime", "latency_threads",
                 "latency_device", "latency_table_ms", "latency_predicted_ms", "latency_prediction_error")


class Meter:
    """A study's latency settings (``[latency]``): measure a model beside the dense one, and predict.

    ``fit``: the study's :class:`LatencyFit` (set by :meth:`dense_figures`, or given from a study's records)."""

    def __init__(self, runtime: str = "torch", threads: int = 1, batch_sizes=(1,), warmup: int = 10,
                 repeats: int = 50, device: str = "cpu", predict: bool = True,
                 cache_dir: str | os.PathLike | None = None, clock: Callable[[], float] = time.perf_counter,
                 fit: LatencyFit | None = None):
        get_runtime(runtime)
        self.runtime, self.threads, self.device = runtime, resolve_threads(threads), device
        self.batch_sizes = [int(b) for b in batch_sizes]
        self.warmup, self.repeats, self.clock = warmup, repeats, clock
        self.table = (LatencyTable(runtime, self.threads, self.batch_sizes[0], device, cache_dir, warmup, repeats,
                                   clock) if predict else None)
        self.fit = fit

    @classmethod
    def from_config(cls, section, cache_dir=None, dense_figures: dict | None = None) -> "Meter":
        """``dense_figures``: a study's recorded dense figures, whose latency fit the predictions use."""
        return cls(section.runtime, section.threads, section.batch_sizes, section.warmup, section.repeats,
                   section.device, section.predict, cache_dir, fit=LatencyFit.from_figures(dense_figures))

    def describe(self) -> dict:
        return {"runtime": self.runtime, "threads": self.threads, "device": self.device,
                "batch_sizes": self.batch_sizes, "warmup": self.warmup, "repeats": self.repeats}

    def measure(self, models: dict[str, nn.Module]) -> dict[str, dict[int, dict]]:
        shapes = {input_shape_of(m) for m in models.values()}
        if len(shapes) != 1:
            raise AutopruneError(f"models measured side by side must take one input shape, got {sorted(shapes)}")
        return measure(models, runtime=self.runtime, threads=self.threads, batch_sizes=self.batch_sizes,
                       warmup=self.warmup, repeats=self.repeats, device=self.device, clock=self.clock,
                       input_shape=shapes.pop())

    def figures(self, model: nn.Module, dense: nn.Module | None = None) -> dict:
        """Trial attributes: ``latency_ms`` (median at the first batch size) with its runtime, threads, batch
        and spread; with ``dense``: its latency from the same run and ``latency_fraction``; with the table:
        ``latency_table_ms`` (the table's sum), ``latency_predicted_ms`` (with ``dense``: on its measured
        latency, see :func:`calibrated_ms`; else by the fit, or the sum without one) and
        ``latency_prediction_error`` (predicted / measured - 1)."""
        runs = self.measure({"model": model, **({"dense": dense} if dense is not None else {})})
        b = self.batch_sizes[0]
        mine = runs["model"][b]
        out = {"latency_ms": mine["median_ms"], "latency_iqr_ms": mine["iqr_ms"], "latency_batch_size": b,
               "latency_runtime": self.runtime, "latency_threads": self.threads, "latency_device": self.device}
        per_batch = {}
        for size, stats in runs["model"].items():
            row = {k: stats[k] for k in ("median_ms", "iqr_ms", "min_ms", "repeats")}
            if dense is not None:
                row["dense_median_ms"] = runs["dense"][size]["median_ms"]
                row["fraction"] = stats["median_ms"] / row["dense_median_ms"]
            per_batch[str(size)] = row
        out["latency"] = {**self.describe(), "batches": per_batch}
        if dense is not None:
            out["latency_dense_ms"] = runs["dense"][b]["median_ms"]
            out["latency_fraction"] = mine["median_ms"] / out["latency_dense_ms"]
        if self.table is not None:
            point = footprint(self.table, model)
            out["latency_table_ms"] = point.table_ms
            if dense is not None:
                predicted = calibrated_ms(point, footprint(self.table, dense), out["latency_dense_ms"], self.fit)
            else:
                predicted = (self.fit or TABLE_ONLY).ms(point)
            out["latency_predicted_ms"] = predicted
            out["latency_prediction_error"] = predicted / mine["median_ms"] - 1.0
        return out

    def dense_figures(self, dense: nn.Module) -> dict:
        """What a study records of its dense model's latency (:data:`DENSE_FIGURES`); with the table, the dense
        model is measured beside its uniform prunes (:data:`FIT_RATIOS`) and they fix this meter's
        :class:`LatencyFit` (recorded too: ``latency_fit_fixed_ms``, ``latency_fit_scale``,
        ``latency_fit_fixed_fraction`` and each model's ``latency_fit_points``)."""
        if self.table is None:
            f = self.figures(dense)
            return {k: f[k] for k in DENSE_FIGURES if k in f}
        from .sources import prunable

        p = prunable(dense)
        models = {"dense": dense, **{f"uniform {r:g}": p.prune_channels({g: r for g in p.channel_groups()}, "none")
                                     for r in FIT_RATIOS}}  # "none": latency does not care which channels stay
        b = self.batch_sizes[0]
        runs = {name: stats[b] for name, stats in self.measure(models).items()}
        feet = {name: footprint(self.table, m) for name, m in models.items()}
        points = {name: (*feet[name], runs[name]["median_ms"]) for name in models}
        self.fit = LatencyFit.through(points.pop("dense"), *points.values())
        d = runs["dense"]
        log.info("latency fit: measured = %.3f ms + %.3f x the table's sum + %.3f ns x activation elements (shares "
                 "of the dense model's %.3f ms: fixed %.2f, activations %.2f)", self.fit.fixed_ms, self.fit.scale,
                 self.fit.element_ns, d["median_ms"], self.fit.fixed_fraction, self.fit.activation_fraction)
        predicted = self.fit.ms(feet["dense"])  # the dense point is on the fit
        return {"latency_ms": d["median_ms"], "latency_iqr_ms": d["iqr_ms"], "latency_batch_size": b,
                "latency_runtime": self.runtime, "latency_threads": self.threads, "latency_device": self.device,
                "latency_table_ms": feet["dense"].table_ms, "latency_predicted_ms": predicted,
                "latency_prediction_error": predicted / d["median_ms"] - 1.0, **self.fit.figures(),
                "latency_fit_points": {name: {"table_ms": t, "elements": e, "median_ms": m}
                                       for name, (t, e, m) in points.items()}}
