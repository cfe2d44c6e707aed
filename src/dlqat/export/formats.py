"""``dlqat export``: a trained run's low-bit model written as a packed dlqat folder or a GGUF file."""

from __future__ import annotations

from pathlib import Path

import torch

from dlqat.export.gguf_export import export_gguf
from dlqat.export.quantized import load_quantized, read_quant_meta, save_quantized

FORMATS = ("dlqat", "gguf")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def quantized_dir(path: str | Path) -> Path:
    """A run folder's ``quantized/`` (or the path itself when it already is one)."""
    path = Path(path)
    return path / "quantized" if (path / "quantized").is_dir() else path


def export(run: str | Path, fmt: str, out: str | Path, dtype: str = "bf16", template: str | None = None) -> Path:
    """Export the low-bit model of ``run``.

    Args:
        fmt: ``dlqat`` (packed safetensors folder, reloadable with ``dlqat.load``) or ``gguf``.
        dtype: storage of the non-quantized tensors in the ``dlqat`` format (fp32 keeps every logit
            bit-exact; bf16/fp16 make the file small).
        template: GGUF of the same base model for metadata/tokenizer (default: the GGUF the run's
            base model came from, if any).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: expected one of {FORMATS}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    src = quantized_dir(run)
    meta = read_quant_meta(src)
    model, tokenizer = load_quantized(src)
    if fmt == "dlqat":
        return save_quantized(model, tokenizer, out, dtype=DTYPES[dtype], source_gguf=meta.get("source_gguf"))
    template = template or meta.get("source_gguf")
    if template and not Path(template).is_file():
        raise FileNotFoundError(f"template={template!r}: GGUF file not found")
    return export_gguf(model, tokenizer, out, template)
