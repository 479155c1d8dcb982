"""Fuzz-style robustness: random bytes and small random variations of the files a user hands autoprune.

Seeded and fast: every case calls the CLI in-process (``autoprune.cli.main``) from a scratch
working directory, then checks the house rules for untrusted input:

* no traceback: ``main`` returns (or argparse exits) with 0, 1 or 2, never raises;
* a failure is exactly one ``autoprune: error: ...`` line on stderr;
* nothing is written outside the folders the command was told to write (none at all for
  ``eval``, ``profile`` and ``search --dry-run``; only ``--out`` for ``export``), and no file
  that was there before is changed or removed.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from autoprune.model import build_model, save_checkpoint

from conftest import TINY_WIDTH, run_main, write_study

SEED = 20261129


# --- running a case ---------------------------------------------------------------


def snapshot(root: Path) -> dict:
    """Every path below ``root`` with its type, size and modification time."""
    out = {}
    for p in root.rglob("*"):
        st = p.lstat()
        out[p.relative_to(root)] = (p.is_symlink(), p.is_dir(), st.st_size, st.st_mtime_ns)
    return out


def run(argv: list, capsys) -> tuple[int, str, str]:
    r = run_main(capsys, *argv)
    return r.returncode, r.stdout, r.stderr


def check_case(argv, rc, err, case):
    assert "Traceback" not in err, (case, argv, err)
    assert rc in (0, 1, 2), (case, argv, rc, err)
    if rc != 0:
        errors = [line for line in err.splitlines() if line.startswith("autoprune: error: ")]
        assert len(errors) == 1, (case, argv, err)
        assert len(errors[0]) < 600, (case, errors[0])


def check_writes(root: Path, before: dict, allowed: tuple[str, ...], case) -> None:
    """No path outside ``allowed`` (relative folders) appeared, changed or vanished."""
    after = snapshot(root)

    def ok(rel: Path) -> bool:
        if any(rel == Path(a) or Path(a) in rel.parents for a in allowed):
            return True
        # A folder on the way to an allowed one may be made, and its mtime moves as children appear.
        is_dir = (after.get(rel) or before.get(rel))[1]
        return is_dir and any(rel in Path(a).parents for a in allowed)

    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p) and not ok(p)}
    assert not changed, (case, sorted(map(str, changed))[:10])


# --- generators -------------------------------------------------------------------


def random_value(rng: random.Random):
    return rng.choice([
        lambda: rng.randint(-10, 10), lambda: rng.randint(10**6, 10**12), lambda: -rng.random(),
        lambda: rng.random(), lambda: math.inf, lambda: -math.inf, lambda: math.nan, lambda: "x",
        lambda: "", lambda: "0.25", lambda: True, lambda: None, lambda: [], lambda: ["a", 1],
        lambda: [rng.randint(-5, 30000) for _ in range(rng.randint(0, 10))], lambda: {"k": 1},
        lambda: 1e11, lambda: "../../../etc", lambda: "$x$",
    ])()


def random_bytes(rng: random.Random) -> bytes:
    body = rng.randbytes(rng.randint(0, 3000))
    prefix = rng.choice([b"", b"PK\x03\x04", b"\x93NUMPY", b"[study]\n", b"\x80\x02"])
    return prefix + body


def mutated_checkpoint(rng: random.Random, base: dict) -> dict | list | int:
    sd = {k: v.clone() for k, v in base["state_dict"].items()}
    meta = {"arch": dict(base["autoprune"]["arch"]), "made_by": "fuzz"}
    what = rng.randrange(12)
    if what == 0:
        meta["arch"]["channels"] = random_value(rng)
    elif what == 1:
        meta["arch"]["num_classes"] = random_value(rng)
    elif what == 2:
        meta["arch"] = random_value(rng)
    elif what == 3:
        meta["arch"]["name"] = random_value(rng)
    elif what == 4:
        sd.pop(rng.choice(sorted(sd)))
    elif what == 5:
        key = rng.choice(sorted(sd))
        sd[key] = torch.zeros([rng.randint(0, 5) for _ in range(rng.randint(0, 4))])
    elif what == 6:
        key = rng.choice(sorted(sd))
        sd[key] = sd[key].to(rng.choice([torch.int64, torch.float16, torch.complex64, torch.bool]))
    elif what == 7:
        key = rng.choice([k for k in sd if sd[k].is_floating_point()])
        sd[key] = torch.full_like(sd[key], rng.choice([math.nan, math.inf]))
    elif what == 8:
        sd[rng.choice(sorted(sd))] = random_value(rng)
    elif what == 9:
        return rng.choice([[1, 2], 7, {"state_dict": 5}, {"state_dict": {}}, {}])
    elif what == 10:
        del meta["arch"]
        sd["backbone.conv0.weight"] = torch.zeros(rng.choice([0, 3, 70]), 3, 3, 3)
    else:
        meta = random_value(rng)
    return {"state_dict": sd, "autoprune": meta}


def mutated_npz(rng: random.Random) -> dict:
    n_train, n_test = 60, 20
    arrays = {
        "x_train": np.random.default_rng(rng.randrange(10**6)).integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        "y_train": np.arange(n_train, dtype=np.int64) % 10,
        "x_test": np.zeros((n_test, 32, 32, 3), np.uint8),
        "y_test": np.arange(n_test, dtype=np.int64) % 10,
    }
    key = rng.choice(sorted(arrays))
    what = rng.randrange(8)
    a = arrays[key]
    if what == 0:
        del arrays[key]
    elif what == 1:
        arrays[key] = a.astype(rng.choice([np.float32, np.int8, np.uint16, np.float64, np.bool_]))
    elif what == 2:
        arrays[key] = a[: rng.randint(0, len(a))]
    elif what == 3:
        arrays[key] = a.reshape(len(a), -1) if a.ndim > 1 else a.reshape(-1, 1)
    elif what == 4 and key.startswith("y"):
        arrays[key] = a + rng.choice([10, -11, 10**9])
    elif what == 5:
        arrays[key] = np.array([["a"] * 3], dtype=object)
    elif what == 6:
        arrays[key] = np.zeros((0,) + a.shape[1:], a.dtype)
    else:
        arrays[key] = np.full(a.shape, rng.choice([np.nan, np.inf, 1e30]))
    return arrays


# The tiny study (conftest.TINY_STUDY) with these tables, and a [model] checkpoint.
FUZZ_STUDY = dict(study={"name": "fz", "trials": 2}, constraints={"max_size_fraction": 0.5},
                  finetune={"batch_size": 64}, priors={"tolerance": 10.0})


def toml_value(rng: random.Random) -> str:
    return rng.choice([
        '"5"', "5", "-1", "0", "1e308", "inf", "nan", "-inf", "true", '""', "[0.5, \"x\"]", "[]", "{}",
        '"lamp"', "0.25", '"../../x"', '"a$b"', '"sqlite:///x/y.db"', '"journal:j.log"',
        '"postgresql://u:p@127.0.0.1:1/db"', "1e-9", "999999999999", '"cifar10"', '"synthetic:10"',
        '"npz:nope.npz"', "[1, 2, 3]", '"fine_grained"', '"channel"',
    ])


def mutated_toml(rng: random.Random, base: str) -> str:
    lines = base.splitlines()
    what = rng.randrange(6)
    keyed = [i for i, line in enumerate(lines) if " = " in line]
    if what <= 2:  # a value of another type or out of range
        i = rng.choice(keyed)
        lines[i] = lines[i].split(" = ")[0] + " = " + toml_value(rng)
    elif what == 3:  # a key removed, or an unknown one added
        if rng.random() < 0.5:
            lines.pop(rng.choice(keyed))
        else:
            lines.insert(rng.choice(keyed), f"bogus_{rng.randrange(9)} = 1")
    elif what == 4:  # a table of another name, or a table where a value goes
        lines.insert(0, rng.choice(["[nope]", "study = 5", "[study.inner]"]))
    else:  # cut short anywhere
        text = "\n".join(lines)
        return text[: rng.randrange(len(text))]
    return "\n".join(lines) + "\n"


# --- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model("vgg", width=TINY_WIDTH)
    path = tmp_path_factory.mktemp("fuzz-base") / "base.pt"
    save_checkpoint(model, path, width=TINY_WIDTH, made_by="tests/test_fuzz.py")
    return path


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    """A scratch working directory (relative default outputs land here, where we can see them)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    return tmp_path


