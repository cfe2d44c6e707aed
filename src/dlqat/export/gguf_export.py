"""GGUF export for llama.cpp / Ollama: every quantized linear as Q4_1, carried over exactly.

Q4_1 stores blocks of 32 weights as ``w = d * u + m`` (``u`` in 0..15, ``d`` and ``m`` fp16). Our
weight is ``scale * q + offset`` with signed ``q``; with ``u = q + 8``: ``d = scale`` and
``m = offset - 8 * scale`` for every 32-block inside a group (group sizes that are multiples of 32;
a ragged last group of 64 columns is two blocks). The codes are carried over bit for bit; the only
loss is fp16 rounding of ``d`` and ``m``. 3- and 2-bit codes fit the same container exactly (the file
is then as large as a 4-bit one). Wider codes (5..8 bits) have no exact GGUF block format and are refused.

Metadata and the other tensors come from a *template* GGUF of the same base model when there is one
(the embedded SmolLM2 default is one: its tokenizer, chat template and non-linear tensors are copied
as they were). Without a template, Llama-architecture models with a BPE ``tokenizer.json`` get their
metadata written from the HF config (other tensors as F32 norms / F16 matrices).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from dlqat.fileio import atomic_write, check_file_target
from dlqat.layers import QuantizedLinear
from dlqat.quant import resolve_group_size

Q4_1_BLOCK = 32


def q4_1_bytes(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int) -> np.ndarray:
    """Signed codes ``(N, K)`` (within [-8, 7]) and per-group scale/offset -> Q4_1 bytes ``(N, K/32*20)``.

    Block layout (ggml ``block_q4_1``): ``d`` fp16, ``m`` fp16, then 16 bytes; byte ``j`` holds
    ``u[j]`` in its low nibble and ``u[j+16]`` in its high nibble.
    """
    n, k = q.shape
    g = resolve_group_size(group_size, k)
    if k % Q4_1_BLOCK or g % Q4_1_BLOCK:
        raise ValueError(f"Q4_1 needs in_features and group_size to be multiples of 32 (got {k} and {g})")
    if q.min() < -8 or q.max() > 7:
        raise ValueError("Q4_1 holds codes of at most 4 bits")
    blocks = k // Q4_1_BLOCK
    u = (q.to(torch.int16) + 8).to(torch.uint8).view(n, blocks, Q4_1_BLOCK)
    qs = u[..., :16] | (u[..., 16:] << 4)  # (N, blocks, 16)
    per_block = g // Q4_1_BLOCK
    d = scale.float().repeat_interleave(per_block, dim=1)[:, :blocks]
    m = (offset.float() - 8 * scale.float()).repeat_interleave(per_block, dim=1)[:, :blocks]
    dm = torch.stack([d, m], dim=-1).to(torch.float16).view(torch.uint8)  # (N, blocks, 4)
    return torch.cat([dm, qs], dim=-1).reshape(n, blocks * 20).numpy()


def _llama_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's q/k row order for Llama rotary (transformers undoes it when loading)."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _arch_enum(arch: str) -> gguf.MODEL_ARCH:
    for enum, name in gguf.MODEL_ARCH_NAMES.items():
        if name == arch:
            return enum
    raise ValueError(f"GGUF architecture {arch!r} is unknown to the gguf package")


def is_gguf_file(path: Path) -> bool:
    """Whether ``path`` starts with the GGUF magic (the only kind of file ``export_gguf`` replaces)."""
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def export_gguf(
    model: nn.Module, tokenizer, out_path: str | Path, template: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Write ``model`` (converted: ``QuantizedLinear`` layers) as a GGUF file, atomically.

    An existing ``out_path`` is replaced only if it is a GGUF file and ``overwrite`` is set.
    """
    out_path = Path(out_path)
    check_file_target(out_path, is_gguf_file, overwrite, "GGUF file")
    config = model.config
    reader = gguf.GGUFReader(template) if template else None
    arch = reader.fields["general.architecture"].contents() if reader else _hf_arch(config)
    name_map = gguf.get_tensor_name_map(_arch_enum(arch), config.num_hidden_layers)
    permute_heads = (
        {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads} if arch == "llama" else {}
    )
    atomic_write(out_path, lambda tmp: _write_gguf(tmp, model, tokenizer, reader, arch, name_map, permute_heads))
    return out_path


def _write_gguf(tmp: Path, model: nn.Module, tokenizer, reader, arch: str, name_map, permute_heads: dict) -> None:
    config = model.config
    writer = gguf.GGUFWriter(tmp, arch)
    if reader:
        _copy_metadata(reader, writer)
    else:
        _write_llama_metadata(writer, config, tokenizer)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)

    template_tensors = {t.name: t for t in reader.tensors} if reader else {}
    written = set()
    modules = dict(model.named_modules())
    for name, layer in modules.items():
        if not isinstance(layer, QuantizedLinear):
            continue
        gname = name_map.get_name(name + ".weight", try_suffixes=(".weight",))
        if gname is None:
            raise ValueError(f"no GGUF tensor name for {name!r} in architecture {arch!r}")
        data = q4_1_bytes(layer.codes(), layer.scale, layer.offset, layer.group_size)
        heads = permute_heads.get(name.rsplit(".", 1)[-1])
        writer.add_tensor(
            gname, _llama_permute(data, heads) if heads else data, raw_dtype=gguf.GGMLQuantizationType.Q4_1
        )
        written.add(gname)
        if layer.bias is not None:
            writer.add_tensor(gname.replace(".weight", ".bias"), layer.bias.float().numpy())
            written.add(gname.replace(".weight", ".bias"))
    for tname, tensor in _other_tensors(model, name_map, template_tensors, written):
        writer.add_tensor(tname, *tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _other_tensors(model, name_map, template_tensors, written):
    """Non-quantized tensors: as the template had them, else F32 (1-D) / F16 (matrices)."""
    if template_tensors:
        for tname, t in template_tensors.items():
            if tname not in written:
                yield tname, (np.asarray(t.data), None, t.tensor_type)
        return
    seen = set()
    for name, param in model.named_parameters():
        if id(param) in seen or name.rsplit(".", 1)[0] in {
            n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)
        }:
            continue
        seen.add(id(param))
        tname = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if tname is None or tname in written:
            continue
        arr = param.detach().float().numpy()
        yield tname, ((arr if arr.ndim == 1 else arr.astype(np.float16)),)


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)


def _hf_arch(config) -> str:
    if config.model_type not in ("llama", "mistral"):
        raise ValueError(
            f"GGUF export without a template supports Llama-architecture models, not "
            f"{config.model_type!r}; pass --template with a GGUF of the base model"
        )
    return "llama"


def _write_llama_metadata(writer: gguf.GGUFWriter, config, tokenizer) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", 10000.0))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if tokenizer is None:
        raise ValueError("GGUF export without a template needs the tokenizer")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"GGUF export without a template supports BPE tokenizers, not {spec['model']['type']!r}")
    vocab = dict(spec["model"]["vocab"])
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    for t in spec.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
    tokens = [""] * config.vocab_size
    types = [gguf.TokenType.UNUSED] * config.vocab_size
    for text, idx in vocab.items():
        if idx < config.vocab_size:
            tokens[idx] = text
            types[idx] = gguf.TokenType.CONTROL if text in special else gguf.TokenType.NORMAL
    for idx, text in enumerate(tokens):
        if not text:
            tokens[idx] = f"[PAD{idx}]"
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, token_id in (
        ("bos", tokenizer.bos_token_id),
        ("eos", tokenizer.eos_token_id),
        ("pad", tokenizer.pad_token_id),
    ):
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
