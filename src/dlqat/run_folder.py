"""A training run's folder: what may start in it, its checkpoint, and the settings a resume must keep.

Rules (README "Safety"):
- a folder holding any run artefact is refused unless ``--resume`` (continue that run) or
  ``--overwrite`` (delete *those artefacts*, nothing else, and start afresh);
- checkpoints are loaded with ``torch.load(weights_only=True)``: tensors, numbers, strings and
  containers only (plus the few DeepSpeed state classes a ZeRO checkpoint holds), so a planted
  pickle payload is refused, not run;
- a checkpoint records the settings that define its run; ``--resume`` with any of them changed is
  refused, naming each field (``RESUME_MAY_CHANGE`` lists those that may change; the last phase's
  step count may grow: a finished run trains on);
- the training log is cut back to the checkpoint's step before a resumed run appends to it.
"""

from __future__ import annotations

import json
import pickle
import shutil
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dlqat.fileio import RefusedError, atomic_write, atomic_write_text

if TYPE_CHECKING:
    from dlqat.methods import QuantMethodConfig
    from dlqat.train_config import TrainConfig

CHECKPOINT = "checkpoint.pt"
LOG_FILE = "train_log.jsonl"
CURVE_FILE = "curve.jsonl"
CONFIG_FILE = "run_config.json"
# Everything `dlqat train` writes into a run folder (and `dlqat eval` beside it).
ARTEFACTS = (
    CONFIG_FILE, LOG_FILE, CURVE_FILE, CHECKPOINT, "quant_state.safetensors", "quantized", "results.json", "results.md",
    "eval.json", "eval.md",
)  # fmt: skip
# Settings that do not change what a run computes (or only its float summation order: compile); the run
# folder may have been moved.
RESUME_MAY_CHANGE = (
    "save_every", "progress", "compile", "gradient_checkpointing", "output_dir", "eval_at", "curve_eval_data",
    "start_cache",
)  # fmt: skip
_NOT_SETTINGS = ("resume", "overwrite")
# The step count of a method's last phase may grow on resume: with a constant learning rate and a data
# order fixed by seed and step, a longer run continued from a checkpoint is the run planned longer.
RESUME_MAY_GROW = ("phase2_steps", "steps")
# Settings added after some runs were checkpointed, with the value those runs used: a checkpoint that
# lacks one resumes if the new run asks for that value.
ADDED_SETTINGS = {"lr_schedule": "constant", "warmup_steps": 0}


class CheckpointError(ValueError):
    """A checkpoint that cannot (or must not) be loaded; the message names the file."""


def prepare_run_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Check that a run may start (or resume) in ``out`` before anything is loaded or written."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in output_dir, --overwrite discards it: pass one of them")
    if out.exists() and not out.is_dir():
        raise RefusedError(f"output_dir={str(out)!r}: exists and is not a folder")
    ckpt = out / CHECKPOINT
    if resume:
        if not ckpt.is_file():
            raise FileNotFoundError(f"resume=True but {ckpt} does not exist; start without --resume")
        return
    found = [name for name in ARTEFACTS if (out / name).exists()]
    if found and not overwrite:
        raise RefusedError(
            f"output_dir={str(out)!r} holds a run already ({', '.join(found)}): pass --resume to continue it, "
            "--overwrite to replace it, or pick another --output_dir"
        )


def discard_run(out: Path) -> None:
    """``--overwrite``: remove the previous run's artefacts (only those; other files stay)."""
    for name in ARTEFACTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def run_settings(method_cfg: QuantMethodConfig, cfg: TrainConfig) -> dict:
    """The settings that define a run (what ``run_config.json`` and every checkpoint record), from its resolved
    method and train configs (``resolve_defaults``): one definition for ``dlqat train`` and ``dlqat compare``."""
    return {"method": method_cfg.name, "method_config": method_cfg.to_dict(), "train_config": asdict(cfg)}


def run_schedule(settings: dict | None) -> str | None:
    """The lr schedule in a run's settings (``run_settings``; one from before ``lr_schedule`` existed ran at a
    constant lr), or None without settings."""
    return settings["train_config"].get("lr_schedule", ADDED_SETTINGS["lr_schedule"]) if settings else None


