"""The ``autoprune`` command: a thin layer over the library's functions.

Commands that report figures take ``--json`` and then print exactly one JSON
object on stdout; progress and logs go to stderr. Bad input ends with one line
``autoprune: error: ...`` and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .cli_common import (Parser, batch_sizes, common_options, emit, nonneg_float, nonneg_int, out_dir, out_file,
                         positive_float, positive_int, runtime_name, seed_int)
from .errors import AutopruneError

log = logging.getLogger("autoprune")


# --- shared options ----------------------------------------------------------


def _data_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required, metavar="SPEC",
                   help="cifar10 | npz:PATH | synthetic[:N]")
    p.add_argument("--data-root", metavar="DIR", help="where CIFAR-10 lives (cifar10 spec)")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 if absent")
    p.add_argument("--val-size", type=positive_int, metavar="N",
                   help="validation images carved from training data (default: min(5000, train/5))")
    p.add_argument("--data-seed", type=seed_int, default=0, help="seed of the validation carve (default 0)")


def _load_data(args):
    from .data import load_data

    return load_data(args.data, data_root=args.data_root, download=args.download,
                     val_size=args.val_size, seed=args.data_seed)


def _fmt_profile(d: dict) -> str:
    lines = [
        f"params            {d['params']:,}",
        f"size              {d['size_mib']:.2f} MiB dense, {d['nonzero_size_mib']:.2f} MiB nonzero "
        f"(lab convention), {d['sparse_storage_mib']:.2f} MiB as bitmap+values",
        f"MACs              {d['macs'] / 1e6:.2f} M conv+linear, {d['macs_torchprofile'] / 1e6:.2f} M torchprofile",
    ]
    if "latency_ms" in d:
        lat = d.get("latency", {})
        for size, row in (lat.get("batches") or {str(d["latency_batch_size"]): {"median_ms": d["latency_ms"]}}).items():
            spread = f", IQR {row['iqr_ms']:.2f} ms" if "iqr_ms" in row else ""
            lines.append(f"latency           {row['median_ms']:.2f} ms (median of {lat.get('repeats', '?')}{spread}; "
                         f"batch {size}, {lat.get('runtime', 'torch')}, {lat.get('threads', '?')} thread(s))")
        if "latency_predicted_ms" in d:
            lines.append(f"predicted         {d['latency_predicted_ms']:.2f} ms by the per-layer table "
                         f"({100 * d['latency_prediction_error']:+.1f}% vs measured)")
    if "accuracy" in d:
        lines.insert(0, f"accuracy          {d['accuracy']:.2f}% ({d['split']} split, {d['images']} images)")
    return "\n".join(lines)


# --- commands ----------------------------------------------------------------


def source_option(p) -> None:
    p.add_argument("--source", metavar="module:PKG.MOD:FACTORY",
                   help="the checkpoint's module: source, named to let autoprune import that code (other "
                        "sources need nothing: the checkpoint's arch names them)")


def cmd_train(args) -> int:
    import torch

    from .model import build_model, save_checkpoint
    from .train import DENSE_RECIPE, TrainConfig, evaluate, fit, resolve_device

    device = resolve_device(args.device)
    data = _load_data(args)
    torch.manual_seed(args.seed)  # the initial weights too, not only fit's batches
    model = build_model("vgg", width=args.width, num_classes=data.num_classes).to(device)
    recipe = {**DENSE_RECIPE, **{k: v for k, v in
              dict(lr=args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay).items() if v is not None}}
    config = TrainConfig(epochs=args.epochs, seed=args.seed, **recipe)
    log.info("training vgg width %s on %s, %d epochs", args.width, data.describe(), args.epochs)
    history = fit(model, data.to(device), config, progress=not args.quiet, desc="train")
    val_acc = history[-1]["val_accuracy"]
    test_acc = evaluate(model, data.test.to(device))
    save_checkpoint(model, args.out, width=args.width, data=args.data, val_size=len(data.val),
                    data_seed=args.data_seed, val_accuracy=val_acc, test_accuracy=test_acc,
                    made_by="autoprune train", recipe=config.to_dict())
    result = {"checkpoint": str(args.out), "val_accuracy": val_acc, "test_accuracy": test_acc,
              "epochs": args.epochs, "seconds": sum(h["seconds"] for h in history)}
    emit(args, result, f"wrote {args.out}: val {val_acc:.2f}% ({len(data.val)} images), "
                        f"test {test_acc:.2f}% ({len(data.test)} images)")
    return 0


def cmd_eval(args) -> int:
    from . import metrics
    from .model import load_checkpoint as load_vgg
    from .sources import load_checkpoint
    from .train import evaluate, resolve_device

    model, meta = (load_vgg(args.checkpoint, width=args.width) if args.width is not None
                   else load_checkpoint(args.checkpoint, args.source))
    data = _load_data(args)
    split = getattr(data, args.split)
    model.to(resolve_device(args.device))
    result = {"accuracy": evaluate(model, split), "split": args.split, "images": len(split),
              **metrics.profile(model.cpu(), latency=False)}
    emit(args, result, _fmt_profile(result))
    return 0


def _profile_model(args):
    """The model ``profile`` measures: a checkpoint, the lab's VGG at --width, or --model SOURCE."""
    from .sources import build_model, load_checkpoint

    source_options = (args.cifar_stem or args.model_kwargs is not None or args.num_classes is not None
                      or args.exclude is not None)
    if args.model == "vgg" and source_options:
        raise AutopruneError("--cifar-stem, --model-kwargs, --num-classes and --exclude are for --model "
                             "torchvision:NAME or module:...; the lab's VGG takes --width")
    if args.model != "vgg" and args.width is not None:
        raise AutopruneError(f"--width is for the lab's VGG; for {args.model} pass its own option, e.g. "
                             "--model-kwargs '{\"width_mult\": 0.5}'")
    if args.checkpoint:
        if source_options:
            raise AutopruneError("a checkpoint records its model; drop --cifar-stem, --model-kwargs, --num-classes "
                                 "and --exclude")
        return load_checkpoint(args.checkpoint, source=None if args.model == "vgg" else args.model)[0]
    if args.model == "vgg":
        return build_model("vgg", width=1.0 if args.width is None else args.width)
    kwargs = {}
    if args.model_kwargs is not None:
        try:
            kwargs = json.loads(args.model_kwargs)
        except ValueError:
            kwargs = None
        if not isinstance(kwargs, dict):
            raise AutopruneError(f"--model-kwargs must be a JSON object such as '{{\"width_mult\": 0.5}}', got "
                                 f"{args.model_kwargs!r}")
    if args.cifar_stem:
        kwargs["cifar_stem"] = True
    exclude = [n.strip() for n in (args.exclude or "").split(",") if n.strip()]
    return build_model(args.model, 10 if args.num_classes is None else args.num_classes, exclude=exclude, **kwargs)


