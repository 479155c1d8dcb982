"""Nothing lost, nothing leaked: exports, output paths and file writes.

One tiny fine-grained study (width 0.125, synthetic:600, 1 trial of 1 fine-tune
epoch) is made once; tests that change a study work on a copy of its database.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import logging
import os
import re
import shutil
import types
from pathlib import Path

import optuna
import pytest
import torch
from PIL import Image

from autoprune.config import load_config
from autoprune.errors import AutopruneError
from autoprune.export import export
from autoprune.files import atomic_write, safe_name
from autoprune.pick import pick
from autoprune.report import trials_frame, uniform_baseline, write_report
from autoprune.search import run_search
from autoprune.storage import redact
from autoprune.study import open_existing

from conftest import run_cli
from test_report import fabricate, study_toml


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("safety")
    name = "tiny-safety"
    config = load_config(study_toml(root, tiny_checkpoint, "fine_grained", 0.3, False, name=name, trials=1))
    run_search(config, progress=False)
    s, _ = open_existing(config.storage_url, name)
    trial, _ = pick(s, config, require_weights=True)
    return {"url": config.storage_url, "name": name, "dir": root / "reports" / name, "trial": trial.number}


def copy_study(study, to: Path, name: str | None = None) -> str:
    """The study copied into ``to/study.db`` (under ``name``); the artifacts stay where they are."""
    to.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{to / 'study.db'}"
    optuna.copy_study(from_study_name=study["name"], from_storage=study["url"], to_storage=url,
                      to_study_name=name or study["name"])
    return url


def listing(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` (relative) and its bytes (None for a folder or link)."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() and not p.is_symlink() else None
            for p in sorted(folder.rglob("*"))}


# --- export --out and --force ----------------------------------------------------------------------


def test_force_refuses_a_folder_of_user_files_and_names_them(study, tmp_path):
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "keep.txt").write_bytes(b"precious")
    (out / "sub" / "deep.txt").write_bytes(b"also precious")
    before = listing(out)
    result = run_cli("export", "--storage", study["url"], "--study", study["name"], "--trial", study["trial"],
                     "--out", out, "--force")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("autoprune: error: --out") and "holds keep.txt, sub/" in line, line
    assert "only an earlier autoprune export" in line
    assert listing(out) == before
    # An earlier export plus a file of the user's: refused too, the export untouched.
    done = tmp_path / "done"
    export(study["url"], study["name"], done, trial=study["trial"])
    (done / "notes.txt").write_text("mine")
    before = listing(done)
    with pytest.raises(AutopruneError, match="holds notes.txt, not written by autoprune export"):
        export(study["url"], study["name"], done, trial=study["trial"], force=True)
    assert listing(done) == before
    # Export file names alone are not enough: model.pt must be one that export wrote.
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "plan.json").write_text("{}")
    shutil.copyfile(Path(open_existing(study["url"], study["name"])[0].user_attrs["checkpoint"]), fake / "model.pt")
    before = listing(fake)
    with pytest.raises(AutopruneError, match="holds no model.pt written by autoprune export"):
        export(study["url"], study["name"], fake, trial=study["trial"], force=True)
    assert listing(fake) == before


def test_force_never_replaces_the_study_itself(study, tmp_path):
    # A copy of the study's folder (database and artifacts), its attributes pointing at the copied artifacts.
    folder = tmp_path / "studyfolder"
    shutil.copytree(study["dir"], folder)
    url = f"sqlite:///{folder / 'study.db'}"
    s = optuna.load_study(study_name=study["name"], storage=url)
    s.set_user_attr("artifact_dir", str(folder / "artifacts"))
    s.set_user_attr("artifact_store", {"kind": "file", "path": str(folder / "artifacts")})
    before = listing(folder)
    with pytest.raises(AutopruneError, match=r"holds the study's storage \(.*study.db\)") as info:
        export(url, study["name"], folder, trial=study["trial"], force=True)
    assert "\n" not in str(info.value)
    with pytest.raises(AutopruneError, match="holds the study's artifact directory"):
        export(url, study["name"], folder / "artifacts", trial=study["trial"], force=True)
    assert listing(folder) == before
    s, config = open_existing(url, study["name"])  # the study is all there: pick and export still work
    assert pick(s, config, require_weights=True)[0].number == study["trial"]
    export(url, study["name"], tmp_path / "export", trial=study["trial"])


def test_force_replaces_an_earlier_export_in_place_even_as_dot(study, tmp_path, monkeypatch):
    done = tmp_path / "done"
    export(study["url"], study["name"], done, trial=study["trial"])
    fresh = listing(done)
    (done / "plan.json").write_text("stale")
    (done / "model.ts").write_bytes(b"from an earlier channel export")  # a file the new export lacks
    monkeypatch.chdir(done)
    result = export(study["url"], study["name"], ".", trial=study["trial"], force=True)
    assert result["out"] == "."
    assert listing(done).keys() == fresh.keys()  # model.ts removed, no staging folder left
    assert (done / "plan.json").read_bytes() == fresh["plan.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done"]  # nothing renamed or left beside it
    # `..` holding a folder (the one we are in) is not an export: refused, no `..old-*` left anywhere.
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    with pytest.raises(AutopruneError, match=r"--out \.\. holds b/"):
        export(study["url"], study["name"], "..", trial=study["trial"], force=True)
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b"] and not any((tmp_path / "a" / "b").iterdir())


def test_out_may_be_a_link_to_a_folder(study, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    export(study["url"], study["name"], link, trial=study["trial"])
    assert link.is_symlink()  # written through the link, into the folder
    assert sorted(p.name for p in target.iterdir()) == ["metrics.json", "model.pt", "plan.json", "sparse.npz"]
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(AutopruneError, match="symbolic link to .*nowhere, which does not exist"):
        export(study["url"], study["name"], dangling, trial=study["trial"])
    assert not (tmp_path / "nowhere").exists()


def test_a_write_failure_is_not_called_a_read_failure(study, tmp_path, monkeypatch):
    done = tmp_path / "done"
    export(study["url"], study["name"], done, trial=study["trial"])
    before = listing(done)
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        real_save(obj, io.BytesIO())
        Path(f).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(AutopruneError) as info:
        export(study["url"], study["name"], done, trial=study["trial"], force=True)
    message = str(info.value)
    assert message.startswith(f"cannot write the export to {done}: No space left on device"), message
    assert "read" not in message
    assert listing(done) == before  # the earlier export as it was, no staging left
    with pytest.raises(AutopruneError, match="cannot write the export"):
        export(study["url"], study["name"], tmp_path / "new" / "deeper", trial=study["trial"])
    assert not (tmp_path / "new").exists()  # the folders made for --out are gone again
    monkeypatch.undo()
    # A trial whose artifact is gone is a read failure, and nothing is written.
    url = copy_study(study, tmp_path / "copy")
    s = optuna.load_study(study_name=study["name"], storage=url)
    lost = fabricate(s, s.trials[study["trial"]], weights_artifact_id="no-such-artifact")
    with pytest.raises(AutopruneError, match=f"cannot read the weights of trial {lost} from "):
        export(url, study["name"], tmp_path / "lost", trial=lost)
    assert not (tmp_path / "lost").exists()


# --- atomic writes ---------------------------------------------------------------------------------


def test_writes_never_follow_a_planted_link_nor_leave_a_temporary_file(tmp_path):
    from autoprune.model import build_model, load_checkpoint, save_checkpoint
    from autoprune.plots import param_share_chart

    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    model = build_model("vgg", width=0.125)
    (tmp_path / "d.pt.tmp").symlink_to(victim)  # what `train --out d.pt` used to write through
    (tmp_path / f"shares.tmp{os.getpid()}.png").symlink_to(victim)  # plots' old temporary name
    save_checkpoint(model, tmp_path / "d.pt", made_by="test")
    param_share_chart(model, tmp_path / "shares.png")
    assert victim.read_bytes() == b"untouched"
    assert load_checkpoint(tmp_path / "d.pt")[1]["made_by"] == "test"
    Image.open(tmp_path / "shares.png").verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["victim", "d.pt.tmp", f"shares.tmp{os.getpid()}.png", "d.pt", "shares.png"])
    assert (tmp_path / "d.pt").stat().st_mode & 0o777 == 0o666 & ~_umask()  # an ordinary file, not mkstemp's 0600
    # A failed replacement (the target is a folder) leaves the target and no temporary file.
    (tmp_path / "dir").mkdir()
    with pytest.raises(OSError):
        atomic_write(tmp_path / "dir", "text")
    assert (tmp_path / "dir").is_dir() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_failed_report_write_leaves_no_temporary_file(study, tmp_path):
    out = tmp_path / "report"
    (out / "trials.csv").mkdir(parents=True)  # the first file the report writes cannot replace a folder
    with pytest.raises(AutopruneError, match=r"cannot write .*trials.csv: Is a directory; .*--out") as info:
        write_report(study["url"], study["name"], out, baseline=False)
    assert "\n" not in str(info.value)
    assert [p.name for p in out.iterdir()] == ["trials.csv"] and not any((out / "trials.csv").iterdir())


# --- the worker's dense-checkpoint cache -----------------------------------------------------------


class _Store:
    """An artifact store holding one file."""

    def __init__(self, data: bytes):
        self.data = data

    def open_reader(self, artifact_id):
        return io.BytesIO(self.data)


def test_cache_file_is_named_by_a_hash_not_by_the_artifact_id(tmp_path, monkeypatch, tiny_checkpoint):
    from autoprune.study import cache_dir, study_checkpoint

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a" / "b" / "c"))
    data = tiny_checkpoint.read_bytes()
    attrs = {"checkpoint": str(tmp_path / "gone.pt"), "checkpoint_artifact_id": "/../../../pwn"}
    got = Path(study_checkpoint(types.SimpleNamespace(user_attrs=attrs), _Store(data)))
    assert got == cache_dir() / f"dense-{hashlib.sha256(b'/../../../pwn').hexdigest()[:16]}.pt"
    assert got.read_bytes() == data
    assert [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()] == [
        str(got.relative_to(tmp_path))]  # nothing outside the cache, no temporary file
    # With a recorded sha256 the name is the digest; bytes that do not match it are not kept.
    sha = hashlib.sha256(data).hexdigest()
    attrs.update(checkpoint_sha256=sha)
    assert Path(study_checkpoint(types.SimpleNamespace(user_attrs=attrs), _Store(data))).name == f"dense-{sha[:16]}.pt"
    attrs.update(checkpoint_sha256="0" * 64)
    with pytest.raises(AutopruneError, match="does not match its recorded sha256"):
        study_checkpoint(types.SimpleNamespace(user_attrs=attrs), _Store(data))
    assert sorted(p.name for p in cache_dir().iterdir()) == sorted([got.name, f"dense-{sha[:16]}.pt"])


# --- the report of a study with hostile text -------------------------------------------------------

NASTY = "../../a$b_c_d$ **x**|[y](z)<script>"
PASSWORD_URL = "postgresql://u:7@h/db"
CHECKPOINT = "ck`pt`**[l](h)**<b>.pt"


@pytest.fixture(scope="module")
def nasty(study, tmp_path_factory):
    """A copy of the study named NASTY, its stored config naming a storage with password 7 and its checkpoint
    path full of markdown, reported with the default --out from a working folder two levels down."""
    root = tmp_path_factory.mktemp("nasty")
    url = copy_study(study, root / "db", name=NASTY)
    s = optuna.load_study(study_name=NASTY, storage=url)
    cfg = s.user_attrs["config"]
    cfg["study"]["storage"] = PASSWORD_URL
    s.set_user_attr("config", cfg)
    s.set_user_attr("checkpoint", CHECKPOINT)
    cwd = root / "work" / "here"
    out = cwd / "reports" / safe_name(NASTY)
    out.mkdir(parents=True)
    victim = root / "victim"
    victim.write_bytes(b"untouched")
    pid = os.getpid()
    planted = [f"trials.csv.tmp{pid}", f"report.html.tmp{pid}", f"pareto.tmp{pid}.png"]  # the old temporary names
    for name in planted:
        (out / name).symlink_to(victim)
    before = Path.cwd()
    os.chdir(cwd)
    try:
        written = write_report(url, NASTY, baseline=False)
    finally:
        os.chdir(before)
    return {"root": root, "url": url, "out": out, "written": written, "victim": victim, "planted": planted}


def test_safe_name_is_one_harmless_component():
    for name in ("../../escaped", ".", "..", "", "/", ".hidden", "a/b", "a\\b", NASTY, "x\n"):
        safe = safe_name(name)
        assert re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", safe), (name, safe)
    assert safe_name("tiny-fine_grained.v2") == "tiny-fine_grained.v2"  # ordinary names unchanged
    assert safe_name("a b") != safe_name("a_b")  # two studies never share a folder


def test_report_of_a_study_named_with_dots_stays_under_reports(nasty):
    root = nasty["root"]
    assert nasty["written"]["report.html"] == str(Path("reports") / safe_name(NASTY) / "report.html")
    assert {p.name for p in (root / "work").iterdir()} == {"here"}
    assert {p.name for p in root.iterdir()} == {"db", "work", "victim"}  # nothing escaped upwards
    out = nasty["out"]
    assert all(p == out or out in p.parents or p in out.parents for p in (root / "work").rglob("*"))


def test_report_of_a_study_named_with_dollars_draws_its_figures(nasty):
    # "$b_c_d$" is not valid mathtext (double subscript): titles holding the name must not be parsed as math.
    for name in ("pareto.png", "picked_layers.png", "history.png", "report.html"):
        assert name in nasty["written"] and (nasty["out"] / name).stat().st_size > 0, name


def test_report_escapes_study_text(nasty):
    md = (nasty["out"] / "report.md").read_text()
    assert md.startswith("# autoprune report: ../../a\\$b\\_c\\_d\\$ \\*\\*x\\*\\*\\|\\[y\\](z)\\<script\\>\n")
    assert "Study **../../a\\$b\\_c\\_d\\$ \\*\\*x\\*\\*\\|\\[y\\](z)\\<script\\>**" in md
    assert "<script>" not in md and "[y](z)" not in md
    assert "dense checkpoint: ``ck`pt`**[l](h)**<b>.pt``." in md  # a code span: literal text
    page = (nasty["out"] / "report.html").read_text()
    assert "<script>" not in page and "<b>" not in page
    assert "<strong>../../a$b_c_d$ **x**|[y](z)&lt;script&gt;</strong>" in page
    assert "<code>ck`pt`**[l](h)**&lt;b&gt;.pt</code>" in page


def test_report_redacts_the_url_and_leaves_everything_else_intact(nasty):
    out = nasty["out"]
    shown = redact(PASSWORD_URL)
    assert shown == "postgresql://u:***@h/db"
    for path in out.iterdir():
        if path.is_file() and not path.is_symlink() and path.suffix in (".md", ".html", ".csv", ".json"):
            text = path.read_text()
            assert "u:7@" not in text, path.name
    assert shown in (out / "report.md").read_text()
    # trials.csv is the study's table, digit for digit (no password scrubbing turned 7s into ***).
    s, config = open_existing(nasty["url"], NASTY)
    assert (out / "trials.csv").read_text() == trials_frame(s, config).to_csv(index=False)
    # Every embedded image is the PNG file, byte for byte, and decodes.
    page = (out / "report.html").read_text()
    embedded = re.findall(r"<img alt='([^']*)' src='data:image/png;base64,([^']*)'>", page)
    assert len(embedded) >= 3
    for name, data in embedded:
        png = base64.b64decode(data)
        assert png == (out / name).read_bytes(), name
        Image.open(io.BytesIO(png)).verify()
    # The old predictable temporary names, planted as links, were never written through.
    assert nasty["victim"].read_bytes() == b"untouched"
    assert all((out / name).is_symlink() for name in nasty["planted"])


# --- the uniform baseline's cache ------------------------------------------------------------------


def test_a_damaged_baseline_cache_is_ignored_and_rewritten(study, tmp_path, monkeypatch, caplog):
    import autoprune.baseline

    # The cache is the subject here, not the fine-tuning: one quick fake epoch.
    monkeypatch.setattr(autoprune.baseline, "finetune", lambda *a, **k: [{"val_accuracy": 42.0}])
    s, config = open_existing(study["url"], study["name"])
    key = uniform_baseline(s, config, tmp_path)["key"]
    cache = tmp_path / "baseline-cache.json"
    for damage in ["not json {", "[1, 2]", '{"KEY": 5}', '{"KEY": {"key": "KEY"}}']:
        cache.write_text(damage.replace("KEY", key))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="autoprune"):
            got = uniform_baseline(s, config, tmp_path)
        assert not got["from_cache"] and got["val_accuracy"] == 42.0, damage
        assert "uniform baseline: ignoring the" in caplog.text, damage
        again = uniform_baseline(s, config, tmp_path)  # rewritten: read back
        assert again["from_cache"] and again["key"] == key, damage
