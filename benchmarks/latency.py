"""Deployment latency of channel-pruned models: runtimes, threads, predicted vs measured, latency vs MACs.

For each model (``--models``: the lab's VGG at each of ``--widths``, or a source such as
``torchvision:resnet18``, built with its CIFAR stem at full width), runtime (``torch``
eager, ``onnxruntime``) and thread count, on one
device, the dense model and a set of channel-pruned configs are timed by
:class:`autoprune.latency.Meter`: each config side by side with the dense model
(interleaved repeats after warm-up; median and interquartile range), at every
batch size. Configs: uniform ratios (``--uniform``), a fixed non-uniform plan
(``ramp 0.2-0.7``: 0.2 removed at conv0 rising to 0.7 at conv6; ``--no-ramp``
leaves it out) and ``--random`` seeded per-layer ratios in [0, ``--max-ratio``],
each run with its kept channel counts rounded as ``[pruning] round_to`` rounds
them, for every ``--round-to`` value (hardware-friendly widths: does latency then
follow MACs better?). The weights are random: latency does not
depend on their values.

Per config and batch size it records the MACs reduction (dense MACs / MACs), the
latency reduction (dense ms / ms, measured in the same run) and their ratio (the
issue's "latency reduction / MACs reduction", 1 when latency follows MACs), and
the lookup table's prediction (:class:`autoprune.latency.LatencyTable`, one table
per batch size, cached under ``--cache``) with its error (predicted / measured - 1), two ways
side by side: the table's share of the dense model's sum (the rule before the fit), a fixed share plus the
table's (the fit without its activation term, on the same points) and the study's setup fit
(:class:`autoprune.latency.LatencyFit`, made first on the dense model and its uniform 0.25 / 0.5 / 0.75
prunes, as a study's setup makes it).
The summary gives, per width / runtime / threads / batch, the median of that
ratio and the median and largest |prediction error| over the configs.

Latency figures need an idle machine: the load average is recorded before and
after, with a warning when the machine is busy.

    python benchmarks/latency.py                                    # CPU: widths 1 and 0.125, both runtimes
    python benchmarks/latency.py --widths 0.125 --random 2 --uniform 0.5 --repeats 3 --warmup 1 \\
        --batch-sizes 1 --out /tmp/latency-smoke.json                # a smoke run, seconds
    python benchmarks/latency.py --device cuda                      # torch CUDA and ONNX Runtime's CUDA provider
    python benchmarks/latency.py --models vgg,torchvision:resnet18 --widths 1,0.125 --threads 1 --batch-sizes 1 \\
        --random 3 --no-ramp --round-to 1 --repeats 30 --out benchmarks/results/latency-any.json  # the fit, any model
    python benchmarks/latency.py --widths 1 --threads 1 --batch-sizes 1 --uniform 0.5 --random 0 \\
        --round-to 1,4,8,16 --out benchmarks/results/latency-cpu-round-to.json  # issue 15: round_to, both runtimes

Results go to ``benchmarks/results/latency-<device>.json`` (and a Markdown table beside it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's autoprune, not an installed one

from autoprune import latency  # noqa: E402
from autoprune.budget import as_cost_model  # noqa: E402
from autoprune.errors import AutopruneError  # noqa: E402
from autoprune.metrics import count_macs  # noqa: E402
from autoprune.model import CONV_NAMES  # noqa: E402
from autoprune.sources import build_model, prunable  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def ramp(groups) -> dict[str, float]:
    """A fixed non-uniform plan: 0.2 removed at the first group rising to 0.7 at the last (deep layers hold the
    most redundant channels, the shape channel searches tend to find), so every run has one non-uniform config
    that is not random."""
    groups = list(groups)
    return {n: round(0.2 + 0.5 * i / max(1, len(groups) - 1), 4) for i, n in enumerate(groups)}


def configs(uniform: list[float], random: int, max_ratio: float, seed: int, ramp_plan: bool = True,
            groups=tuple(CONV_NAMES[:-1])) -> list[dict]:
    """Named channel configs over ``groups`` (default the lab's VGG's conv0..conv6; conv7 feeds the head and is
    never cut): uniform ratios, the ramp, then seeded random per-group ratios."""
    out = [{"name": f"uniform {r:g}", "ratios": {n: r for n in groups}} for r in uniform]
    out += [{"name": "ramp 0.2-0.7", "ratios": ramp(groups)}] if ramp_plan else []
    rng = np.random.default_rng(seed)
    for i in range(random):
        out.append({"name": f"random {i}",
                    "ratios": {n: round(float(rng.uniform(0, max_ratio)), 4) for n in groups}})
    return out


def rounded(costs, ratios: dict[str, float], multiple: int) -> dict[str, float]:
    """``ratios`` with each group's kept channels rounded as ``[pruning] round_to = multiple`` rounds them
    (``costs``: a CostModel, or the lab's VGG conv widths); exact ratios ``1 - kept / width``, as
    autoprune.budget returns."""
    if multiple <= 1:
        return ratios
    costs = as_cost_model(costs)
    kept = costs.kept(ratios, multiple)
    return {n: 1.0 - kept[n] / c for n, c in costs.groups.items() if n in ratios}


def dense_model(name: str, width: float):
    """The dense model a run times: the lab's VGG at ``width``, or a source (``torchvision:resnet18``: its CIFAR
    stem, full width)."""
    if name == "vgg":
        return build_model("vgg", width=width).eval()
    return build_model(name, num_classes=10, **({"cifar_stem": True} if name.startswith("torchvision:") else {}))


def run_one(name: str, width: float, runtime: str, threads: int, args) -> list[dict]:
    torch.manual_seed(args.seed)
    dense = dense_model(name, width).eval()
    model_of = prunable(dense)
    costs = model_of.cost_model()
    cfgs = configs(args.uniform, args.random, args.max_ratio, args.seed, ramp_plan=not args.no_ramp,
                   groups=tuple(costs.groups))
    dense_macs = count_macs(dense)
    meter = latency.Meter(runtime, threads, args.batch_sizes, args.warmup, args.repeats, args.device, predict=False)
    # Per batch size: the table, the study's setup fit (the dense model beside its uniform prunes) and, on the
    # same points, the fit without its activation term (the rule before it: a fixed share and the table's).
    fits, fixed_fits, tables, setups = {}, {}, {}, {}
    for b in args.batch_sizes:
        setup = latency.Meter(runtime, threads, [b], args.warmup, args.repeats, args.device, cache_dir=args.cache)
        setups[b] = {k: v for k, v in setup.dense_figures(dense).items() if k.startswith("latency_")}
        fits[b], tables[b] = setup.fit, setup.table
        points = setups[b]["latency_fit_points"].values()
        fixed_fits[b] = latency.LatencyFit.through((setups[b]["latency_table_ms"], 0, setups[b]["latency_ms"]),
                                                   *[(p["table_ms"], 0, p["median_ms"]) for p in points])
        print(f"  {name} w{width:g} {runtime} t{setup.threads} b{b}: fit {setup.fit.fixed_ms:.3f} ms + "
              f"{setup.fit.scale:.3f} x table + {setup.fit.element_ns:.3f} ns x elements (shares: fixed "
              f"{setup.fit.fixed_fraction:.2f}, activations {setup.fit.activation_fraction:.2f})", file=sys.stderr)
    rows = []
    variants = [{"name": "dense", "ratios": {}, "round_to": 1}]
    for cfg in cfgs:
        variants += [{"name": cfg["name"], "ratios": rounded(costs, cfg["ratios"], m), "round_to": m}
                     for m in args.round_to]
    for cfg in variants:
        model = dense if not cfg["ratios"] else model_of.prune_channels(cfg["ratios"], "none")
        macs = count_macs(model)
        f = meter.figures(model.eval(), dense)
        for b, m in f["latency"]["batches"].items():
            table, fit = tables[int(b)], fits[int(b)]
            point, dense_point = latency.footprint(table, model), latency.footprint(table, dense)
            table_ms = point.table_ms
            predicted = latency.calibrated_ms(point, dense_point, m["dense_median_ms"])  # the share alone
            fixed_only = latency.calibrated_ms(point, dense_point, m["dense_median_ms"], fixed_fits[int(b)])
            fitted = latency.calibrated_ms(point, dense_point, m["dense_median_ms"], fit)
            rows.append({
                "model": name, "width": width, "runtime": runtime, "threads": f["latency_threads"],
                "batch_size": int(b), "config": cfg["name"], "round_to": cfg["round_to"], "ratios": cfg["ratios"],
                "widths": costs.kept(cfg["ratios"], 1),
                "macs": macs, "macs_reduction": dense_macs / macs, "median_ms": m["median_ms"], "iqr_ms": m["iqr_ms"],
                "dense_median_ms": m["dense_median_ms"], "latency_reduction": 1.0 / m["fraction"],
                "latency_vs_macs": (1.0 / m["fraction"]) / (dense_macs / macs) if macs != dense_macs else None,
                "table_ms": table_ms, "table_error": table_ms / m["median_ms"] - 1.0,
                "predicted_ms": predicted, "prediction_error": predicted / m["median_ms"] - 1.0,
                "fixed_fit_fixed_fraction": fixed_fits[int(b)].fixed_fraction,
                "fixed_fit_prediction_error": fixed_only / m["median_ms"] - 1.0,
                "fit_fixed_fraction": fit.fixed_fraction, "fit_activation_fraction": fit.activation_fraction,
                "fit_predicted_ms": fitted, "fit_prediction_error": fitted / m["median_ms"] - 1.0,
                **({"setup": setups[int(b)]} if cfg["name"] == "dense" else {}),  # what the fit was made on
            })
            print(f"  {name} w{width:g} {runtime:<11} t{f['latency_threads']} b{b:<3} {cfg['name']:<12} "
                  f"r{cfg['round_to']:<2} {m['median_ms']:8.3f} ms (dense {m['dense_median_ms']:.3f}), "
                  f"MACs /{dense_macs / macs:.2f}, latency /{1.0 / m['fraction']:.2f}; predicted: share "
                  f"{100 * (predicted / m['median_ms'] - 1):+.1f}%, fixed share {100 * (fixed_only / m['median_ms'] - 1):+.1f}%, "
                  f"fit {100 * (fitted / m['median_ms'] - 1):+.1f}%, "
                  f"table sum {100 * (table_ms / m['median_ms'] - 1):+.1f}%", file=sys.stderr)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per model, width, runtime, threads, batch and rounding: medians over the pruned configs (both predictions
    stand on the dense model measured beside each config, so their error there is 0 by construction; the table
    sum's error counts the dense row too)."""
    def key(r):
        return r.get("model", "vgg"), r["width"], r["runtime"], r["threads"], r["batch_size"]

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["config"] != "dense":
            groups.setdefault((*key(r), r.get("round_to", 1)), []).append(r)
    dense = {key(r): r for r in rows if r["config"] == "dense"}
    out = []
    for (model, width, runtime, threads, b, multiple), pruned in groups.items():
        rs = pruned + ([dense[model, width, runtime, threads, b]] if (model, width, runtime, threads, b) in dense
                       else [])
        errors = [abs(r["prediction_error"]) for r in pruned]
        fit_errors = [abs(r["fit_prediction_error"]) for r in pruned if "fit_prediction_error" in r]
        table_errors = [abs(r["table_error"]) for r in rs]
        ratios = [r["latency_vs_macs"] for r in pruned if r["latency_vs_macs"] is not None]
        random = [r for r in pruned if r["config"].startswith("random")]
        out.append({
            "model": model, "width": width, "runtime": runtime, "threads": threads, "batch_size": b,
            "round_to": multiple, "configs": len(pruned),
            "dense_ms": statistics.median(r["dense_median_ms"] for r in rs),
            "latency_vs_macs_median": statistics.median(ratios) if ratios else None,
            "prediction_abs_error_median": statistics.median(errors),
            "prediction_abs_error_max": max(errors),
            "fit_abs_error_median": statistics.median(fit_errors) if fit_errors else None,
            "fit_abs_error_max": max(fit_errors) if fit_errors else None,
            "fixed_fit_abs_error_median": _median_abs(pruned, "fixed_fit_prediction_error"),
            "fixed_fit_abs_error_max": _max_abs(pruned, "fixed_fit_prediction_error"),
            "fit_fixed_fraction": pruned[0].get("fit_fixed_fraction"),
            "fit_activation_fraction": pruned[0].get("fit_activation_fraction"),
            # the random configs alone: the uniform ones sit near the fit's own models (0.25 / 0.5 / 0.75)
            "random_prediction_abs_error_median": _median_abs(random, "prediction_error"),
            "random_fit_abs_error_median": _median_abs(random, "fit_prediction_error"),
            "table_abs_error_median": statistics.median(table_errors),
        })
    return out


