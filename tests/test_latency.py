"""Latency: ONNX export equivalence, the runtime registry, measurement mechanics, the lookup-table predictor.

No test asserts a timing: a fake runtime on a fake clock gives every run a known cost, so medians,
ratios and predictions are exact; real runtimes are only checked to run and to agree numerically.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

from autoprune import latency
from autoprune.config import LatencySection, StudyConfig, load_config
from autoprune.errors import AutopruneError
from autoprune.model import build_model, vgg_channels
from autoprune.plan import PruningPlan, prune

from conftest import TINY_WIDTH, assert_cli_error, randomized_model, run_main


def channel_pruned(ratio: float = 0.5, width: float = TINY_WIDTH):
    dense = randomized_model(width)
    plan = PruningPlan("channel", {f"conv{i}": ratio for i in range(7)}).for_model(dense)
    return prune(dense, plan).model.eval()


# --- ONNX ------------------------------------------------------------------------


@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "channel-pruned"])
def test_onnx_export_matches_torch_to_1e4(pruned):
    import onnxruntime as ort

    model = channel_pruned() if pruned else randomized_model(TINY_WIDTH)
    data, info = latency.onnx_export(model)
    assert info["written"] and info["max_abs_difference"] <= 1e-4 and info["tolerance"] == 1e-4
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["output"]
    for batch in (1, 5):  # the batch axis is dynamic
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        got = session.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            want = model(x).numpy()
        assert got.shape == want.shape == (batch, 10)
        assert np.abs(got - want).max() <= 1e-4


def test_onnx_export_refuses_a_mismatch(monkeypatch):
    monkeypatch.setattr(latency, "onnx_max_difference", lambda *a, **k: 0.5)
    with pytest.raises(AutopruneError, match=r"^the ONNX export differs from the model by 0.5 \(more than 0.0001\)"):
        latency.onnx_export(channel_pruned())


@pytest.fixture
def no_onnx(monkeypatch):
    """As if the 'onnx' extra were not installed: onnxruntime cannot be found."""
    real = latency.importlib.util.find_spec
    monkeypatch.setattr(latency.importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime"
                        else real(name, *a))


def test_without_the_extra_onnx_is_refused_in_one_line(no_onnx, capsys):
    fix = "pip install 'autoprune[onnx]'"
    with pytest.raises(AutopruneError) as exc:
        latency.onnx_export(channel_pruned())
    assert str(exc.value) == f"ONNX export needs onnxruntime, which is not installed; {fix}"
    with pytest.raises(AutopruneError) as exc:
        latency.get_runtime("onnxruntime")
    assert str(exc.value) == f"latency runtime 'onnxruntime' needs onnxruntime, which is not installed; {fix}"
    latency.get_runtime("torch")  # the default runtime needs nothing more
    config = StudyConfig()
    config.study.kind = "channel"
    config.latency.runtime = "onnxruntime"
    with pytest.raises(AutopruneError) as exc:
        config.validate()
    assert str(exc.value) == (f"[latency] runtime: latency runtime 'onnxruntime' needs onnxruntime, which is not "
                              f"installed; {fix}")
    config.study.kind = "fine_grained"  # measures no latency: the missing extra does not matter
    config.validate()
    line = assert_cli_error(run_main(capsys, "profile", "--width", TINY_WIDTH, "--runtime", "onnxruntime"))
    assert line == (f"autoprune: error: --runtime must be installed: latency runtime 'onnxruntime' needs "
                    f"onnxruntime, which is not installed; {fix}")


def test_export_skips_model_onnx_without_the_extra_and_says_why(no_onnx):
    from autoprune.export import _onnx

    data, info = _onnx(channel_pruned())
    assert data is None
    assert info == {"written": False,
                    "reason": "model.onnx needs onnxruntime, which is not installed; pip install 'autoprune[onnx]'"}


# --- runtimes and their names ------------------------------------------------------


def test_bad_runtime_names_give_one_line_errors(tmp_path, capsys):
    with pytest.raises(AutopruneError) as exc:
        latency.get_runtime("tensorrt")
    assert str(exc.value) == "unknown latency runtime 'tensorrt'; choose one of torch, onnxruntime"
    toml = tmp_path / "s.toml"
    toml.write_text('[study]\nkind = "channel"\n[latency]\nruntime = "ort"\n')
    with pytest.raises(AutopruneError) as exc:
        load_config(toml)
    assert str(exc.value) == "[latency] runtime: unknown latency runtime 'ort'; choose one of torch, onnxruntime"
    line = assert_cli_error(run_main(capsys, "profile", "--width", TINY_WIDTH, "--runtime", "Torch"))
    assert line == "autoprune: error: --runtime must be one of torch, onnxruntime, got 'Torch'"


@pytest.mark.parametrize("table, wanted", [
    ('threads = -1', "[latency] threads must be in [0, 1024] (0: one per CPU core), got -1"),
    ('batch_sizes = []', "[latency] batch_sizes must be a non-empty list of integers in [1, 4096], got []"),
    ('batch_sizes = [1, 0]', "[latency] batch_sizes must be a non-empty list of integers in [1, 4096], got [1, 0]"),
    ('batch_sizes = [1.5]', "[latency] batch_sizes must be a list of integers, got [1.5] (1.5 is a float)"),
    ('repeats = 0', "[latency] repeats must be in [1, 100000], got 0"),
    ('device = "tpu"', "[latency] device must be one of cpu, cuda, got 'tpu'"),
])
def test_latency_section_is_validated(tmp_path, table, wanted):
    toml = tmp_path / "s.toml"
    toml.write_text(f'[study]\nkind = "channel"\n[latency]\n{table}\n')
    with pytest.raises(AutopruneError) as exc:
        load_config(toml)
    assert str(exc.value).removesuffix(f" in {toml}") == wanted


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_device_is_refused_in_one_line(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text('[study]\nkind = "channel"\n[latency]\ndevice = "cuda"\n')
    with pytest.raises(AutopruneError) as exc:
        load_config(toml)
    assert str(exc.value) == '[latency] device cuda: this machine has no CUDA device; set device = "cpu"'
    with pytest.raises(AutopruneError, match="^latency device cuda: this machine has no CUDA device"):
        latency.measure({"m": torch.nn.ReLU()}, device="cuda")


def test_a_stored_config_without_latency_gets_the_defaults():
    stored = StudyConfig().to_dict()
    del stored["latency"]  # a study made before [latency] existed
    assert StudyConfig.from_dict(stored).latency == LatencySection()


def test_torch_session_fixes_threads_and_restores_them():
    before = torch.get_num_threads()
    want = 2 if before != 2 else 1
    with latency.RUNTIMES["torch"].session(torch.nn.ReLU(), (1, 3, 4, 4), want) as run:
        assert torch.get_num_threads() == want
        assert run().shape == (1, 3, 4, 4)
    assert torch.get_num_threads() == before


# --- measurement mechanics, on a fake clock --------------------------------------------


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeRuntime(latency.Runtime):
    """Each run advances the clock by a cost that depends on the model and batch, and is counted."""

    name = "fake"

    def __init__(self, clock: Clock, version: str = "1"):
        self.clock, self._version = clock, version
        self.sessions: list[tuple] = []
        self.runs = 0

    def version(self) -> str:
        return self._version

    @staticmethod
    def cost_ms(model, input_shape) -> float:
        return input_shape[0] * (1 + sum(p.numel() for p in model.parameters()) / 1000)

    @contextlib.contextmanager
    def session(self, model, input_shape, threads, device="cpu"):
        self.sessions.append((type(model).__name__, tuple(input_shape), threads))
        cost = self.cost_ms(model, input_shape) / 1000

        def run():
            self.clock.t += cost
            self.runs += 1

        yield run


@pytest.fixture
def fake(monkeypatch):
    clock = Clock()
    runtime = FakeRuntime(clock)
    monkeypatch.setitem(latency.RUNTIMES, "fake", runtime)
    return runtime


def test_summarize_gives_median_and_quartiles_of_the_samples():
    s = latency.summarize([5.0, 1.0, 3.0, 2.0, 4.0, 100.0])  # exclusive quartiles: positions 1.75 and 5.25
    assert s == {"median_ms": 3.5, "q1_ms": 1.75, "q3_ms": 28.75, "iqr_ms": 27.0, "min_ms": 1.0, "max_ms": 100.0,
                 "repeats": 6}
    assert latency.summarize([2.0])["median_ms"] == 2.0 and latency.summarize([2.0])["iqr_ms"] == 0.0


def test_time_runs_warms_up_then_interleaves():
    calls = []
    runs = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    samples = latency.time_runs(runs, warmup=2, repeats=3, clock=Clock())
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3}


def test_meter_measures_dense_beside_the_model(fake):
    model, dense = channel_pruned(), randomized_model(TINY_WIDTH)
    meter = latency.Meter("fake", threads=3, batch_sizes=[1, 4], warmup=2, repeats=5, predict=False,
                          clock=fake.clock)
    f = meter.figures(model, dense)
    cost = {n: FakeRuntime.cost_ms(m, (1, 3, 32, 32)) for n, m in (("model", model), ("dense", dense))}
    assert f["latency_ms"] == pytest.approx(cost["model"])
    assert f["latency_dense_ms"] == pytest.approx(cost["dense"])
    assert f["latency_fraction"] == pytest.approx(cost["model"] / cost["dense"])
    assert (f["latency_runtime"], f["latency_threads"], f["latency_batch_size"]) == ("fake", 3, 1)
    assert f["latency_iqr_ms"] == pytest.approx(0.0, abs=1e-9)
    assert set(f["latency"]["batches"]) == {"1", "4"}
    assert f["latency"]["batches"]["4"]["median_ms"] == pytest.approx(4 * cost["model"])
    assert "latency_predicted_ms" not in f
    # One session per model and batch size, at the fixed thread count; (warm-up + repeats) runs each.
    assert [s[1][0] for s in fake.sessions] == [1, 1, 4, 4] and {s[2] for s in fake.sessions} == {3}
    assert fake.runs == 4 * (2 + 5)


# --- the lookup-table predictor -----------------------------------------------------


def test_vgg_layers_follow_the_architecture():
    model = channel_pruned()
    layers = latency.layers_of(model)
    assert [(la.in_channels, la.out_channels) for la in layers[:-1]] == list(
        zip([3, *model.channels[:-1]], model.channels))
    assert [la.size for la in layers] == [32, 32, 16, 16, 8, 8, 4, 4, 2]
    assert [la.pool for la in layers[:-1]] == [False, True] * 4
    assert (layers[-1].kind, layers[-1].in_channels, layers[-1].out_channels) == ("head", model.channels[-1], 10)
    assert latency.layers_of(model.arch()) == layers  # from the plain arch dict, no model needed
    with pytest.raises(AutopruneError, match="^no latency table layout for model 'resnet'; known: vgg$"):
        latency.layers_of({"name": "resnet"})


def test_predictor_sums_the_per_layer_entries_less_the_overhead(fake):
    model = channel_pruned()
    table = latency.LatencyTable("fake", threads=1, warmup=1, repeats=3, clock=fake.clock)
    layers = latency.layers_of(model)
    overhead = FakeRuntime.cost_ms(torch.nn.ReLU(), (1, 3, 32, 32))
    costs = [FakeRuntime.cost_ms(la.module(), (1, *la.input_shape)) for la in layers]
    assert table.predict_ms(model) == pytest.approx(overhead + sum(c - overhead for c in costs))
    parts = table.breakdown(model)
    assert parts["overhead"] == pytest.approx(overhead) and len(parts) == len(layers) + 1
    assert table.timed == len(layers) + 1  # every layer shape once, plus the overhead


def test_table_entries_are_reused_not_retimed(fake, tmp_path):
    model = channel_pruned()
    table = latency.LatencyTable("fake", threads=1, cache_dir=tmp_path, warmup=1, repeats=2, clock=fake.clock)
    first = table.predict_ms(model)
    n = table.timed
    runs = fake.runs
    assert table.predict_ms(model) == first and table.timed == n and fake.runs == runs  # in memory
    again = latency.LatencyTable("fake", threads=1, cache_dir=tmp_path, warmup=1, repeats=2, clock=fake.clock)
    assert again.predict_ms(model) == first and again.timed == 0 and fake.runs == runs  # from the file
    # A narrower config shares its first conv's input (3 channels) but not its width: only new shapes are timed.
    other = channel_pruned(0.25)
    again.predict_ms(other)
    assert again.timed == sum(1 for la in latency.layers_of(other) if la.key not in table.entries)


def test_table_cache_is_invalidated_by_runtime_threads_or_version(fake, monkeypatch, tmp_path):
    model = channel_pruned()
    kw = dict(cache_dir=tmp_path, warmup=1, repeats=2, clock=fake.clock)
    base = latency.LatencyTable("fake", threads=1, **kw)
    base.predict_ms(model)
    n = base.timed
    two = latency.LatencyTable("fake", threads=2, **kw)  # another thread count: timed afresh
    assert two.entries == {} and two.predict_ms(model) and two.timed == n
    assert {s[2] for s in fake.sessions[-n:]} == {2}
    other = FakeRuntime(fake.clock)
    other.name = "fake2"
    monkeypatch.setitem(latency.RUNTIMES, "fake2", other)
    ort = latency.LatencyTable("fake2", threads=1, **kw)  # another runtime
    assert ort.entries == {} and ort.predict_ms(model) and ort.timed == n
    monkeypatch.setattr(fake, "_version", "2")  # the same runtime, upgraded
    upgraded = latency.LatencyTable("fake", threads=1, **kw)
    assert upgraded.entries == {} and upgraded.path != base.path
    files = sorted(p.name for p in tmp_path.glob("*.json"))
    assert [f.split("-")[0] for f in files] == ["fake", "fake", "fake2"]
    assert any("-t2-b1-" in f for f in files)
    stored = json.loads((tmp_path / base.path.name).read_text())
    assert stored["key"] == base.key() and stored["key"]["threads"] == 1 and stored["key"]["runtime"] == "fake"
    assert set(stored["key"]["machine"]) == {"host", "cpu", "cpus", "system", "arch"}
    assert set(stored["entries"]) == set(base.entries)


def test_a_damaged_table_file_is_retimed(fake, tmp_path):
    model = channel_pruned()
    table = latency.LatencyTable("fake", cache_dir=tmp_path, warmup=0, repeats=1, clock=fake.clock)
    table.predict_ms(model)
    table.path.write_text("{not json")
    again = latency.LatencyTable("fake", cache_dir=tmp_path, warmup=0, repeats=1, clock=fake.clock)
    assert again.entries == {} and again.predict_ms(model) == pytest.approx(table.predict_ms(model))


def test_meter_records_the_prediction_error(fake):
    model = channel_pruned()
    meter = latency.Meter("fake", warmup=0, repeats=1, predict=True, clock=fake.clock)
    f = meter.figures(model)
    assert f["latency_prediction_error"] == pytest.approx(f["latency_predicted_ms"] / f["latency_ms"] - 1)
    assert "latency_fraction" not in f  # no dense model given
    assert f["latency_predicted_ms"] == f["latency_table_ms"] == meter.table.predict_ms(model)  # uncalibrated


def test_prediction_beside_the_dense_model_is_calibrated_on_it(fake):
    """With the dense model measured beside it, a prediction is the table's fraction of the dense model's sum
    times the dense model's measured latency: the fraction a latency budget repairs by."""
    model, dense = channel_pruned(), randomized_model(TINY_WIDTH)
    meter = latency.Meter("fake", warmup=0, repeats=1, predict=True, clock=fake.clock)
    f = meter.figures(model, dense)
    share = meter.table.predict_ms(model) / meter.table.predict_ms(dense)
    assert f["latency_table_ms"] == meter.table.predict_ms(model)
    assert f["latency_predicted_ms"] == pytest.approx(share * f["latency_dense_ms"], rel=1e-12)
    assert f["latency_prediction_error"] == pytest.approx(share / f["latency_fraction"] - 1, rel=1e-9)