# --- the fuzz cases -------------------------------------------------------------------


def test_fuzz_checkpoints_to_eval_and_profile(scratch, base_checkpoint, capsys):
    rng = random.Random(SEED)
    base = torch.load(base_checkpoint, weights_only=True)
    for case in range(40):
        path = scratch / f"ckpt-{case}.pt"
        if case % 4 == 0:
            path.write_bytes(random_bytes(rng))
        else:
            torch.save(mutated_checkpoint(rng, base), path)
        argv = (["eval", "--checkpoint", path, "--data", "synthetic:100", "--json", "-q"] if case % 2 else
                ["profile", "--checkpoint", path, "--no-latency", "--json", "-q"])
        before = snapshot(scratch)
        rc, out, err = run(argv, capsys)
        check_case(argv, rc, err, case)
        check_writes(scratch, before, (), case)


def test_fuzz_npz_data_to_eval(scratch, base_checkpoint, capsys):
    rng = random.Random(SEED + 1)
    codes = set()
    for case in range(30):
        path = scratch / f"data-{case}.npz"
        if case % 5 == 0:
            path.write_bytes(random_bytes(rng))
        else:
            np.savez(path, **mutated_npz(rng))
        argv = ["eval", "--checkpoint", base_checkpoint, "--data", f"npz:{path}", "--val-size", "10", "-q",
                "--split", rng.choice(["test", "val"])]
        before = snapshot(scratch)
        rc, out, err = run(argv, capsys)
        check_case(argv, rc, err, case)
        check_writes(scratch, before, (), case)
        codes.add(rc)
    assert 2 in codes  # the variations do reach the checks