def cmd_profile(args) -> int:
    from . import metrics
    from .kinds import KINDS
    from .plan import parse_ratio_spec, plan_for, prune
    from .sources import prunable

    if args.sparsity is not None and args.channel_ratios is not None:
        raise AutopruneError("--sparsity and --channel-ratios cannot be combined; profile one kind "
                             "of pruning at a time")
    if args.criterion and args.sparsity is None and args.channel_ratios is None:
        raise AutopruneError("--criterion needs --sparsity or --channel-ratios")
    if args.round_to != 1 and args.channel_ratios is None:
        raise AutopruneError("--round-to needs --channel-ratios")
    model = _profile_model(args)
    plan = None
    for kind, spec in (("fine_grained", args.sparsity), ("channel", args.channel_ratios)):
        if spec is not None:
            names = None if args.model == "vgg" else KINDS[kind].layers(prunable(model))
            plan = plan_for(model, kind, parse_ratio_spec(spec, kind, names), args.criterion or "", args.round_to)
            model = prune(model, plan).model
    if args.no_latency and (args.predict or args.runtime != "torch"):
        raise AutopruneError("--no-latency skips the latency measurement; drop --predict / --runtime, or drop "
                             "--no-latency")
    view = prunable(model)
    example = view.example_input()
    result = metrics.profile(model.eval(), latency=not args.no_latency, batch_size=args.batch_size,
                             warmup=args.warmup, repeats=args.repeats, runtime=args.runtime,
                             threads=args.threads or 1, predict=args.predict, cache_dir=args.latency_cache,
                             example_input=example)
    if args.model != "vgg":  # the reference count a Torch-Pruning user knows
        from .graph import torch_pruning_count

        result["macs_torch_pruning"] = torch_pruning_count(model, example)["ops"]
    if args.onnx:
        from .files import atomic_write
        from .latency import onnx_export

        data, result["onnx"] = onnx_export(model)
        atomic_write(args.onnx, data)
        result["onnx"]["path"] = str(args.onnx)
    result.update(view.describe())  # channels (the lab's VGG) or widths (group -> channels)
    if plan is not None:
        result["plan"] = plan.to_dict()
    if args.plots:
        from .plots import param_share_chart, weight_histograms

        out = Path(args.plots)
        result["plots"] = {"weights": str(weight_histograms(model, out / "weights.png")),
                           "param_share": str(param_share_chart(model, out / "param_share.png"))}
        log.info("wrote %s and %s", result["plots"]["weights"], result["plots"]["param_share"])
    human = _fmt_profile(result)
    if "macs_torch_pruning" in result:
        human += f"\nMACs (TP)         {result['macs_torch_pruning'] / 1e6:.2f} M by tp.utils.count_ops_and_params"
    human += (f"\nchannels          {result['channels']}" if "channels" in result else
              f"\nwidths            {', '.join(f'{k}={v}' for k, v in result['widths'].items()) or 'dense'}")
    if plan is not None:
        human += f"\npruned            {plan.kind} ({plan.criterion}): " + ", ".join(
            f"{k}={v:g}" for k, v in plan.ratios.items())
    if args.plots:
        human += f"\nplots             {result['plots']['weights']}, {result['plots']['param_share']}"
    if args.onnx:
        human += (f"\nonnx              {args.onnx} (ONNX Runtime matches torch within "
                  f"{result['onnx']['max_abs_difference']:.1e})")
    emit(args, result, human)
    return 0


