"""What every ``autoprune`` command shares: the parser's one-line errors, the flag types, the common options, output.

Each flag is checked once, by its argparse type: bad input ends with one line
``autoprune: error: ...`` (see :func:`autoprune.cli.main`). Used by
:mod:`autoprune.cli` and :mod:`autoprune.cli_study`.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

from .errors import AutopruneError


# --- flag checks: each flag is checked once, by its argparse type -------------


class Parser(argparse.ArgumentParser):
    """argparse whose errors follow the house format: one line, no usage dump.

    The subcommands' parsers are of this class too (``add_subparsers`` makes
    them with ``type(parser)``); :func:`autoprune.cli.main` prints the error and returns 2.
    """

    def error(self, message: str):
        message = " ".join(message.split())
        ours = re.fullmatch(r"argument ([^:]+): (must be .*)", message)  # our type checks: they name the fix
        if ours:
            raise AutopruneError(f"{ours[1]} {ours[2]}")
        raise AutopruneError(f"{message.removeprefix('argument ')}; see {self.prog} --help")


def _number(kind: type, ok, rule: str):
    """An argparse type: ``kind`` parsed from the text, finite and ``ok``, else the one-line rule."""

    def check(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return value

    return check


positive_int = _number(int, lambda v: v >= 1, ">= 1 (an integer)")
nonneg_int = _number(int, lambda v: v >= 0, ">= 0 (an integer)")


def seed_int(text: str) -> int:
    from .data import MAX_SEED  # imported here: --help need not load torch

    return _number(int, lambda v: 0 <= v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]")(text)


def batch_sizes(text: str) -> list[int]:
    """argparse type: one batch size or several, comma-separated (1 or 1,8)."""
    check = _number(int, lambda v: 1 <= v <= 4096, "in [1, 4096] (one batch size, or several comma-separated: 1,8)")
    return [check(part.strip()) for part in text.split(",")]


def runtime_name(text: str) -> str:
    """argparse type: a registered latency runtime whose modules are installed (autoprune.latency)."""
    from .latency import RUNTIMES

    if text not in RUNTIMES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(RUNTIMES)}, got {text!r}")
    try:
        RUNTIMES[text].check()
    except AutopruneError as exc:
        raise argparse.ArgumentTypeError(f"must be installed: {exc}") from None
    return text


positive_float = _number(float, lambda v: v > 0, "> 0 (a finite number)")
nonneg_float = _number(float, lambda v: v >= 0, ">= 0 (a finite number)")
finite_float = _number(float, lambda v: True, "a finite number")


def _file_in_the_way(path: Path) -> Path | None:
    """The existing non-directory at ``path`` or above it, which would stop a mkdir; else None."""
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def out_dir(text: str) -> str:
    """argparse type: a directory to write into, refused at once (before any work) if a file is in the way."""
    blocker = _file_in_the_way(Path(text))
    if blocker is not None:
        raise argparse.ArgumentTypeError(f"must be a directory, but {blocker} is a file; pass a directory path")
    return text


def out_file(text: str) -> Path:
    """argparse type: a file to write, refused at once if it is a directory or a file is in the way."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"must be a file path, but {path} is a directory; "
                                         f"name the file, e.g. {path / 'model.pt'}")
    blocker = _file_in_the_way(path.parent)
    if blocker is not None:
        raise argparse.ArgumentTypeError(f"must be in a directory, but {blocker} is a file; pass another path")
    return path


# --- shared options and output ------------------------------------------------


def common_options(p: argparse.ArgumentParser, json_flag: bool = True) -> None:
    """Add --device, --threads, --quiet (and --json) to a command's parser."""
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")
    p.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads for torch")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    if json_flag:
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def emit(args, result: dict, human: str) -> None:
    """Print ``result`` as one JSON object with --json, else the ``human`` text."""
    if getattr(args, "json", False):
        print(json.dumps(result, default=str))
    else:
        print(human)