def _median_abs(rows: list[dict], key: str) -> float | None:
    values = [abs(r[key]) for r in rows if key in r]
    return statistics.median(values) if values else None


def _max_abs(rows: list[dict], key: str) -> float | None:
    values = [abs(r[key]) for r in rows if key in r]
    return max(values) if values else None


def _pct(a, b) -> str:
    return "-" if a is None else f"{100 * a:.1f}% / {100 * b:.1f}%"


def markdown(summary: list[dict]) -> str:
    lines = ["| model | width | runtime | threads | batch | round_to | dense ms | latency reduction / MACs reduction "
             "(median) | predicted vs measured, the table's share: median / max abs error | a fixed share and the "
             "table's: median / max | **the setup fit**: median / max (shares fixed, activations) | random configs: "
             "the share / the fit, median abs error | the table's sum alone: median abs error |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in summary:
        ratio = "-" if s["latency_vs_macs_median"] is None else f"{s['latency_vs_macs_median']:.2f}"
        shares = "" if s.get("fit_fixed_fraction") is None else (
            f" ({s['fit_fixed_fraction']:.2f}, {s.get('fit_activation_fraction') or 0:.2f})")
        lines.append(f"| {s.get('model', 'vgg')} | {s['width']:g} | {s['runtime']} | {s['threads']} | "
                     f"{s['batch_size']} | {s['round_to']} | {s['dense_ms']:.3f} | {ratio} | "
                     f"{_pct(s['prediction_abs_error_median'], s['prediction_abs_error_max'])} | "
                     f"{_pct(s.get('fixed_fit_abs_error_median'), s.get('fixed_fit_abs_error_max'))} | "
                     f"{_pct(s.get('fit_abs_error_median'), s.get('fit_abs_error_max'))}{shares} | "
                     f"{_pct(s.get('random_prediction_abs_error_median'), s.get('random_fit_abs_error_median'))} | "
                     f"{100 * s['table_abs_error_median']:.1f}% |")
    return "\n".join(lines) + "\n"


def listed(kind, text: str) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", type=lambda t: listed(str, t), default=["vgg"],
                   help="vgg (the lab's, at --widths) and/or model sources such as torchvision:resnet18 (CIFAR "
                        "stem, full width); default vgg")
    p.add_argument("--widths", type=lambda t: listed(float, t), default=[1.0, 0.125],
                   help="the VGG's widths (default 1,0.125)")
    p.add_argument("--runtimes", type=lambda t: listed(str, t), default=list(latency.RUNTIMES),
                   help=f"default {','.join(latency.RUNTIMES)}")
    p.add_argument("--threads", type=lambda t: listed(int, t), default=[1, 0],
                   help="thread counts (0: one per CPU core; default 1,0)")
    p.add_argument("--batch-sizes", type=lambda t: listed(int, t), default=[1, 64], help="default 1,64")
    p.add_argument("--uniform", type=lambda t: listed(float, t), default=[0.3, 0.5, 0.7],
                   help="uniform channel ratios (default 0.3,0.5,0.7)")
    p.add_argument("--random", type=int, default=6, help="seeded random per-layer configs (default 6)")
    p.add_argument("--no-ramp", action="store_true", help="leave out the fixed non-uniform plan (0.2 -> 0.7)")
    p.add_argument("--max-ratio", type=float, default=0.8, help="random ratios in [0, this] (default 0.8)")
    p.add_argument("--round-to", type=lambda t: listed(int, t), default=[1, 4, 8, 16],
                   help="run each config with kept channels rounded to these multiples, as [pruning] round_to "
                        "does (1: the lab's rounding; default 1,4,8,16)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=latency.DEVICES)
    p.add_argument("--cache", type=Path, default=REPO / "reports" / "cache" / "latency",
                   help="lookup-table cache (default reports/cache/latency, as studies')")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/latency-<device>.json)")
    args = p.parse_args(argv)
    try:
        for name in args.runtimes:
            latency.get_runtime(name)
    except AutopruneError as exc:
        p.error(str(exc))

    started = time.perf_counter()
    result = {
        "benchmark": "latency",
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(argv),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": latency.machine(), "python": platform.python_version(), "torch": torch.__version__,
        "runtime_versions": {n: latency.RUNTIMES[n].version() for n in args.runtimes},
        "device": args.device,
        "card": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "definitions": "macs_reduction = dense MACs / MACs; latency_reduction = dense ms / ms (medians, timed "
                       "side by side); latency_vs_macs = latency_reduction / macs_reduction; prediction_error = "
                       "the table's share of the dense model's sum x the dense model's measured median / measured "
                       "median - 1; fit_prediction_error: the same with the setup fit (the dense model and its "
                       "uniform 0.25 / 0.5 / 0.75 prunes measured side by side before the configs: shares of the "
                       "dense latency fixed, in proportion to activation elements, and to the table's sum); "
                       "fixed_fit_prediction_error: the same points fitted without the activation term",
        "load_average_before": os.getloadavg(),
    }
    if args.device == "cpu" and os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        result["warning"] = (f"machine busy (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs): "
                             f"latency figures are not trustworthy")
        print(f"warning: {result['warning']}", file=sys.stderr)
    rows = []
    for name in args.models:
        for width in (args.widths if name == "vgg" else [1.0]):
            for runtime in args.runtimes:
                for threads in args.threads:
                    rows += run_one(name, width, runtime, threads, args)
    result["summary"] = summarize(rows)
    result["rows"] = rows
    result["seconds"] = time.perf_counter() - started
    result["load_average_after"] = os.getloadavg()

    out = args.out or RESULTS / f"latency-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result["summary"])
    out.with_suffix(".md").write_text(f"`{result['command']}` ({result['date']}, {result['machine']['cpu']}"
                                      f"{', ' + result['card'] if result['card'] else ''})\n\n" + table)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
