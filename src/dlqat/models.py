"""Load a causal LM and its tokenizer: hub id, local folder, or a GGUF file (expanded once, cached)."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from dlqat.fileio import atomic_folder
from dlqat.resources import default_gguf

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("DLQAT_CACHE", Path.home() / ".cache" / "dlqat"))


def expand_gguf(gguf_path: Path) -> Path:
    """Expand a GGUF file to a float HF folder once (transformers dequantizes it, ~15 s) and cache it.

    Written to a temporary folder and renamed into place, so a killed expansion never leaves a
    half-written cache behind. Keyed by the file's content, not its path: every reinstall of the
    package (a new virtual environment, a new path) reuses the one expansion instead of adding another
    full-size float copy to the cache.
    """
    gguf_path = gguf_path.resolve()
    target = cache_dir() / f"{gguf_path.stem}-{_content_key(gguf_path)}"
    if (target / "config.json").is_file():
        return target
    log.info("expanding %s to %s (once)", gguf_path, target)
    kwargs = {"gguf_file": gguf_path.name}
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    # The expanded weights are plain floats: drop the GGUF "quantization" marker so the folder
    # loads as an ordinary model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # a concurrent expansion may finish first: both write the same files, either result is right
    with atomic_folder(target, is_ours=lambda _folder: True, overwrite=True, what="model cache") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def _content_key(path: Path, block: int = 1 << 22) -> str:
    """First 12 hex digits of the file's SHA-256 (~0.1 s for the 100 MB default model)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def resolve_model_path(spec: str | None) -> str:
    """``None`` -> the embedded SmolLM2-135M; ``*.gguf`` -> its cached expansion; else unchanged."""
    if spec is None:
        return str(expand_gguf(default_gguf()))
    if spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"model={spec!r}: GGUF file not found")
        return str(expand_gguf(path))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model={spec!r}: folder has no config.json; expected a Hugging Face model folder "
                "(save_pretrained output) or a .gguf file"
            )
        return str(path)
    if path.exists() or _looks_like_path(spec):
        raise FileNotFoundError(f"model={spec!r}: no such model folder or .gguf file")
    return spec  # a hub id


def _looks_like_path(spec: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else (./x, /x, ~/x, a/b/c, x.ext) is meant as a path."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith("/") or "\\" in spec


def source_gguf(spec: str | None) -> str | None:
    """The GGUF file a model spec comes from, if any (the template for GGUF export)."""
    if spec is None:
        return str(default_gguf())
    return str(Path(spec).resolve()) if spec.endswith(".gguf") else None


def load_model(spec: str | None, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (eval mode, given dtype) and tokenizer (with a pad token) from a hub id, folder or GGUF."""
    path = resolve_model_path(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # their messages name no flag
        raise OSError(f"model={spec!r}: could not load a causal LM from {path!r}: {err}") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer
