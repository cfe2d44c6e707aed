"""A cache of calibrated starts (GPTQ), so that a sweep over learning rates, seeds or losses calibrates once.

A GPTQ start (DL-QAT or L4Q ``--init gptq|gptq-mse``, QA-LoRA ``--base gptq|gptq-mse``) is the slowest part
of a short run: about 12 minutes for Gemma-3-270m on two CPU cores, longer than its 40 training steps. What
calibration writes into the layers depends on the model's weights, the calibration examples, the quantizer
settings and the arithmetic of the machine, not on the learning rate, the seed, the loss or the step counts.
``--start_cache DIR`` keeps it as ``DIR/<key>.safetensors``, the key a sha256 of all of those, and a later run
with the same key loads it instead of calibrating: the same start bit for bit (tested against a fresh one).
safetensors holds tensors only, so a cache file from elsewhere cannot run code; a file is never overwritten.
A start is a full copy of the quantized layers' weights, so a sweep's cache grows: ``dlqat starts DIR`` lists
what each file is and when a run last used it, and removes the ones unused for a given number of days.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import dlqat
from dlqat.eval.tables import markdown_table
from dlqat.fileio import atomic_write

PRODUCER = "dlqat start cache"
FORMAT = 1  # bump when what a cache file holds, or how a start is calibrated, changes


class StartCacheError(ValueError):
    """A cache file that cannot be used; the message names it."""


def model_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer (name, dtype, shape, bytes) of a model before surgery: the
    calibration runs the whole model, so every weight, not only the quantized layers', shapes the start."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def start_key(fields: dict) -> str:
    """The cache key of a start: sha256 of its defining ``fields`` (JSON, sorted keys) and the dlqat version
    (a release may calibrate differently)."""
    text = json.dumps({**fields, "format": FORMAT, "dlqat": dlqat.__version__}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_path(folder: str | Path, key: str) -> Path:
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise StartCacheError(f"start_cache={str(folder)!r}: exists and is not a folder; give a folder for start files")
    return folder / f"{key}.safetensors"


def load_start(path: Path, key: str, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The cached tensors at ``path``, or None where there is no such file. ``expected``: the tensors the
    calibration would write (their names, shapes and dtypes); a file that does not hold exactly those is
    refused, naming it, rather than half-applied."""
    if not path.is_file():
        return None
    try:
        with safe_open(path, "pt") as f:
            stored_key = (f.metadata() or {}).get("key")
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    except (SafetensorError, OSError) as err:
        raise StartCacheError(f"{path}: not a readable start file ({err}); delete it to calibrate again") from err
    if stored_key != key:
        raise StartCacheError(f"{path}: records key {stored_key!r}, not its file name's; delete it to calibrate again")
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise StartCacheError(
            f"{path}: holds other tensors than this start needs (missing {missing[:3]}, unexpected {extra[:3]}); "
            "delete it to calibrate again"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape or tensor.dtype != expected[name].dtype:
            raise StartCacheError(
                f"{path}: {name} is {tuple(tensor.shape)} {tensor.dtype}, expected {tuple(expected[name].shape)} "
                f"{expected[name].dtype}; delete it to calibrate again"
            )
    try:
        os.utime(path)  # "last used", for ``dlqat starts --prune_unused_days``
    except OSError:
        pass  # a read-only shared cache still serves its starts
    return tensors


def save_start(path: Path, key: str, fields: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write the calibrated ``tensors`` atomically (a killed run leaves no half file); ``fields`` are kept
    in the metadata so that a person can tell what a file is."""
    cpu = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    metadata = {"key": key, "fields": json.dumps(fields, sort_keys=True), "producer": PRODUCER}
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


@dataclass(frozen=True)
class StoredStart:
    """One file of a start cache, described from its metadata (no tensor is read)."""

    path: Path
    size: int  # bytes
    last_used: float  # seconds since the epoch: written, or last loaded by a run
    fields: dict


def stored_starts(folder: str | Path) -> tuple[list[StoredStart], list[Path]]:
    """The start files in ``folder``, most recently used first, and the ``*.safetensors`` files there that are
    not dlqat starts (another producer, or a key that is not the file's name): those are never removed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StartCacheError(f"{str(folder)!r}: no such folder; give the folder a run's --start_cache named")
    starts, others = [], []
    for path in sorted(folder.glob("*.safetensors")):
        if path.is_symlink() or not path.is_file():  # a link's target belongs to someone else: never read, never ours
            others.append(path)
            continue
        try:
            with safe_open(path, "pt") as f:
                metadata = f.metadata() or {}
            ours = metadata.get("producer") == PRODUCER and metadata.get("key") == path.stem
            fields = json.loads(metadata["fields"]) if ours else {}
            ours = ours and isinstance(fields, dict)
        except (SafetensorError, OSError, KeyError, json.JSONDecodeError):
            ours = False
        if not ours:
            others.append(path)
            continue
        info = path.stat()
        starts.append(StoredStart(path, info.st_size, info.st_mtime, fields))
    return sorted(starts, key=lambda start: -start.last_used), others


def prune_starts(folder: str | Path, unused_days: float, now: float | None = None) -> list[StoredStart]:
    """Remove the start files of ``folder`` that no run has written or loaded for ``unused_days`` days; the
    removed ones. Only files that are dlqat starts by their metadata are touched: a later run that needs
    one calibrates it again."""
    if not unused_days >= 0:
        raise ValueError(f"prune_unused_days={unused_days!r}: expected a number of days >= 0")
    cutoff = (time.time() if now is None else now) - unused_days * 86400
    removed = []
    for start in stored_starts(folder)[0]:
        if start.last_used < cutoff:
            start.path.unlink(missing_ok=True)
            removed.append(start)
    return removed


def describe_starts(starts: list[StoredStart], others: list[Path]) -> str:
    """A table of a cache's starts (what each file is and when it was last used), for ``dlqat starts``."""
    head = ["file", "MiB", "last used", "start", "layer", "bits", "group", "layers", "model sha256", "torch"]
    rows = [
        [start.path.name, f"{start.size / 2**20:.0f}", time.strftime("%Y-%m-%d %H:%M", time.localtime(start.last_used)),
         f.get("start"), f.get("layer"), f.get("n_bits"), f.get("group_size"), len(f.get("layers") or []),
         str(f.get("model"))[:12], f.get("torch")]
        for start in starts
        for f in [start.fields]
    ]  # fmt: skip
    total = sum(start.size for start in starts) / 2**20
    lines = [markdown_table(head, rows), f"\n{len(starts)} start files, {total:.0f} MiB"]
    lines += [f"not a dlqat start (left alone): {path}" for path in others]
    return "\n".join(lines)
