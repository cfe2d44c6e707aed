"""``dlqat export``: a trained run's low-bit model written as a packed dlqat folder or a GGUF file."""

from __future__ import annotations

from pathlib import Path

import torch

from dlqat.export.ct_export import export_compressed_tensors, is_ct_export
from dlqat.export.gguf_export import export_gguf, is_gguf_file
from dlqat.export.mlx_export import export_mlx, is_mlx_export
from dlqat.export.quantized import is_export, load_quantized, quantize_tied_embedding, read_quant_meta, save_quantized
from dlqat.export.torchao_export import export_torchao, is_torchao_export
from dlqat.fileio import check_file_target, check_folder_target

FORMATS = ("dlqat", "gguf", "mlx", "torchao", "compressed-tensors", "gptq")  # gptq: compressed-tensors
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def quantized_dir(path: str | Path) -> Path:
    """A run folder's ``quantized/`` (or the path itself when it already is one)."""
    path = Path(path)
    return path / "quantized" if (path / "quantized").is_dir() else path


def export(
    run: str | Path,
    fmt: str,
    out: str | Path,
    dtype: str = "bf16",
    template: str | None = None,
    embed_bits: int | None = None,
    embed_group_size: int = 32,
    overwrite: bool = False,
) -> Path:
    """Export the low-bit model of ``run``.

    Args:
        fmt: ``dlqat`` (packed safetensors folder, reloadable with ``dlqat.load``), ``gguf`` (Q4_1 for
            llama.cpp), ``mlx`` (an mlx-lm folder, MLX affine quantization), ``torchao`` (a transformers
            folder with torchao int4 weights, 4 bits, bf16) or ``compressed-tensors``
            (alias ``gptq``: GPTQ-style integer zero points, pack-quantized; needs ``--zero_point int`` training).
        dtype: storage of the non-quantized tensors in the ``dlqat`` format (fp32 keeps every logit
            bit-exact; bf16/fp16 make the file small); in the ``mlx`` format of every float tensor,
            scales and biases included (MLX computes in that dtype).
        template: GGUF of the same base model for metadata/tokenizer (default: the GGUF the run's
            base model came from, if any).
        embed_bits, embed_group_size: ``dlqat`` format only: also quantize the tied embedding/head
            table (RTN; 8 bits is lossless in practice, 4 bits makes the smallest file).
        overwrite: replace an existing export of the same format at ``out`` (anything else there is
            always refused).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: expected one of {FORMATS}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    if embed_bits is not None and fmt != "dlqat":
        raise ValueError(f"embed_bits={embed_bits}: only the dlqat format quantizes the embedding table")
    src = quantized_dir(run)
    meta = read_quant_meta(src)
    out = Path(out)
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise ValueError(f"out={str(out)!r}: is the model being exported (or inside it); choose another path")
    _check_target(fmt, out, overwrite)
    if fmt != "dlqat" and meta.get("embedding"):
        raise ValueError(f"{src}: its embedding table is quantized; export {fmt} from the run folder instead")
    model, tokenizer = load_quantized(src)
    if fmt == "mlx":
        return export_mlx(model, tokenizer, out, DTYPES[dtype], overwrite=overwrite)
    if fmt == "torchao":
        return export_torchao(model, tokenizer, out, DTYPES[dtype], overwrite=overwrite)
    if fmt in ("compressed-tensors", "gptq"):
        return export_compressed_tensors(model, tokenizer, out, DTYPES[dtype], overwrite=overwrite)
    if fmt == "dlqat":
        if embed_bits is not None:
            quantize_tied_embedding(model, embed_bits, embed_group_size)
        return save_quantized(
            model, tokenizer, out, dtype=DTYPES[dtype], source_gguf=meta.get("source_gguf"), overwrite=overwrite
        )
    template = template or meta.get("source_gguf")
    if template and not Path(template).is_file():
        raise FileNotFoundError(f"template={template!r}: GGUF file not found")
    return export_gguf(model, tokenizer, out, template, overwrite=overwrite)


def _check_target(fmt: str, out: Path, overwrite: bool) -> None:
    """Before any work: ``out`` must be new, empty, or (with ``overwrite``) an export of this format."""
    if fmt == "gguf":
        check_file_target(out, is_gguf_file, overwrite, "GGUF file")
    elif fmt == "mlx":
        check_folder_target(out, is_mlx_export, overwrite, "MLX export")
    elif fmt == "torchao":
        check_folder_target(out, is_torchao_export, overwrite, "torchao export")
    elif fmt in ("compressed-tensors", "gptq"):
        check_folder_target(out, is_ct_export, overwrite, "GPTQ (compressed-tensors) export")
    else:
        check_folder_target(out, is_export, overwrite, "dlqat export")