def cmd_sensitivity(args) -> int:
    from .sensitivity import DEFAULT_GRID, csv_path, curves, normalize_kind, parse_grid, png_path, scan_cached

    kind = normalize_kind(args.kind)
    grid = parse_grid(args.grid) if args.grid else DEFAULT_GRID
    data = _load_data(args)
    df, dense, from_cache = scan_cached(args.checkpoint, data, kind, grid, args.criterion or "", args.out,
                                        progress=not args.quiet, device=args.device, source=args.source)
    result = {"kind": kind, "criterion": df.attrs.get("criterion"), "dense_accuracy": dense,
              "from_cache": from_cache, "csv": str(csv_path(args.out, kind)), "png": str(png_path(args.out, kind)),
              "curves": curves(df)}
    w = max([12, *(len(layer) + 1 for layer in result["curves"])])  # graph models' names are longer
    header = "layer".ljust(w) + "".join(f"{100 * r:>8g}%" for r in grid)
    rows = [f"{layer:<{w}}" + "".join(f"{a:>8.2f}%" for _, a in points) for layer, points in result["curves"].items()]
    human = "\n".join([
        f"{kind} sensitivity ({result['criterion']}), accuracy on {len(data.val)} validation images, "
        f"dense {dense:.2f}%{' (cached)' if from_cache else ''}",
        header, *rows,
        f"wrote {result['csv']} and {result['png']}",
    ])
    emit(args, result, human)
    return 0


