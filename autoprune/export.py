"""Export one trial of a study as files to deploy, from its kept weights (no retraining).

``export`` writes into a directory:

* ``model.pt``: the lab's checkpoint format ``{'state_dict', 'autoprune': {...}}``
  (``autoprune.load(DIR)`` and ``autoprune eval --checkpoint DIR`` read it);
* ``plan.json``: the pruning plan that ran; ``metrics.json``: the trial's
  record, the figures measured on the exported model, and file sizes;
* fine-grained: ``sparse.npz``: every pruned tensor as a bitmask of its
  nonzeros (``numpy.packbits``) plus the nonzero values, everything else
  dense, zip-compressed; its size on disk reflects the sparsity
  (:func:`load_sparse` reads it back into a state dict);
* channel: ``model.ts``: the physically smaller network as TorchScript
  (``torch.jit.load`` in a Python with torch alone), and ``model.onnx`` (input
  ``input``, float32 [batch, 3, 32, 32]; output ``output``), checked: ONNX
  Runtime's outputs within 1e-4 of torch's. Written when the ``onnx`` extra is
  installed; otherwise metrics.json's ``onnx`` says why it was skipped.

The weights come from the trial's Optuna artifact (``weights_artifact_id``),
loaded with ``weights_only=True`` (read into memory: a read failure and a write
failure are told apart). Files are written to a private temporary directory
inside the target and renamed into place one by one, so a failure leaves no
half-written file; the target directory itself is never renamed. ``force``
replaces only an earlier export (model.pt made by ``autoprune export`` and the
export's own files, nothing else), never a user's files or the study's.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import reprlib
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from optuna.trial import FrozenTrial, TrialState

from . import latency, metrics
from .artifacts import study_artifact_store
from .errors import AutopruneError
from .kinds import KINDS
from .pick import WEIGHTS_ATTR, has_weights, is_feasible, not_deployable_reason, pick, trial_summary
from .sources import model_from_checkpoint, prunable, save_checkpoint
from .storage import storage_file
from .study import open_existing

SPARSE_FORMAT = "autoprune-sparse-v1"


# --- the output directory ------------------------------------------------------

# What an export writes, model.pt first (see _move_into_place).
EXPORT_FILES = ("model.pt", "sparse.npz", "model.ts", "model.onnx", "plan.json", "metrics.json")
MADE_BY = "autoprune export"


def _names(paths: list[Path]) -> str:
    shown = [p.name + ("/" if p.is_dir() else "") for p in paths[:4]]
    return ", ".join(shown) + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")


def _inside(path: Path, out: Path) -> bool:
    try:
        path.resolve().relative_to(out.resolve())
        return True
    except (OSError, ValueError):
        return False


def _made_by_export(path: Path) -> bool:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    meta = obj.get("autoprune") if isinstance(obj, dict) else None
    return isinstance(meta, dict) and meta.get("made_by") == MADE_BY


def check_out_dir(out: Path, force: bool, study_paths: dict[str, Path] | None = None, skip: str = "") -> None:
    """Refuse, before any work, a file, a dangling link, or a non-empty directory unless ``force`` and it
    holds nothing but an earlier export (never the study's own files, ``study_paths``: what -> path)."""
    if out.is_symlink() and not out.exists():
        raise AutopruneError(f"--out {out} is a symbolic link to {os.readlink(out)}, which does not exist; "
                             f"create that folder or choose another --out")
    if out.exists() and not out.is_dir():
        raise AutopruneError(f"--out {out} exists and is not a directory; choose another --out")
    try:
        entries = sorted(p for p in out.iterdir() if p.name != skip) if out.is_dir() else []
    except OSError as exc:
        raise AutopruneError(f"cannot read --out {out}: {exc.strerror or exc}; choose another --out") from None
    if not entries:
        return
    if not force:
        raise AutopruneError(f"--out {out} exists and is not empty; choose a new or empty --out, or pass --force "
                             f"to replace an earlier export there (nothing was written)")
    refuse = "--force replaces only an earlier autoprune export; choose another --out (nothing was touched)"
    for what, path in (study_paths or {}).items():
        if _inside(path, out):
            raise AutopruneError(f"--out {out} holds {what} ({path}); {refuse}")
    foreign = [p for p in entries if p.name not in EXPORT_FILES or p.is_symlink() or not p.is_file()]
    if foreign:
        raise AutopruneError(f"--out {out} holds {_names(foreign)}, not written by autoprune export; {refuse}")
    if not _made_by_export(out / "model.pt"):
        raise AutopruneError(f"--out {out} holds no model.pt written by autoprune export; {refuse}")


def _staging_dir(out: Path) -> tuple[Path, list[Path]]:
    """A private folder inside ``out`` (same filesystem: the files are renamed into place), and the folders
    made for ``out``, deepest first."""
    try:
        created = [p for p in [out, *out.absolute().parents] if not p.exists()]
        out.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".autoprune-export-", dir=out)), created
    except OSError as exc:
        raise AutopruneError(f"cannot write to {out}: {exc.strerror or exc}; choose a writable --out") from None


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename each new file over the old one, then remove old export files the new export lacks.

    ``out`` itself is never renamed (``--out .`` works); model.pt goes first, so an interrupted
    replacement still holds a model.pt made by export and ``--force`` can finish it.
    """
    new = [name for name in EXPORT_FILES if (staging / name).is_file()]
    for name in new:
        os.replace(staging / name, out / name)
    for name in EXPORT_FILES:
        if name not in new:
            (out / name).unlink(missing_ok=True)


# --- the trial's weights -------------------------------------------------------


def find_trial(study, number: int) -> FrozenTrial:
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        last = max(trials) if trials else None
        raise AutopruneError(f"study {study.study_name!r} has no trial {number}; "
                             f"trials are numbered 0 to {last}" if trials else
                             f"study {study.study_name!r} has no trials")
    return trials[number]


def check_exportable(trial: FrozenTrial, config, study_name: str) -> None:
    reason = not_deployable_reason(trial, config)
    if reason is not None:
        if trial.state != TrialState.COMPLETE:
            raise AutopruneError(f"trial {trial.number} of study {study_name!r} did not finish "
                                 f"(state {trial.state.name}); export a COMPLETE trial (autoprune pick lists them)")
        raise AutopruneError(f"trial {trial.number} of study {study_name!r} (state {trial.state.name}) cannot be "
                             f"exported: {reason}; export a fully fine-tuned trial (autoprune pick lists them)")
    if not has_weights(trial):
        why = ("it was infeasible under the study's constraints, and only feasible trials keep theirs"
               if not is_feasible(trial) else "the search ran without an artifact store")
        raise AutopruneError(f"trial {trial.number} of study {study_name!r} (state {trial.state.name}) kept no "
                             f"weights: {why}; export a feasible trial (autoprune pick lists them)")


def artifact_store(study):
    """The study's artifact store (:func:`autoprune.artifacts.study_artifact_store`) and where it is, in words."""
    store = study_artifact_store(study)
    if store is None:
        raise AutopruneError(f"study {study.study_name!r} records no artifact store; its trials kept no weights")
    ua = study.user_attrs
    return store, str((ua.get("artifact_store") or {}).get("path") or ua.get("artifact_dir") or "the study's database")