def settings_diffs(saved: dict, current: dict) -> list[str]:
    """Each setting of ``current`` (``run_settings``) that a continuation of the run ``saved`` may not have,
    as ``"key: old -> new"``: any but ``RESUME_MAY_CHANGE``; ``RESUME_MAY_GROW`` only upward at a constant lr."""
    diffs = []
    if saved["method"] != current["method"]:
        diffs.append(f"method: {saved['method']!r} -> {current['method']!r}")
    schedule = run_schedule(current)
    for part in ("method_config", "train_config"):
        new = current[part]
        old = {**{k: v for k, v in ADDED_SETTINGS.items() if k in new}, **saved[part]}
        for key in sorted(set(old) | set(new)):
            if key not in RESUME_MAY_CHANGE + _NOT_SETTINGS and not _same_setting(key, old.get(key), new.get(key)):
                diffs.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
            elif key in RESUME_MAY_GROW and old.get(key) != new.get(key) and schedule != "constant":
                diffs.append(
                    f"{key}: {old.get(key)!r} -> {new.get(key)!r} with lr_schedule={schedule!r} (a decaying "
                    "schedule planned for fewer steps is not the longer run; only a constant lr may grow)"
                )
    return diffs


def check_same_run(saved: dict | None, current: dict, ckpt: Path) -> None:
    """Refuse a resume whose settings differ from the checkpoint's, naming each differing field."""
    if saved is None:
        raise CheckpointError(f"{ckpt}: records no run settings (written by an older dlqat); start a new run")
    diffs = settings_diffs(saved, current)
    if diffs:
        raise CheckpointError(
            f"{ckpt}: --resume with other settings than the run it continues: {'; '.join(diffs)}. Resume with the "
            f"run's settings (see {ckpt.with_name(CONFIG_FILE)}) or start a new run; only "
            f"{', '.join(RESUME_MAY_CHANGE)} may change on resume, and {' or '.join(RESUME_MAY_GROW)} may grow "
            "(the last phase trains longer)"
        )


def check_same_data(saved: str | None, current: str, ckpt: Path) -> None:
    """Refuse a resume on other training examples than the checkpoint's (see ``examples_fingerprint``).
    A checkpoint written before fingerprints were kept (``None``) resumes: its data cannot be checked."""
    if saved is not None and saved != current:
        raise CheckpointError(
            f"{ckpt}: --resume on other training data than the run it continues (the examples' fingerprint "
            f"{saved[:12]} is now {current[:12]}: the data file, its tokenizer or the tokenization changed). "
            "Resume with the run's data or start a new run"
        )


_PATH_SETTINGS = ("model", "data", "eval_data", "teacher")


def _same_setting(key: str, old, new) -> bool:
    """Equal values, or two spellings of one existing file or folder (relative vs absolute, ``..``, links)."""
    if old == new:
        return True
    if key in RESUME_MAY_GROW and isinstance(old, int) and isinstance(new, int):
        return new > old
    if key in _PATH_SETTINGS and isinstance(old, str) and isinstance(new, str):
        a, b = Path(old).expanduser(), Path(new).expanduser()
        return a.exists() and b.exists() and a.resolve() == b.resolve()
    return False


def _engine_classes() -> list:
    """The non-container classes a DeepSpeed ZeRO-1/2 optimizer state holds (allow-listed by name)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def save_checkpoint(state: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's contents, loaded without running any code it might carry."""
    try:
        with torch.serialization.safe_globals(_engine_classes()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0][:200]
        raise CheckpointError(
            f"{path}: refused: it is not a plain dlqat checkpoint (it asks to load Python objects or is corrupt: "
            f"{reason}); nothing from it was run"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint (truncated or not a dlqat checkpoint: {err})") from err
    if not isinstance(state, dict) or not {"step", "quant_state", "optimizer"} <= set(state):
        raise CheckpointError(f"{path}: not a dlqat checkpoint (expected step, quant_state and optimizer entries)")
    return state


def truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps up to ``step`` (the checkpoint's), so a resumed run continues it."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut off by a kill
    atomic_write_text(path, "".join(f"{line}\n" for line in keep))
