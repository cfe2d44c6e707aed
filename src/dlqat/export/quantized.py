"""The finished low-bit model: convert trained layers to codes, save, and load back.

Folder layout (``save_quantized``):
    config.json, tokenizer files   the base model's (so transformers can rebuild it); only
                                   ``tie_word_embeddings`` turns false when the table is quantized
    dlqat_quant.json               {"format": ..., "layers": {dotted_name: {"n_bits", "group_size"
                                    [, "act_bits", "out_bits", "out_group"]}},
                                    "embedding": {"n_bits", "group_size", "head", "dtype"} when the
                                    tied embedding/head table is quantized (``quantize_tied_embedding``):
                                    the head is then a quantized layer, the embedding reads its rows}
    model.safetensors              every tensor of the model; each quantized linear ``NAME`` stores
                                   ``NAME.packed`` (uint8 bit-packed signed codes, layout in
                                   ``dlqat.quant.bitpack``), ``NAME.scale`` and ``NAME.offset``
                                   ((out, n_groups), float32), so ``W = scale*q + offset`` per group.

The other tensors (embeddings, norms, head) keep the model's dtype, or ``dtype`` when exporting
(bf16/fp16 makes the file small; the quantized layers' scales/offsets stay float32, so those layers
stay exact).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from dlqat.fileio import atomic_folder
from dlqat.layers import QuantizedEmbedding, QuantizedLinear
from dlqat.surgery import replace_linears, unique_state_dict

FORMAT = "dlqat-packed-v1"
QUANT_FILE = "dlqat_quant.json"
WEIGHTS_FILE = "model.safetensors"


def convert(model: nn.Module) -> dict[str, dict]:
    """Replace every trained quantized layer (anything with ``to_codes()``: ``QuantLoRALinear``,
    ``QALoRALinear``) by a ``QuantizedLinear`` holding its final codes (in place).

    The lifecycle's last step: the result has no trainable quantization state and computes the same
    outputs. Returns ``{name: {"n_bits", "group_size"}}`` of all quantized layers.
    """

    def make(_name: str, layer: nn.Module) -> QuantizedLinear:
        q, scale, offset = layer.to_codes()
        runtime = QuantizedLinear.from_codes(q, scale, offset, layer.n_bits, layer.group_size, layer.bias)
        runtime.set_act_quant_spec(layer.act_quant_spec())
        return runtime

    def is_trained_layer(_name: str, module: nn.Module) -> bool:
        return hasattr(module, "to_codes") and not isinstance(module, QuantizedLinear)

    if any(is_trained_layer(n, m) for n, m in model.named_modules()):
        replace_linears(model, make, is_trained_layer)
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("convert() needs a prepared model: call a method's prepare() first")
    return layers


def _head_name(model: PreTrainedModel) -> str:
    head = model.get_output_embeddings()
    return next(name for name, module in model.named_modules() if module is head)


def _tie_by_construction(model: PreTrainedModel, table: QuantizedLinear, dtype: torch.dtype) -> None:
    """Make the input embedding read from ``table`` (the head), and stop transformers re-tying.

    ``tie_weights()`` (called by lm-eval, among others) would look for ``embed_tokens.weight``, which no
    longer exists; the config flag is what it consults, and the sharing is structural now anyway.
    """
    inp = model.get_input_embeddings()
    table.hold_unpacked(not table.int4_ok())
    embed_scale = getattr(inp, "scalar_embed_scale", None)  # Gemma's scaled embedding, as a float
    if embed_scale is None and isinstance(getattr(inp, "embed_scale", None), torch.Tensor):
        if inp.embed_scale.device.type == "meta":
            raise ValueError(f"{type(inp).__name__}.embed_scale is on the meta device; cannot read its value")
        embed_scale = float(inp.embed_scale)
    model.set_input_embeddings(QuantizedEmbedding(table, dtype, embed_scale))
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False


def quantize_tied_embedding(model: PreTrainedModel, n_bits: int, group_size: int = 32) -> dict:
    """Quantize the tied token-embedding / output-head table with RTN (min/max groups, in place).

    Small models spend a large share of their bytes here (SmolLM2-135M: 28 M of 135 M parameters),
    so leaving it in bf16 caps how small the file gets. The head becomes a ``QuantizedLinear`` (int4
    kernel in decode at <= 4 bits) and the input embedding reads rows from the same packed table.
    Measured on SmolLM2-135M (README): 8-bit g128 costs nothing, 4-bit g32 about 6 % perplexity.
    """
    inp, head = model.get_input_embeddings(), model.get_output_embeddings()
    if isinstance(inp, QuantizedEmbedding):
        raise ValueError("the embedding is already quantized")  # noqa: TRY004 (a state error, not a wrong argument type)
    if head is None or not isinstance(inp, nn.Embedding) or head.weight is not inp.weight:
        raise ValueError(
            "embedding quantization needs tied input/output embeddings (config.tie_word_embeddings=True); "
            f"{type(model).__name__} has separate ones"
        )
    table = QuantizedLinear.round_to_nearest(inp.weight, n_bits, group_size, getattr(head, "bias", None))
    model.set_output_embeddings(table)
    _tie_by_construction(model, table, inp.weight.dtype)
    return {"n_bits": n_bits, "group_size": group_size, "head": _head_name(model)}


def quantized_layers(model: nn.Module) -> dict[str, dict]:
    """``{name: {"n_bits", "group_size"[, "act_bits", "out_bits", "out_group"]}}`` of a converted
    model's ``QuantizedLinear`` layers (activation/KV settings only where set)."""
    return {
        n: {"n_bits": m.n_bits, "group_size": m.group_size, **m.act_quant_spec()}
        for n, m in model.named_modules()
        if isinstance(m, QuantizedLinear)
    }