def load_trial_weights(study, trial: FrozenTrial) -> dict:
    """Read the trial's artifact into memory and load it (weights only); nothing is written."""
    store, base = artifact_store(study)
    try:
        with store.open_reader(trial.user_attrs[WEIGHTS_ATTR]) as reader:
            data = reader.read()
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AutopruneError(f"cannot read the weights of trial {trial.number} from {base}: {reason[:160]}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise AutopruneError(f"the weights artifact of trial {trial.number} holds no state dict")
    return obj


# --- sparse file ---------------------------------------------------------------


def save_sparse(state_dict: dict, path: Path) -> int:
    """Pruned tensors (> 1 dim) as packbits mask + nonzero values; the rest dense. Returns bytes."""
    arrays = {"__format__": np.array(SPARSE_FORMAT)}
    for name, t in state_dict.items():
        a = t.detach().cpu().numpy()
        if t.dim() > 1 and t.is_floating_point():
            mask = a != 0
            arrays[f"{name}::mask"] = np.packbits(mask.reshape(-1))
            arrays[f"{name}::values"] = a[mask]
            arrays[f"{name}::shape"] = np.array(a.shape, dtype=np.int64)
        else:
            arrays[f"{name}::dense"] = a
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)
    return path.stat().st_size


def load_sparse(path: str | os.PathLike) -> dict:
    """Read a ``sparse.npz`` back into a dense state dict (torch tensors).

    The file is untrusted: every array is checked before anything is allocated
    from a declared shape (a few bytes can declare gigabytes).
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {key: z[key] for key in z.files}
    except Exception as exc:  # missing, not a zip, truncated, or holds pickled objects
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AutopruneError(f"{path} is not a readable sparse file: {reason[:160]}") from None
    if "__format__" not in arrays or str(arrays.pop("__format__")) != SPARSE_FORMAT:
        raise AutopruneError(f"{path} is not an autoprune sparse file ({SPARSE_FORMAT})")
    parts: dict[str, dict] = {}
    for key, a in arrays.items():
        name, _, part = key.rpartition("::")
        if not name or part not in ("dense", "mask", "values", "shape"):
            raise AutopruneError(f"{path}: unexpected array {key!r}; expected NAME::dense, or NAME::mask, "
                                 "NAME::values and NAME::shape")
        parts.setdefault(name, {})[part] = a
    out = {}
    for name, p in parts.items():
        if "dense" in p:
            if len(p) > 1:
                raise AutopruneError(f"{path}: {name!r} is stored both dense and sparse; keep one")
            out[name] = torch.from_numpy(_numeric(path, f"{name}::dense", p["dense"]).copy())
            continue
        missing = [f"{name}::{part}" for part in ("mask", "values", "shape") if part not in p]
        if missing:
            raise AutopruneError(f"{path} lacks array {missing[0]!r}; a sparse tensor needs mask, values and shape")
        shape, mask, values = p["shape"], p["mask"], _numeric(path, f"{name}::values", p["values"])
        if shape.dtype.kind not in "iu" or shape.ndim != 1 or len(shape) > 32 or (shape < 0).any():
            raise AutopruneError(f"{path}: {name}::shape must list at most 32 non-negative integer dims, got "
                                 f"{reprlib.repr(shape.tolist())}")
        dims = [int(d) for d in shape]
        n = math.prod(dims)  # Python ints: no overflow
        if mask.dtype != np.uint8 or mask.shape != ((n + 7) // 8,):
            raise AutopruneError(f"{path}: {name}::mask must be {(n + 7) // 8} packed bytes (uint8) for shape "
                                 f"{tuple(dims)}, got {mask.dtype} {list(mask.shape)}")
        bits = np.unpackbits(mask, count=n).view(bool)
        kept = int(bits.sum())
        if values.shape != (kept,):
            raise AutopruneError(f"{path}: {name}::values must hold {kept} values (the mask's set bits), got "
                                 f"{list(values.shape)}")
        flat = np.zeros(n, dtype=values.dtype)
        flat[bits] = values
        out[name] = torch.from_numpy(flat.reshape(dims))
    return out


def _numeric(path, key: str, a: np.ndarray) -> np.ndarray:
    """``a`` in native byte order (torch needs it), if it is an integer or float type torch has."""
    if a.dtype.kind not in "biuf" or a.dtype.itemsize > 8:
        raise AutopruneError(f"{path}: {key} has dtype {a.dtype}; a state dict holds integer or float tensors")
    return a.astype(a.dtype.newbyteorder("="), copy=False)


# --- export --------------------------------------------------------------------


def _val_size(study) -> int | None:
    m = re.search(r"(\d+) val", str(study.user_attrs.get("data", "")))
    return int(m.group(1)) if m else None


def export(storage_url: str, study_name: str, out_dir, trial: int | None = None, pick_kwargs: dict | None = None,
           force: bool = False) -> dict:
    """Write the trial's deployable files into ``out_dir`` (see the module doc); returns what was written."""
    from .plan import PruningPlan
    from .storage import redact

    if trial is None and pick_kwargs is None:
        raise AutopruneError("say which trial to export: --trial N, or --pick [pick options]")
    if trial is not None and pick_kwargs:
        raise AutopruneError("give --trial N or --pick, not both")
    out = Path(out_dir)
    study, config = open_existing(storage_url, study_name)
    study_paths = _study_paths(storage_url, study)
    check_out_dir(out, force, study_paths)
    if trial is not None:
        t = find_trial(study, int(trial))
    else:
        t, _ = pick(study, config, require_weights=True, **(pick_kwargs or {}))
    check_exportable(t, config, study_name)

    obj = load_trial_weights(study, t)
    meta = dict(obj.get("autoprune") or {})
    # the kept arch rebuilds the network (any source; user code only as the study's config names it)
    model, _ = model_from_checkpoint(obj, config.model.source)
    plan = PruningPlan.from_dict(meta["plan"]) if "plan" in meta else None
    a = t.user_attrs
    dense = study.user_attrs.get("dense", {})
    measured = metrics.profile(model, latency=False)
    _check_matches(t, measured)
    size_fraction = measured["nonzero_params"] / dense["params"] if dense.get("params") else a["size_fraction"]
    macs_fraction = measured["macs"] / dense["macs"] if dense.get("macs") else a["macs_fraction"]
    ckpt_meta = {
        "made_by": MADE_BY, "study": study_name, "storage": redact(storage_url),
        "trial": t.number, "kind": config.study.kind,
        "plan": plan.to_dict() if plan else {"kind": config.study.kind, "ratios": a.get("plan", {})},
        "data": config.data.spec, "val_size": _val_size(study), "data_seed": config.data.seed,
        "val_accuracy": a["val_accuracy"], "test_accuracy": a["test_accuracy"],
        "size_fraction": size_fraction, "macs_fraction": macs_fraction,
        "dense_params": dense.get("params"), "dense_macs": dense.get("macs"),
    }
    if "latency_ms" in a:
        ckpt_meta["latency_ms"] = a["latency_ms"]
    result = {
        "study": study_name, "storage": redact(storage_url), "kind": config.study.kind, "trial": t.number,
        "out": str(out), "plan": ckpt_meta["plan"], **prunable(model).describe(),
        "size_fraction": size_fraction, "macs_fraction": macs_fraction,
        "val_accuracy": a["val_accuracy"], "test_accuracy": a["test_accuracy"],
        "accuracy_note": "val_accuracy: validation split carved from training (used to select); "
                         "test_accuracy: reported only, never used to choose",
        "trial_record": trial_summary(t, config), "measured": measured, "dense": dense,
    }
    if "latency_ms" in a:
        result["latency_ms"] = a["latency_ms"]
    script = _torchscript(model) if KINDS[config.study.kind].changes_shape else None
    onnx_bytes = None
    if script is not None:
        onnx_bytes, result["onnx"] = _onnx(model)

    # Everything above only read; from here on a failure is a write failure and says so.
    staging, created = _staging_dir(out)
    try:
        files = {}
        save_checkpoint(model, staging / "model.pt", **ckpt_meta)
        files["model.pt"] = (staging / "model.pt").stat().st_size
        if script is None:
            files["sparse.npz"] = save_sparse(model.state_dict(), staging / "sparse.npz")
            result["sparse_bytes"] = files["sparse.npz"]
            result["dense_bytes"] = files["model.pt"]
            result["sparse_vs_dense"] = files["sparse.npz"] / files["model.pt"]
        else:
            files["model.ts"] = len(script)
            (staging / "model.ts").write_bytes(script)
            if onnx_bytes is not None:
                files["model.onnx"] = len(onnx_bytes)
                (staging / "model.onnx").write_bytes(onnx_bytes)
        (staging / "plan.json").write_text(json.dumps(result["plan"], indent=2) + "\n")
        files["plan.json"] = (staging / "plan.json").stat().st_size
        result["files"] = files
        (staging / "metrics.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        files["metrics.json"] = (staging / "metrics.json").stat().st_size
        check_out_dir(out, force, study_paths, skip=staging.name)  # again: it may have filled meanwhile
        _move_into_place(staging, out)
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as a RuntimeError
        reason = getattr(exc, "strerror", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AutopruneError(f"cannot write the export to {out}: {reason[:160]}; free some space or choose a "
                             f"writable --out") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # removed only while empty, i.e. when the export failed
            with contextlib.suppress(OSError):
                folder.rmdir()
    return result


def _study_paths(storage_url: str, study) -> dict[str, Path]:
    """The study's own files on this machine, which ``--force`` must never replace."""
    paths = {}
    if (path := storage_file(storage_url)) is not None:
        paths["the study's storage"] = path
    art = (study.user_attrs.get("artifact_store") or {}).get("path") or study.user_attrs.get("artifact_dir")
    if art:
        paths["the study's artifact directory"] = Path(art)
    return paths


def _check_matches(trial: FrozenTrial, measured: dict) -> None:
    """The artifact must be the network the trial measured (params, nonzeros, MACs)."""
    a = trial.user_attrs
    for key in ("params", "nonzero_params", "macs"):
        if key in a and int(a[key]) != int(measured[key]):
            raise AutopruneError(f"the kept weights of trial {trial.number} do not match its record ({key} "
                                 f"{measured[key]} vs {a[key]}); the artifact store may hold another study's files")


def _torchscript(model) -> bytes:
    """The (eval-mode) model traced to TorchScript, checked to reproduce its outputs once saved and loaded."""
    import warnings

    x = torch.randn(2, *prunable(model).example_input().shape[1:], generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer / deprecation notices are not the user's concern
        traced = torch.jit.trace(model.eval(), x)
        torch.jit.save(traced, buf)
        loaded = torch.jit.load(io.BytesIO(buf.getvalue()))
        diff = (loaded(x) - model(x)).abs().max().item()
    if diff > 1e-5:
        raise AutopruneError(f"the TorchScript export differs from the model by {diff:g}; please report this")
    return buf.getvalue()


def _onnx(model) -> tuple[bytes | None, dict]:
    """model.onnx's bytes and what metrics.json says of it; without the extra, None and why it was skipped."""
    try:
        latency.need_onnx("model.onnx")
    except AutopruneError as exc:
        return None, {"written": False, "reason": str(exc)}
    return latency.onnx_export(model)


def format_export(r: dict) -> str:
    lines = [f"exported trial {r['trial']} of study {r['study']} ({r['kind']}) to {r['out']}",
             f"  size_fraction {r['size_fraction']:.4f}  macs_fraction {r['macs_fraction']:.4f}  "
             f"val {r['val_accuracy']:.2f}% (selection)  test {r['test_accuracy']:.2f}% (reported only)"
             + (f"  latency {r['latency_ms']:.2f} ms" if "latency_ms" in r else ""),
             f"  channels {r['channels']}" if "channels" in r else f"  widths {r.get('widths') or 'dense'}"]
    if "sparse_bytes" in r:
        lines.append(f"  sparse.npz {r['sparse_bytes']:,} bytes vs dense model.pt {r['dense_bytes']:,} bytes "
                     f"({100 * r['sparse_vs_dense']:.1f}%)")
    lines.append("  files: " + ", ".join(f"{k} ({v:,} B)" for k, v in r["files"].items()))
    onnx = r.get("onnx") or {}
    if onnx.get("written"):
        lines.append(f"  model.onnx: opset {onnx['opset']}, ONNX Runtime matches torch within "
                     f"{onnx['max_abs_difference']:.1e} (tolerance {onnx['tolerance']:g})")
    elif onnx:
        lines.append(f"  model.onnx skipped: {onnx['reason']}")
    lines.append(f"  load with: autoprune.load({r['out']!r})" + (
        f" or torch.jit.load('{r['out']}/model.ts')" if "model.ts" in r["files"] else "") + (
        f" or onnxruntime.InferenceSession('{r['out']}/model.onnx')" if "model.onnx" in r["files"] else ""))
    return "\n".join(lines)