def test_fuzz_study_configs_to_search_dry_run(scratch, base_checkpoint, capsys):
    rng = random.Random(SEED + 2)
    base = write_study(scratch / "study.toml", model={"checkpoint": base_checkpoint}, **FUZZ_STUDY).read_text()
    rc, out, err = run(["search", "study.toml", "--dry-run", "-q"], capsys)
    assert rc == 0, err  # the unmutated config passes, and writes nothing
    assert not (scratch / "reports").exists()
    codes = set()
    for case in range(40):
        path = scratch / f"study-{case}.toml"
        if case % 8 == 0:
            path.write_bytes(random_bytes(rng))
        else:
            path.write_text(mutated_toml(rng, base))
        argv = ["search", path, "--dry-run", "-q"]
        before = snapshot(scratch)
        rc, out, err = run(argv, capsys)
        check_case(argv, rc, err, case)
        check_writes(scratch, before, (), case)
        codes.add(rc)
    assert codes >= {0, 2}


@pytest.fixture(scope="module")
def study(tmp_path_factory, base_checkpoint):
    """A one-trial study with kept weights (fine-grained, loose floor)."""
    from autoprune.config import load_config
    from autoprune.search import run_search

    root = tmp_path_factory.mktemp("fuzz-study")
    tables = {**FUZZ_STUDY, "study": {"name": "fz", "trials": 1}, "fidelity": {"bn_recal_batches": 0},
              "constraints": {"max_size_fraction": 0.5, "max_accuracy_drop": None, "min_accuracy": 0.0}}
    toml = write_study(root / "s.toml", model={"checkpoint": base_checkpoint}, **tables)
    config = load_config(toml)
    config.study.out_dir = str(root / "out")
    config.study.storage = f"sqlite:///{root / 'out' / 'study.db'}"
    summary = run_search(config, progress=False)
    assert summary["feasible_trials"] == 1
    return {"root": root, "url": config.study.storage, "name": config.study.name}


def test_fuzz_export_targets(scratch, study, capsys):
    rng = random.Random(SEED + 3)
    user = scratch / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("the user's own file")
    (scratch / "a-file").write_text("x")
    (scratch / "empty").mkdir()
    os.symlink(scratch / "empty", scratch / "link-to-empty")
    os.symlink(scratch / "a-file", scratch / "link-to-file")
    (scratch / "junk.db").write_bytes(random_bytes(rng))
    (scratch / "junk.log").write_bytes(random_bytes(rng))
    storages = [study["url"], study["url"], study["url"], "sqlite:///junk.db", "journal:junk.log",
                "sqlite:///missing.db", "postgresql://u:p@127.0.0.1:1/db", "nonsense"]
    outs = ["new/deep/out", "mine", "a-file", "empty", "link-to-empty", "link-to-file", ".", "..", "exp$x",
            "new2"]
    for case in range(24):
        out = rng.choice(outs)
        argv = ["export", "--storage", rng.choice(storages), "--study", rng.choice([study["name"], "nope", ""]),
                "--out", out, "-q"]
        argv += rng.choice([["--trial", "0"], ["--trial", str(rng.choice([-1, 7, 10**9]))], ["--pick"], []])
        if rng.random() < 0.5:
            argv.append("--force")
        if rng.random() < 0.3:
            argv += ["--max-size", str(random_value(rng))]
        before = snapshot(scratch)
        rc, _, err = run(argv, capsys)
        check_case(argv, rc, err, case)
        target = (scratch / out).resolve()
        allowed = (str(target.relative_to(scratch.resolve())),) if scratch.resolve() in target.parents else ()
        check_writes(scratch, before, allowed, case)
        assert (user / "notes.txt").read_text() == "the user's own file"
        assert Path(study["url"][len("sqlite:///"):]).is_file()