def _unique_state_dict(model: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates; floats outside the quantized layers cast to ``dtype`` when given."""
    keep_exact = {f"{name}.{buf}" for name in quantized_layers(model) for buf in ("scale", "offset")}
    state = {}
    for name, tensor in unique_state_dict(model).items():
        if dtype is not None and tensor.is_floating_point() and name not in keep_exact:
            tensor = tensor.to(dtype)
        state[name] = tensor.detach().contiguous().cpu()
    return state


def save_quantized(
    model: PreTrainedModel,
    tokenizer,
    out_dir: str | Path,
    layers: dict[str, dict] | None = None,
    dtype: torch.dtype | None = None,
    source_gguf: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a converted model atomically (built in a temporary sibling folder, then renamed into place).

    ``out_dir`` must be new, empty, or (with ``overwrite``) an earlier dlqat export; any other folder
    is refused untouched. ``source_gguf`` records the GGUF the base model came from, the template for
    a later GGUF export.
    """
    layers = quantized_layers(model) if layers is None else layers
    with atomic_folder(out_dir, is_export, overwrite, "dlqat export") as tmp:
        meta = {"format": FORMAT, "source_gguf": source_gguf, "layers": layers}
        if isinstance(model.get_input_embeddings(), QuantizedEmbedding):
            table = model.get_output_embeddings()
            meta["embedding"] = {
                "n_bits": table.n_bits,
                "group_size": table.group_size,
                "head": _head_name(model),
                "dtype": str(dtype or model.get_input_embeddings().dtype).removeprefix("torch."),
            }
        (tmp / QUANT_FILE).write_text(json.dumps(meta, indent=2))
        model.config.save_pretrained(tmp)
        # what transformers' loader reads (dlqat.export.hf_quantizer registers the method)
        config = json.loads((tmp / "config.json").read_text())
        config["quantization_config"] = {
            "quant_method": "dlqat",
            **{k: v for k, v in meta.items() if k != "source_gguf"},
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(_unique_state_dict(model, dtype), tmp / WEIGHTS_FILE, metadata={"format": FORMAT})
    return Path(out_dir)


def is_export(path: Path) -> bool:
    """Whether ``path`` is a folder ``save_quantized`` wrote (the only kind it replaces)."""
    try:
        return json.loads((path / QUANT_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def build_skeleton(model: PreTrainedModel, layers: dict[str, dict], embedding: dict | None) -> None:
    """Swap in empty (meta) ``QuantizedLinear``/``QuantizedEmbedding`` modules where a saved folder has
    packed tensors, so that its state dict loads by name (``load_quantized`` and transformers' loader)."""
    if embedding:  # the head is a quantized layer like the others
        layers = {**layers, embedding["head"]: {k: embedding[k] for k in ("n_bits", "group_size")}}

    def make(name: str, linear: nn.Linear) -> QuantizedLinear:
        spec = layers[name]
        layer = QuantizedLinear(
            linear.in_features, linear.out_features, spec["n_bits"], spec["group_size"], linear.bias is not None,
            torch.float32, "meta",
        )  # fmt: skip
        layer.set_act_quant_spec(spec)
        return layer

    replace_linears(model, make, lambda name, module: name in layers)
    if embedding:
        _tie_by_construction(model, model.get_output_embeddings(), getattr(torch, embedding["dtype"]))


def read_quant_meta(path: str | Path) -> dict:
    quant_file = Path(path) / QUANT_FILE
    if not quant_file.is_file():
        raise FileNotFoundError(
            f"{quant_file}: not found; expected a folder written by `dlqat train` or save_quantized()"
        )
    meta = json.loads(quant_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{quant_file}: format {meta.get('format')!r} is not {FORMAT!r}")
    return meta


def load_quantized(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, object]:
    """Rebuild a model saved by ``save_quantized``; its quantized linears run from the packed codes.

    ``dtype`` casts the non-quantized float tensors (e.g. a bf16 export computed in fp32 on a CPU).
    """
    path = Path(path)
    meta = read_quant_meta(path)
    config = AutoConfig.from_pretrained(path)
    try:
        state = load_file(path / WEIGHTS_FILE)
    except SafetensorError as err:
        raise ValueError(f"{path / WEIGHTS_FILE}: not a readable safetensors file ({err})") from err
    with init_empty_weights():  # parameters on meta; buffers (rotary tables) built for real
        model = AutoModelForCausalLM.from_config(config)
    build_skeleton(model, meta["layers"], meta.get("embedding"))
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)  # missing ones: the meta check below
    if unexpected:
        raise ValueError(f"{path / WEIGHTS_FILE}: tensors the model does not have: {unexpected[:8]}")
    model.tie_weights()  # a float tied head; a quantized table is shared already (and untied in the config)
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if still_meta:
        raise ValueError(f"{path / WEIGHTS_FILE}: tensors missing: {still_meta[:8]}")
    if dtype is not None:
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if tensor.is_floating_point() and not name.endswith((".scale", ".offset")):
                tensor.data = tensor.data.to(dtype)
        if meta.get("embedding"):
            model.get_input_embeddings().dtype = dtype
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return model.to(device).eval(), tokenizer
