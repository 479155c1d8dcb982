"""The commands that read a finished study: ``report``, ``pick`` and ``export``.

Registered on the main parser by :func:`add_commands` (see :mod:`autoprune.cli`).
"""

from __future__ import annotations

import argparse
import logging

from .cli_common import emit, finite_float, nonneg_int  # ranges: pick.study_limits checks them, for library callers too

log = logging.getLogger("autoprune")


def _study_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", required=True, metavar="URL",
                   help="the study's storage: sqlite:///PATH | postgresql://... | journal:PATH")
    p.add_argument("--study", required=True, metavar="NAME", help="study name")


def _pick_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pick options (defaults: the study's own constraints)")
    g.add_argument("--max-size", type=finite_float, metavar="F", help="largest nonzero size as a fraction of dense")
    g.add_argument("--min-accuracy", type=finite_float, metavar="A", help="lowest validation accuracy, percent")
    g.add_argument("--max-macs", type=finite_float, metavar="F", help="largest MACs as a fraction of dense")
    g.add_argument("--max-latency-ms", type=finite_float, metavar="T",
                   help="largest measured latency in ms (channel studies)")
    g.add_argument("--max-latency-fraction", type=finite_float, metavar="F",
                   help="largest measured latency as a fraction of the dense model's, timed beside it "
                        "(channel studies)")
    g.add_argument("--prefer", choices=("accuracy", "size", "macs", "latency"), default="accuracy",
                   help="accuracy: highest validation accuracy (default); size/macs/latency: smallest, "
                        "ties by accuracy")


def _pick_kwargs(args) -> dict:
    return {"max_size": args.max_size, "min_accuracy": args.min_accuracy, "max_macs": args.max_macs,
            "max_latency_ms": args.max_latency_ms, "max_latency_fraction": args.max_latency_fraction,
            "prefer": args.prefer}


def cmd_report(args) -> int:
    from .report import write_report

    written = write_report(args.storage, args.study, args.out, baseline=not args.no_baseline, device=args.device,
                           progress=not args.quiet)
    human = "\n".join([f"wrote the report of study {args.study} to {written['report.html']}"] +
                      [f"  {name:<26} {path}" for name, path in written.items()])
    emit(args, {"study": args.study, "files": written}, human)
    return 0


def cmd_pick(args) -> int:
    from .pick import format_pick, pick, pick_result, study_limits
    from .study import open_existing

    study, config = open_existing(args.storage, args.study)
    kw = _pick_kwargs(args)
    best, runners = pick(study, config, **kw)
    limits = study_limits(study, config, kw["max_size"], kw["min_accuracy"], kw["max_macs"], kw["max_latency_ms"],
                          kw["max_latency_fraction"])
    result = pick_result(study, config, best, runners, limits, args.prefer)
    emit(args, result, format_pick(result, config.cost_attr))
    return 0


def cmd_export(args) -> int:
    from .errors import AutopruneError
    from .export import export, format_export

    picking = any(v is not None for k, v in _pick_kwargs(args).items() if k != "prefer") or args.prefer != "accuracy"
    if args.trial is None and not args.pick:
        raise AutopruneError("say which trial to export: --trial N, or --pick [pick options]")
    if args.trial is not None and (args.pick or picking):
        raise AutopruneError("--trial N cannot be combined with --pick or pick options; use one")
    result = export(args.storage, args.study, args.out, trial=args.trial,
                    pick_kwargs=_pick_kwargs(args) if args.pick else None, force=args.force)
    emit(args, result, format_export(result))
    return 0


def add_commands(sub, common) -> None:
    """Add report, pick and export to the main parser's subcommands; ``common`` adds --json etc."""
    p = sub.add_parser("report", help="trials.csv, figures and an HTML report of a study")
    _study_options(p)
    p.add_argument("--out", metavar="DIR", help="output directory (default reports/<study>, the name made safe "
                                                "as one folder name)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the uniform-pruning baseline (else computed once, fine-tuned, and cached)")
    common(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("pick", help="the best fully fine-tuned trial that meets deployment limits")
    _study_options(p)
    _pick_options(p)
    common(p)
    p.set_defaults(func=cmd_pick)

    p = sub.add_parser("export", help="write a trial's model (model.pt, sparse.npz or model.ts) to a directory")
    _study_options(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--trial", type=nonneg_int, metavar="N", help="the trial number to export")
    which.add_argument("--pick", action="store_true", help="export what `autoprune pick` chooses")
    _pick_options(p)
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write (new or empty; a symbolic "
                                                               "link to one is written through)")
    p.add_argument("--force", action="store_true", help="replace an earlier autoprune export in --out (a folder "
                                                        "holding anything else is refused)")
    common(p)
    p.set_defaults(func=cmd_export)