def cmd_search(args) -> int:
    from .config import load_config
    from .search import format_summary, run_search

    config = load_config(args.config, trials=args.trials, storage=args.storage, name=args.study_name,
                         seed=args.seed)
    if args.dry_run:
        from .prepare import check_setup, format_setup

        setup = check_setup(config)
        emit(args, setup, format_setup(setup))
        return 0
    summary = run_search(config, device=args.device, progress=not args.quiet)
    emit(args, summary, format_summary(summary))
    return 0


def cmd_worker(args) -> int:
    from .search import format_summary, run_worker

    summary = run_worker(args.storage, args.study, device=args.device, trials=args.trials,
                         progress=not args.quiet)
    emit(args, summary, format_summary(summary))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    result = run_demo(out_dir=Path(args.out), quiet=args.quiet)
    emit(args, result, result.pop("summary", ""))
    return 0


# --- parser ------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="autoprune",
        description="Search per-layer pruning ratios for the lab's VGG with Optuna.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a dense VGG and write a lab-format checkpoint")
    _data_options(p)
    p.add_argument("--width", type=positive_float, default=1.0, help="channel width multiplier (default 1.0)")
    p.add_argument("--epochs", type=positive_int, default=30, help="training epochs (default 30)")
    p.add_argument("--lr", type=positive_float, help=f"peak learning rate (default {0.05})")
    p.add_argument("--batch-size", type=positive_int, help="batch size (default 128)")
    p.add_argument("--weight-decay", type=nonneg_float, help="weight decay (default 5e-4)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--out", required=True, type=out_file, metavar="PATH", help="checkpoint file to write")
    common_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="accuracy and size of a checkpoint or an export")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint file or export directory")
    _data_options(p)
    p.add_argument("--width", type=positive_float, help="the lab's VGG: expected width (default: from the checkpoint)")
    source_option(p)
    p.add_argument("--split", choices=("test", "val"), default="test", help="split to measure (default test)")
    common_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("profile", help="parameters, size, MACs and latency of a (pruned) model")
    p.add_argument("--model", default="vgg", metavar="SOURCE",
                   help="vgg (the lab's, default) | torchvision:NAME (e.g. resnet18; weights=None) | "
                        "module:package.module:factory (your own; also names a checkpoint's user-code source)")
    p.add_argument("--width", type=positive_float, help="the lab's VGG: width multiplier (default 1.0)")
    p.add_argument("--cifar-stem", action="store_true",
                   help="torchvision: adapt the stem to 32x32 inputs (ResNet: 3x3 stride-1 conv1, no maxpool; "
                        "others: first conv at stride 1)")
    p.add_argument("--model-kwargs", metavar="JSON", help='options for the source, e.g. \'{"width_mult": 0.5}\'')
    p.add_argument("--num-classes", type=positive_int, metavar="N", help="classes (default 10)")
    p.add_argument("--exclude", metavar="LAYER[,LAYER...]",
                   help="layers whose channel groups stay dense (e.g. around a channel shuffle)")
    p.add_argument("--checkpoint", metavar="PATH", help="profile this checkpoint instead")
    p.add_argument("--batch-size", type=batch_sizes, default=[1], metavar="B[,B...]",
                   help="latency batch size(s) (default 1; latency_ms is at the first)")
    p.add_argument("--runtime", type=runtime_name, default="torch",
                   help="latency runtime: torch (eager, default) or onnxruntime (pip install 'autoprune[onnx]'); "
                        "timed at --threads (default 1)")
    p.add_argument("--warmup", type=nonneg_int, default=20, help="untimed runs before timing (default 20)")
    p.add_argument("--repeats", type=positive_int, default=100, help="timed runs, median reported (default 100)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--predict", action="store_true",
                   help="also predict the latency from the per-layer lookup table (timed once per layer shape)")
    p.add_argument("--latency-cache", metavar="DIR", default="reports/cache/latency",
                   help="where the lookup tables are cached (default reports/cache/latency, as a study's)")
    p.add_argument("--onnx", type=out_file, metavar="FILE",
                   help="write the (pruned) model as ONNX, checked against torch (pip install 'autoprune[onnx]')")
    p.add_argument("--sparsity", metavar="SPEC",
                   help="fine-grained prune first: one sparsity for all layers (0.8) or layer=value,...")
    p.add_argument("--channel-ratios", metavar="SPEC",
                   help="channel prune first: one ratio for every group (VGG: conv0-conv6) (0.3) or group=value,...")
    p.add_argument("--criterion", help="fine-grained: magnitude; channel: norm (default), none, bn_scale, l1; "
                                       "other sources also tp_magnitude, tp_lamp, tp_bn_scale")
    p.add_argument("--round-to", type=int, choices=(1, 4, 8, 16), default=1,
                   help="channel: kept widths a multiple of this (default 1)")
    p.add_argument("--plots", type=out_dir, metavar="DIR", help="write weights.png and param_share.png here")
    common_options(p)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("sensitivity", help="accuracy with each layer pruned alone, per ratio (cached)")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint file or export directory")
    _data_options(p)
    p.add_argument("--kind", choices=("fine", "fine_grained", "channel"), default="fine",
                   help="fine (weights, default) or channel")
    p.add_argument("--grid", metavar="R,R,...", help="ratios to scan (default 0.4,0.5,...,0.9, as the lab)")
    p.add_argument("--criterion", help="fine: magnitude; channel: norm (default), none, bn_scale, l1")
    source_option(p)
    p.add_argument("--out", type=out_dir, default="reports/sensitivity", metavar="DIR",
                   help="where the CSV, PNG and cache go (default reports/sensitivity)")
    common_options(p)
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser("search", help="run (or resume) an Optuna study from a TOML config")
    p.add_argument("config", metavar="STUDY.toml", help="study config, e.g. studies/demo.toml")
    p.add_argument("--trials", type=positive_int, help="finished trials wanted (default: the config's)")
    p.add_argument("--storage", metavar="URL",
                   help="sqlite:///PATH | postgresql://... | journal:PATH; a relative PATH is relative to the "
                        "working directory (in the TOML's [study] storage: to the TOML's folder)")
    p.add_argument("--study-name", metavar="NAME",
                   help="study name, also its folder reports/NAME (default: the config's)")
    p.add_argument("--seed", type=seed_int, help="sampler and fine-tune seed (default: the config's)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, folders, data and checkpoint, print what would run; write nothing")
    common_options(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("worker", help="join an existing study from any machine and run its trials")
    p.add_argument("--storage", required=True, metavar="URL",
                   help="the study's storage: postgresql://USER:PASSWORD@HOST:PORT/DB (or journal:PATH, sqlite:///PATH)")
    p.add_argument("--study", required=True, metavar="NAME", help="the study's name (made by autoprune search)")
    p.add_argument("--trials", type=positive_int,
                   help="complete trials the study should end with (default: its config's)")
    common_options(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("demo", help="the whole pipeline offline on synthetic data (minutes on a CPU)")
    p.add_argument("--out", type=out_dir, default="reports/demo", help="output directory (default reports/demo)")
    common_options(p)
    p.set_defaults(func=cmd_demo)

    from .cli_study import add_commands  # report, pick, export: reading a finished study

    add_commands(sub, common_options)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                            format="%(message)s", stream=sys.stderr)
        if args.device != "auto":  # refused before any work or any file written
            from .train import resolve_device

            resolve_device(args.device)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        return args.func(args)
    except AutopruneError as exc:
        print(f"autoprune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("autoprune: interrupted; finished work is kept, run the same command again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