# --- the real runtimes, briefly (no timing asserted) ---------------------------------


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_real_runtimes_measure_and_predict(runtime, tmp_path):
    model = build_model("vgg", width=TINY_WIDTH).eval()
    meter = latency.Meter(runtime, threads=1, batch_sizes=[1, 2], warmup=1, repeats=2, cache_dir=tmp_path)
    f = meter.figures(model, model)
    assert f["latency_ms"] > 0 and f["latency_predicted_ms"] > 0 and f["latency_runtime"] == runtime
    assert meter.table.path.is_file() and meter.table.path.name.startswith(f"{runtime}-cpu-t1-b1-")


# --- the benchmark's bookkeeping --------------------------------------------------------


def test_latency_benchmark_configs_and_summary():
    import importlib.util
    import sys

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("bench_latency", REPO / "benchmarks" / "latency.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    cfgs = bench.configs([0.5], 2, 0.8, seed=0)
    assert [c["name"] for c in cfgs] == ["uniform 0.5", "ramp 0.2-0.7", "random 0", "random 1"]
    assert list(cfgs[1]["ratios"].values()) == [0.2, 0.2833, 0.3667, 0.45, 0.5333, 0.6167, 0.7]
    assert cfgs == bench.configs([0.5], 2, 0.8, seed=0)  # seeded
    assert all("conv7" not in c["ratios"] and all(0 <= r <= 0.8 for r in c["ratios"].values()) for c in cfgs)

    def row(config, ratio, error, table_error, dense_ms=2.0, round_to=1, fit_error=0.05):
        return {"model": "vgg", "width": 1.0, "runtime": "torch", "threads": 1, "batch_size": 1, "config": config,
                "round_to": round_to, "latency_vs_macs": ratio, "prediction_error": error,
                "fixed_fit_prediction_error": 2 * fit_error, "fit_prediction_error": fit_error,
                "fit_fixed_fraction": 0.25, "fit_activation_fraction": 0.125, "table_error": table_error,
                "dense_median_ms": dense_ms}

    summary = bench.summarize([row("dense", None, 0.0, -0.02), row("a", 0.5, -0.10, -0.2, fit_error=-0.01),
                               row("random 0", 0.9, 0.04, -0.1), row("c", 0.7, 0.2, 0.1, dense_ms=4.0, fit_error=0.2),
                               row("a", 1.0, 0.3, 0.5, round_to=8)])
    common = {"model": "vgg", "width": 1.0, "runtime": "torch", "threads": 1, "batch_size": 1}
    assert summary == [  # the pruned configs' errors; the table sum's counts the dense row in every rounding
        {**common, "round_to": 1, "configs": 3, "dense_ms": 2.0, "latency_vs_macs_median": 0.7,
         "prediction_abs_error_median": 0.10, "prediction_abs_error_max": 0.2, "fit_abs_error_median": 0.05,
         "fit_abs_error_max": 0.2, "fixed_fit_abs_error_median": 0.1, "fixed_fit_abs_error_max": 0.4,
         "fit_fixed_fraction": 0.25, "fit_activation_fraction": 0.125, "random_prediction_abs_error_median": 0.04,
         "random_fit_abs_error_median": 0.05, "table_abs_error_median": 0.1},
        {**common, "round_to": 8, "configs": 1, "dense_ms": 2.0, "latency_vs_macs_median": 1.0,
         "prediction_abs_error_median": 0.3, "prediction_abs_error_max": 0.3, "fit_abs_error_median": 0.05,
         "fit_abs_error_max": 0.05, "fixed_fit_abs_error_median": 0.1, "fixed_fit_abs_error_max": 0.1,
         "fit_fixed_fraction": 0.25, "fit_activation_fraction": 0.125, "random_prediction_abs_error_median": None,
         "random_fit_abs_error_median": None, "table_abs_error_median": 0.26}]
    assert ("| vgg | 1 | torch | 1 | 1 | 1 | 2.000 | 0.70 | 10.0% / 20.0% | 10.0% / 40.0% | 5.0% / 20.0% (0.25, 0.12) "
            "| 4.0% / 5.0% | 10.0% |" in bench.markdown(summary))
    # Rounded widths as [pruning] round_to makes them: kept channels to the nearest multiple (at least one), exact
    # ratios; over any model's groups.
    from autoprune.channel import kept_channels

    channels = vgg_channels(1.0)  # 64, 128, 256, ...
    assert kept_channels(channels, bench.rounded(channels, {"conv0": 0.5, "conv1": 0.99}, 8))[:3] == [32, 8, 256]
    assert kept_channels(channels, bench.rounded(channels, {"conv0": 0.45}, 16))[:2] == [32, 128]
    groups = ("stem", "layer1", "layer2")
    assert [c["name"] for c in bench.configs([0.3], 1, 0.8, seed=0, groups=groups)] == [
        "uniform 0.3", "ramp 0.2-0.7", "random 0"]
    assert bench.ramp(groups) == {"stem": 0.2, "layer1": 0.45, "layer2": 0.7}


# --- round_to: hardware-friendly widths ----------------------------------------------------


def test_round_to_keeps_multiples_never_zero_never_above_the_dense_width():
    from autoprune.channel import kept_channels

    assert kept_channels([64, 128], {"conv0": 0.5, "conv1": 0.99}, 8) == [32, 8]  # 1.28 kept: at least one multiple
    assert kept_channels([64, 128], {"conv0": 0.45}, 16) == [32, 128]  # 35.2 -> 32; an unpruned layer stays whole
    # A width that is no multiple (40) stays reachable whole; a layer narrower than the multiple (8) is not cut.
    assert kept_channels([40, 8], {"conv0": 0.05, "conv1": 0.5}, 16) == [40, 8]
    assert kept_channels([40, 8], {"conv0": 0.3}, 16) == [32, 8]
    ratios = {f"conv{i}": r for i, r in enumerate([0.13, 0.37, 0.5, 0.61, 0.77, 0.2, 0.9])}
    assert kept_channels(vgg_channels(1.0), ratios, 1) == kept_channels(vgg_channels(1.0), ratios)  # 1: as before
    with pytest.raises(AutopruneError) as exc:
        kept_channels([64], {}, 0)
    assert str(exc.value) == "round_to must be an integer in [1, 64] (1: the lab's rounding), got 0"


@pytest.mark.parametrize("round_to", [4, 8, 16])
@pytest.mark.parametrize("metric, target", [("macs", 0.5), ("params", 0.3), ("macs", 0.2)])
def test_round_to_budgets_hold_on_the_rounded_widths(round_to, metric, target):
    from autoprune import budget
    from autoprune.channel import kept_channels

    channels = vgg_channels(1.0)
    rng = np.random.default_rng(round_to)
    for _ in range(5):
        prefs = {f"conv{i}": float(rng.uniform(0, 0.6)) for i in range(7)}
        ratios = budget.channel_budget(channels, target, metric, prefs, round_to=round_to)
        kept = kept_channels(channels, ratios, round_to)
        assert all(k % round_to == 0 for k in kept)  # VGG widths are multiples of 16 at width 1
        assert kept_channels(channels, ratios) == kept  # the ratios keep exactly these widths, rounding or not
        assert budget.channel_cost_fraction(channels, ratios, metric, round_to=round_to) <= target
        plan = PruningPlan("channel", ratios, "", tuple(channels), round_to)
        assert plan.to_dict()["round_to"] == round_to and PruningPlan.from_dict(plan.to_dict()) == plan
    assert "round_to" not in PruningPlan("channel", ratios).to_dict()  # plans at 1 read as before


def test_a_round_to_plan_prunes_to_multiples():
    dense = randomized_model(0.25)  # widths 16 ... 128
    plan = PruningPlan("channel", {f"conv{i}": 0.3 for i in range(7)}, round_to=8).for_model(dense)
    small = prune(dense, plan).model
    assert list(small.channels) == [8, 24, 48, 48, 88, 88, 88, 128]  # 11.2 -> 8, 22.4 -> 24, 44.8 -> 48, 89.6 -> 88
    with pytest.raises(AutopruneError, match="^round_to applies to channel plans, not fine_grained; leave it 1$"):
        PruningPlan("fine_grained", {}, round_to=4)


# --- the latency budget ----------------------------------------------------------------


def fake_table(fake, channels):
    """A predictor over the fake runtime: every layer's time is known exactly (no timing)."""
    table = latency.LatencyTable("fake", warmup=0, repeats=1, clock=fake.clock)
    return table, latency.PredictedFraction(table, channels)


@pytest.mark.parametrize("round_to", [1, 8])
def test_latency_budget_repair_meets_its_cap_by_the_predictor(fake, round_to):
    from autoprune.space import BUDGET, SearchSpace

    channels = vgg_channels(0.25)
    table, predictor = fake_table(fake, channels)
    dense = build_model("vgg", width=0.25)
    assert predictor.dense_ms == table.predict_ms(dense)
    space = SearchSpace.build("channel", channels, max_size_fraction=1.0, max_latency_fraction=0.5,
                              latency=predictor, round_to=round_to, budget_low=0.5)
    assert (space.budget_metric, space.cap) == ("latency", 0.5)
    rng = np.random.default_rng(0)
    for budget_share in (1.0, 0.8, 0.6):
        proposal = {f"conv{i}": float(rng.uniform(0, 0.8)) for i in range(7)}
        ratios, notes = space.repair({**proposal, BUDGET: budget_share})
        target = 0.5 * budget_share
        model = prune(dense, space.plan(ratios)).model
        got = table.predict_ms(model) / predictor.dense_ms  # the predictor on the pruned model itself
        assert got == pytest.approx(space.cost(ratios)["latency"], rel=1e-12)
        assert target - 0.03 < got <= target  # met, and within a few channels of it
        assert all(c % round_to == 0 for c in model.channels)
        assert notes[0].startswith("latency ")


def test_latency_cap_comes_after_the_other_caps_are_kept(fake):
    from autoprune.space import SearchSpace

    channels = vgg_channels(0.25)
    _, predictor = fake_table(fake, channels)
    space = SearchSpace.build("channel", channels, max_size_fraction=0.2, max_macs_fraction=0.6,
                              max_latency_fraction=0.7, latency=predictor)
    ratios, notes = space.repair({f"conv{i}": 0.1 for i in range(7)})
    cost = space.cost(ratios)
    assert cost["latency"] <= 0.7 and cost["macs"] <= 0.6 and cost["size"] <= 0.2
    assert notes[0].startswith("latency ") and any(n.startswith("size ") for n in notes)


@pytest.mark.parametrize("tables, wanted", [
    ('[constraints]\nmax_latency_fraction = 0.5\nmax_latency_ms = 2.0',
     "[constraints] set max_latency_fraction or max_latency_ms, not both (one latency budget is repaired onto)"),
    ('[constraints]\nmax_latency_fraction = 1.5',
     "[constraints] max_latency_fraction is a fraction of the dense model's latency in (0, 1], got 1.5"),
    ('[constraints]\nmax_latency_fraction = 0.5\n[latency]\npredict = false',
     "[constraints] max_latency_fraction is repaired before fine-tuning by the predicted latency: set [latency] "
     "predict = true"),
    ('[constraints]\nmax_latency_ms = 3\n[latency]\npredict = false',
     "[constraints] max_latency_ms is repaired before fine-tuning by the predicted latency: set [latency] "
     "predict = true"),
    ('[pruning]\nround_to = 0', "[pruning] round_to must be in [1, 64] (1: the lab's rounding), got 0"),
    ('[pruning]\nround_to = 8.0', "[pruning] round_to must be an integer, got 8.0 (a float)"),
])
def test_bad_latency_budgets_and_round_to_give_one_line_errors(tmp_path, tables, wanted):
    toml = tmp_path / "s.toml"
    toml.write_text(f'[study]\nkind = "channel"\n{tables}\n')
    with pytest.raises(AutopruneError) as exc:
        load_config(toml)
    assert str(exc.value).removesuffix(f" in {toml}") == wanted


@pytest.mark.parametrize("tables, wanted", [
    ('[constraints]\nmax_latency_fraction = 0.5',
     '[constraints] max_latency_fraction needs kind = "channel": fine-grained pruning keeps dense shapes, so its '
     'latency does not change; drop max_latency_fraction'),
    ('[constraints]\nmax_latency_ms = 2.0',
     '[constraints] max_latency_ms needs kind = "channel": fine-grained pruning keeps dense shapes, so its latency '
     'does not change; drop max_latency_ms'),
    ('[study]\nobjectives = ["latency", "accuracy"]',
     '[study] fine-grained pruning leaves dense latency unchanged (zeros do not make a dense kernel faster); use '
     'objectives [\'size\', \'accuracy\'] or kind = "channel"'),
    ('[pruning]\nround_to = 8',
     '[pruning] round_to rounds kept channels: it needs kind = "channel"; leave it 1 for fine-grained studies'),
])
def test_latency_budgets_on_a_fine_grained_study_are_refused(tmp_path, tables, wanted):
    toml = tmp_path / "s.toml"
    toml.write_text(tables + "\n")
    with pytest.raises(AutopruneError) as exc:
        load_config(toml)
    assert str(exc.value) == wanted


def test_pick_latency_limits_are_checked():
    from types import SimpleNamespace

    from autoprune.pick import study_limits

    config = StudyConfig()
    config.study.kind = "channel"
    config.constraints.max_latency_fraction = 0.6
    study = SimpleNamespace(user_attrs={"accuracy_floor": 50.0})
    own = study_limits(study, config)
    assert (own.max_latency_fraction, own.max_latency_ms) == (0.6, None)
    given = study_limits(study, config, max_latency_ms=2.5)  # replaces the study's latency limit
    assert (given.max_latency_fraction, given.max_latency_ms) == (None, 2.5)
    assert given.describe().endswith("latency <= 2.5 ms")
    assert study_limits(study, config, max_latency_fraction=0.4).describe().endswith("latency_fraction <= 0.4")
    for kw, wanted in [({"max_latency_fraction": 0.0}, "--max-latency-fraction is a fraction of the dense model's "
                                                        "latency in (0, 1], got 0.0"),
                       ({"max_latency_fraction": 0.5, "max_latency_ms": 1.0},
                        "give --max-latency-ms or --max-latency-fraction, not both")]:
        with pytest.raises(AutopruneError) as exc:
            study_limits(study, config, **kw)
        assert str(exc.value) == wanted
    config.study.kind = "fine_grained"
    config.constraints.max_latency_fraction = None
    with pytest.raises(AutopruneError, match=r"^--max-latency-fraction needs a channel study: fine-grained trials "
                                             r"record no latency"):
        study_limits(study, config, max_latency_fraction=0.5)


def test_a_tiny_channel_study_with_a_latency_budget_runs_end_to_end(tmp_path, monkeypatch, dense_cache, capsys):
    from autoprune.pick import Limits, named_constraints
    from autoprune.report import write_report
    from autoprune.search import run_search

    from conftest import write_study

    # Predictions from a fixed table (an overhead plus MACs-proportional conv times): the budget's arithmetic is
    # exact; the measured latency is real (torch, briefly) and only recorded and checked.
    def table_ms(self, layer):
        return 0.05 + (1e-6 * layer.in_channels * layer.out_channels * 9 * layer.size ** 2 if layer.kind == "conv"
                       else 0.0)

    monkeypatch.setattr(latency.LatencyTable, "ms", table_ms)
    # The fit from the real measurements at setup depends on the machine's load: fixed at a 20% share here (the
    # line through the measured dense point), so that a cap of 0.5 is reachable.
    # Shares: 0.2 fixed, 0.3 in proportion to the activation elements, 0.5 to the table's sum.
    monkeypatch.setattr(latency.LatencyFit, "through", classmethod(
        lambda cls, dense, *others: cls(0.2 * dense[2], 0.5 * dense[2] / dense[0], 0.2, 0.3e6 * dense[2] / dense[1],
                                        0.3)))
    out = tmp_path / "reports" / "lat"
    config = load_config(write_study(
        tmp_path / "lat.toml", study={"name": "lat", "kind": "channel", "trials": 2, "out_dir": out,
                                      "objectives": ["latency", "accuracy"]},
        constraints={"max_size_fraction": 1.0, "max_latency_fraction": 0.5, "max_accuracy_drop": 100.0},
        pruning={"round_to": 4}, priors={"enabled": False}, latency={"warmup": 1, "repeats": 3}))
    run_search(dense_cache(config), progress=False)
    import optuna

    study = optuna.load_study(study_name="lat", storage=config.storage_url)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    dense = study.user_attrs["dense"]
    assert len(trials) == 2 and dense["latency_budget_fraction"] == 0.5
    assert dense["latency_fit_fixed_fraction"] == 0.2
    assert dense["latency_predicted_ms"] == pytest.approx(dense["latency_ms"], rel=1e-12)
    for t in trials:
        a = t.user_attrs
        assert a["latency_predicted_fraction"] <= 0.5 * min(1.0, t.params.get("budget", 1.0))
        # one rule for the repair and the trial's prediction: the fit's shares of the dense model's latency
        share = a["latency_table_ms"] / dense["latency_table_ms"]
        elements = [latency.activation_elements({"name": "vgg", "channels": c, "num_classes": 10})
                    for c in (a["channels"], vgg_channels(config.model.width))]
        fraction = 0.2 + 0.3 * elements[0] / elements[1] + 0.5 * share
        assert elements[0] < elements[1]
        assert a["latency_predicted_fraction"] == pytest.approx(fraction, rel=1e-12)
        assert a["latency_predicted_ms"] == pytest.approx(fraction * a["latency_dense_ms"], rel=1e-12)
        assert all(c % 4 == 0 for c in a["channels"]) and sorted(a["channels"][:-1]) != [8] * 7
        assert t.values[0] == a["latency_fraction"]  # the objective: measured beside the dense model
        assert named_constraints(t)["latency"] == pytest.approx(a["latency_fraction"] - 0.5)
        assert Limits(max_latency_fraction=0.5).met_by(t) == (a["latency_fraction"] <= 0.5)
    line = assert_cli_error(run_main(capsys, "pick", "--storage", config.storage_url, "--study", "lat",
                                     "--max-latency-fraction", "1.5"))
    assert line == "autoprune: error: --max-latency-fraction is a fraction of the dense model's latency in (0, 1], " \
                   "got 1.5"
    written = write_report(config.storage_url, "lat", out / "report", baseline=False)
    assert {"accuracy_vs_latency.png", "latency_predicted_vs_measured.png"} <= set(written)
    assert "latency_predicted_vs_measured.png" in (out / "report" / "report.md").read_text()


# --- any model: traced table entries, the predictor over a cost model, the fit -----------------------------------


class TinyRes(torch.nn.Module):
    """A stem, a residual block (the add couples the stem's channels to the block's output), a strided conv with
    a bias, a depthwise conv and a linear head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        nn = torch.nn
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        x = torch.relu(self.dw(torch.relu(self.down(x))))
        return self.head(x.mean((2, 3)))


def tiny_res(num_classes: int = 10) -> torch.nn.Module:
    return TinyRes(num_classes)


def tiny_res_model(input_size=(3, 16, 16)):
    pytest.importorskip("torch_pruning")
    from autoprune.sources import build_model as build_any

    return build_any(f"module:{__name__}:tiny_res", num_classes=10, input_size=input_size).eval()


def test_onnx_export_of_a_graph_model_takes_its_input_shape():
    import onnxruntime as ort

    model = tiny_res_model((3, 16, 24))
    data, info = latency.onnx_export(model)
    assert info["input"] == "input: float32 [batch, 3, 16, 24]" and info["max_abs_difference"] <= 1e-4
    assert ort.InferenceSession(data, providers=["CPUExecutionProvider"]).get_inputs()[0].shape == ["batch", 3, 16, 24]


def test_table_entries_of_a_graph_model_are_traced_from_its_arch(monkeypatch):
    from autoprune.model import arch_of
    from autoprune.sources import prunable

    traces = []
    real_trace = latency.trace_layers
    monkeypatch.setattr(latency, "trace_layers", lambda *a, **k: traces.append(a[1]) or real_trace(*a, **k))
    model = tiny_res_model()
    p = prunable(model)
    assert p.channel_groups() == {"stem": 8, "conv1": 8, "down": 16}  # the add couples stem and conv2
    dense = latency.layers_of(model)
    assert [la.key for la in dense] == [
        "conv2d 3->8 k3x3 s1x1 p1x1 d1x1 g1 @16x16", "conv2d 8->8 k3x3 s1x1 p1x1 d1x1 g1 @16x16",
        "conv2d 8->8 k3x3 s1x1 p1x1 d1x1 g1 @16x16", "conv2d 8->16 k3x3 s2x2 p1x1 d1x1 g1 bias @16x16",
        "conv2d 16->16 k3x3 s1x1 p1x1 d1x1 g16 @8x8", "linear 16->10 bias @16"]
    assert [la.input_shape for la in dense] == [(3, 16, 16), (8, 16, 16), (8, 16, 16), (8, 16, 16), (16, 8, 8), (16,)]
    pruned = p.prune_channels({"stem": 0.5, "conv1": 0.75, "down": 0.5}, "l1")
    arch = arch_of(pruned)
    assert arch["widths"] == {"stem": 4, "conv1": 2, "down": 8}
    traces.clear()
    layers = latency.layers_of(arch)  # from the plain arch dict (skeleton on meta), no model needed
    assert traces == [[3, 16, 16]]  # traced once, on the arch's input size
    assert [(la.in_channels, la.out_channels, la.groups) for la in layers[:-1]] == [
        (3, 4, 1), (4, 2, 1), (2, 4, 1), (4, 8, 1), (8, 8, 8)]
    assert layers[-1] == latency.Linear(8, 10, True, (8,))
    assert latency.layers_of(pruned) == layers and len(traces) == 1  # memoised per arch
    for la in layers:  # each entry's module runs on its input shape
        with torch.no_grad():
            la.module()(torch.zeros(1, *la.input_shape))


def _output_elements(model, input_size) -> int:
    """Every conv's and linear's output elements in a real forward pass of one example."""
    total = []
    handles = [m.register_forward_hook(lambda m, args, out: total.append(out.numel()))
               for m in model.modules() if isinstance(m, latency.TRACED)]
    with torch.no_grad():
        model.eval()(torch.randn(1, *input_size))
    for h in handles:
        h.remove()
    return sum(total)


def test_activation_elements_are_the_outputs_of_the_timed_layers():
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(8, 6, 5, padding="same", dilation=2),
                          nn.Conv2d(6, 5, 3, padding="valid"), nn.Conv2d(5, 4, (3, 1), stride=(2, 3), padding=(0, 2),
                                                                         dilation=(2, 1)),
                          nn.Flatten(), nn.Linear(4 * 2 * 4, 7))
    layers = latency.trace_layers(model, (3, 17, 15), device="cpu")
    assert sum(layer.out_elements for layer in layers) == _output_elements(model, (3, 17, 15)) == 8 * 9 * 8 + \
        6 * 9 * 8 + 5 * 7 * 6 + 4 * 2 * 4 + 7
    vgg = build_model("vgg", width=0.25)  # its entries by layout: each conv's output, then the logits
    assert latency.activation_elements(vgg) == _output_elements(vgg, (3, 32, 32))
    pruned = tiny_res_model()
    assert latency.activation_elements(pruned) == _output_elements(pruned, (3, 16, 16))


def test_predicted_fraction_over_a_graph_cost_model_is_the_table_share(fake):
    from autoprune import budget
    from autoprune.sources import prunable

    model = tiny_res_model()
    costs = prunable(model).cost_model()
    table = latency.LatencyTable("fake", warmup=0, repeats=1, clock=fake.clock)
    predictor = latency.PredictedFraction(table, costs)
    assert predictor.dense_ms == predictor.dense.table_ms == table.predict_ms(model)  # without a fit: the sum
    for ratios in ({"stem": 0.5}, {"conv1": 0.75, "down": 0.25}, {"stem": 0.8, "conv1": 0.5, "down": 0.5}):
        pruned = prunable(model).prune_channels(ratios, "none")
        want = table.predict_ms(pruned) / table.predict_ms(model)
        assert predictor(costs.widths(costs.kept(ratios, 1))) == pytest.approx(want, rel=1e-12)
        assert budget.channel_cost_fraction(costs, ratios, "latency", latency=predictor) == pytest.approx(
            want, rel=1e-12)
    # Measured beside the dense model, a graph model's input shape is its arch's: 3x16x16, not a CIFAR image.
    meter = latency.Meter("fake", warmup=0, repeats=1, clock=fake.clock)
    n = len(fake.sessions)
    f = meter.figures(pruned, model)
    assert [s[1] for s in fake.sessions[n:n + 2]] == [(1, 3, 16, 16)] * 2  # measured first, then the table
    assert f["latency_table_ms"] == pytest.approx(table.predict_ms(pruned), rel=1e-9)  # another table, same times
    assert f["latency_prediction_error"] == pytest.approx(f["latency_predicted_ms"] / f["latency_ms"] - 1)


def test_the_fit_recovers_its_three_parts_exactly_and_holds_each_at_zero_or_more():
    a, b, c = 0.7, 1.3, 2e-6  # ms, ms per table ms, ms per element
    s0, e0 = 10.0, 1e6
    m0 = a + b * s0 + c * e0
    # Uniform prunes keeping k: the table falls as k^2, the activations as k; or two models (a line, no elements).
    points = [(s0 * k * k, e0 * k, a + b * s0 * k * k + c * e0 * k) for k in (0.75, 0.5, 0.25)]
    fit = latency.LatencyFit.through((s0, e0, m0), *points)
    assert fit.fixed_ms == pytest.approx(a, rel=1e-9) and fit.scale == pytest.approx(b, rel=1e-9)
    assert fit.element_ns == pytest.approx(c * 1e6, rel=1e-9)
    assert fit.fixed_fraction == pytest.approx(a / m0, rel=1e-9)
    assert fit.activation_fraction == pytest.approx(c * e0 / m0, rel=1e-9)
    dense = latency.Footprint(s0, int(e0))
    for s, e in ((1.0, 2e5), (4.0, 7e5), (7.5, 9e5)):  # the budget's fraction: (a + b s + c e) / dense's
        point = latency.Footprint(s, int(e))
        assert fit.fraction(point, dense) == pytest.approx((a + b * s + c * e) / m0, rel=1e-9)
        assert fit.ms(point) == pytest.approx(a + b * s + c * e, rel=1e-9)
    line = latency.LatencyFit.through((10.0, 0, 20.0), (5.0, 0, 11.0), (2.0, 0, 6.0))  # off a line, no elements
    assert line.scale == pytest.approx((5 * 9 + 8 * 14) / (5 ** 2 + 8 ** 2), rel=1e-12) and line.element_ns == 0
    assert line.fixed_ms + line.scale * 10.0 == pytest.approx(20.0, rel=1e-12)
    assert latency.LatencyFit.from_figures(fit.figures()) == fit and latency.LatencyFit.from_figures({}) is None
    # A study recorded before the activation term: its fit has none.
    old = {k: v for k, v in line.figures().items() if k in ("latency_fit_fixed_ms", "latency_fit_scale",
                                                            "latency_fit_fixed_fraction")}
    assert latency.LatencyFit.from_figures(old) == line
    # Measured faster than in proportion (a negative fixed part): the table's share alone.
    assert latency.LatencyFit.through((10.0, 0, 12.0), (5.0, 0, 4.0)) == latency.LatencyFit(0.0, 1.2, 0.0)
    assert latency.LatencyFit.through((10.0, 100, 12.0)) == latency.LatencyFit(0.0, 1.2, 0.0)  # dense alone
    # The smaller model measured slower: the widths do not matter, every config is as slow as dense.
    assert latency.LatencyFit.through((10.0, 0, 12.0), (5.0, 0, 12.5)) == latency.LatencyFit(12.0, 0.0, 1.0)


def test_the_fit_is_the_least_squares_fit_with_no_part_below_zero():
    """Noisy points: no part is negative, and no (scale, per-element) pair that keeps every part >= 0 fits
    the points better (a fine grid over that region)."""
    rng = np.random.default_rng(0)
    s0, e0 = 10.0, 1e6
    for _ in range(25):
        a, b, c = rng.uniform(0, 2), rng.uniform(0, 1.5), rng.uniform(0, 4e-6) * (rng.random() < 0.7)
        m0 = a + b * s0 + c * e0
        pts = [(s0 * k * k, e0 * k, (a + b * s0 * k * k + c * e0 * k) * rng.normal(1, 0.15)) for k in (0.75, 0.5, 0.25)]
        fit = latency.LatencyFit.through((s0, e0, m0), *pts)
        per_element = fit.element_ns * 1e-6
        assert fit.fixed_ms >= 0 and fit.scale >= 0 and per_element >= 0
        assert fit.fixed_ms + fit.scale * s0 + per_element * e0 == pytest.approx(m0, rel=1e-9)

        def loss(bb, cc):
            return sum((m - m0 - bb * (s - s0) - cc * (e - e0)) ** 2 for s, e, m in pts)

        grid = [(bb, cc) for bb in np.linspace(0, m0 / s0, 121) for cc in np.linspace(0, m0 / e0, 121)
                if bb * s0 + cc * e0 <= m0]
        assert loss(fit.scale, per_element) <= min(loss(*g) for g in grid) + 1e-12


def test_the_setup_fit_is_made_on_the_dense_model_and_its_uniform_prunes(fake):
    model = tiny_res_model()
    meter = latency.Meter("fake", warmup=0, repeats=3, clock=fake.clock)
    f = meter.dense_figures(model)
    fit = meter.fit
    assert fit == latency.LatencyFit.from_figures(f)
    points = f["latency_fit_points"]
    assert list(points) == ["uniform 0.25", "uniform 0.5", "uniform 0.75"]
    elements = latency.activation_elements(model)
    assert elements > points["uniform 0.25"]["elements"] > points["uniform 0.75"]["elements"] > 0
    assert fit == latency.LatencyFit.through((f["latency_table_ms"], elements, f["latency_ms"]),
                                             *[(p["table_ms"], p["elements"], p["median_ms"]) for p in points.values()])
    assert fit.ms(latency.Footprint(f["latency_table_ms"], elements)) == pytest.approx(f["latency_ms"], rel=1e-12)
    assert f["latency_predicted_ms"] == pytest.approx(f["latency_ms"], rel=1e-12)
    assert f["latency_ms"] == pytest.approx(FakeRuntime.cost_ms(model, (1, 3, 16, 16)))
    assert set(latency.DENSE_FIGURES) <= set(f)
    # the four models were measured side by side: one session each, on the arch's input shape
    assert [s[1] for s in fake.sessions[:4]] == [(1, 3, 16, 16)] * 4
    # A worker's meter made from the study's records predicts by the same fit.
    joined = latency.Meter.from_config(LatencySection(runtime="fake", warmup=0, repeats=1), dense_figures=f)
    assert joined.fit == fit


def test_a_latency_budget_on_a_graph_model_meets_its_cap_by_the_predictor(fake):
    from autoprune.plan import prune as prune_any
    from autoprune.sources import prunable
    from autoprune.space import BUDGET, SearchSpace, study_latency_budget

    model = tiny_res_model()
    costs = prunable(model).cost_model()
    table = latency.LatencyTable("fake", warmup=0, repeats=1, clock=fake.clock)
    fit = latency.LatencyFit(1.0, 0.5, 0.25, 0.0, 0.3)  # shares: 0.25 fixed, 0.3 activations
    config = StudyConfig()
    config.study.kind = "channel"
    config.constraints.max_latency_ms = 2.0
    cap, predictor = study_latency_budget(config, costs, table=table, fit=fit)  # ms / the fit's dense prediction
    assert predictor.dense_ms == 1.0 + 0.5 * table.predict_ms(model) and cap == 2.0 / predictor.dense_ms < 1
    with pytest.raises(AutopruneError) as exc:  # a cap below the fit's fixed share: no widths reach it
        study_latency_budget(config, costs, table=table, fit=latency.LatencyFit(1.0, 0.5, 0.8))
    assert str(exc.value) == (f"latency cap {2.0 / (1.0 + 0.5 * table.predict_ms(model)):.4f} of the dense model's "
                              f"latency is at or below the fixed share 0.8000 that the setup's latency fit measured "
                              f"(latency no channel pruning removes); raise the cap, or set the study up again on a "
                              f"quieter machine if that share looks wrong")
    space = SearchSpace.build("channel", costs, max_size_fraction=1.0, max_latency_fraction=cap, latency=predictor,
                              budget_low=0.8)
    rng = np.random.default_rng(0)
    for share in (1.0, 0.9):
        ratios, notes = space.repair({**{n: float(rng.uniform(0, 0.6)) for n in costs.groups}, BUDGET: share})
        pruned = prune_any(model, space.plan(ratios)).model
        pruned_at, dense_at = latency.footprint(table, pruned), latency.footprint(table, model)
        got = 0.25 + 0.3 * pruned_at.elements / dense_at.elements + 0.45 * pruned_at.table_ms / dense_at.table_ms
        assert got == pytest.approx(space.cost(ratios)["latency"], rel=1e-12)  # the predictor on the pruned model
        assert got <= cap * share and notes[0].startswith("latency ")


def test_priors_of_a_latency_budget_beyond_the_scan_open_to_its_largest_ratio(fake, monkeypatch):
    """A latency fit with a large fixed share: half the cap (the lowest sampled budget) needs layers emptier
    than the scan went; the priors' bounds open to its largest ratio instead of failing the study's setup."""
    import pandas as pd

    from autoprune import prepare, sensitivity
    from autoprune.budget import as_cost_model, channel_cost_fraction

    costs = as_cost_model(vgg_channels(TINY_WIDTH))
    table = latency.LatencyTable("fake", warmup=0, repeats=1, clock=fake.clock)
    predictor = latency.PredictedFraction(table, costs, fit=latency.LatencyFit(1.0, 0.1, 0.6))  # 60% fixed
    config = StudyConfig()
    config.study.kind = "channel"
    config.study.objectives = ["macs", "accuracy"]  # trials sample budgets down to budget_low (0.5) x the cap
    config.constraints.max_size_fraction = 1.0
    config.constraints.max_latency_fraction = 0.7
    config.priors.grid = [0.3, 0.5, 0.7]
    rows = [{"layer": f"conv{i}", "ratio": r, "accuracy": 80.0 - 10 * r} for i in range(7) for r in (0.3, 0.5, 0.7)]
    monkeypatch.setattr(sensitivity, "scan_cached", lambda *a, **k: (pd.DataFrame(rows), 80.0, True))
    targets = prepare.PriorTargets(config, costs, 10, (0.7, predictor))
    reach = channel_cost_fraction(costs, {f"conv{i}": 0.7 for i in range(7)}, "macs")
    assert targets.at(0.5) < reach  # 0.35 is below the fixed share: uniform pruning as far as it goes
    upper, allocation, info = prepare.compute_study_priors(config, None, "dense.pt", None, False, targets)
    assert upper == {f"conv{i}": 0.7 for i in range(7)}
    assert channel_cost_fraction(costs, allocation, "macs") == pytest.approx(targets.at(1.0), abs=0.01)
