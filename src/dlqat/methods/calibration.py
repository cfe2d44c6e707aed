"""Calibration passes for GPTQ: input Hessians of linear layers, block by block.

Reference GPTQ quantizes a decoder one block at a time and calibrates each block on the outputs of
the blocks before it *as quantized*, so later blocks correct for earlier rounding. One float forward
records every decoder layer's call (hidden states and keyword arguments: masks, rotary tables, which
differ per layer in e.g. Gemma 3's local/global layers); then each layer runs alone on its recorded
keyword arguments and the previous quantized layer's outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _hessian_hooks(model: nn.Module, names: list[str], hessians: dict, counts: dict) -> list:
    def hook(name: str):
        def fn(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            hessians[name] = hessians.get(name, 0) + 2 * x.t() @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return fn

    return [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]


@contextmanager
def _hooked(handles: list) -> Iterator[None]:
    """Keep the hooks for the ``with`` body, then remove them whatever happens."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def _run_model(model: nn.Module, batches: list[torch.Tensor]) -> None:
    for ids in batches:
        model(input_ids=ids, use_cache=False)


@torch.no_grad()
def collect_hessians(model: nn.Module, names: list[str], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``H = 2/N sum x x^T`` of each named linear's inputs over the calibration tokens (one float pass)."""
    hessians: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    with _hooked(_hessian_hooks(model, names, hessians, counts)):
        _run_model(model, batches)
    return {n: hessians[n] / counts[n] for n in names}


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """``(dotted name, ModuleList)`` of the decoder blocks (``model.layers`` in Llama/Qwen/Mistral/Gemma)."""
    for name, module in model.named_modules():
        if name.endswith(".layers") and isinstance(module, nn.ModuleList) and len(module):
            return name, module
    return None


@torch.no_grad()
def _record_layer_calls(model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor]):
    """Per batch: layer 0's hidden-state input, and every layer's keyword arguments."""
    inputs: list[torch.Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in layers]

    def hook(index: int):
        def fn(_module, args, kw):
            kw = dict(kw)
            hidden = args[0] if args else kw.pop("hidden_states")
            if index == 0:
                inputs.append(hidden)
            kwargs[index].append(kw)

        return fn

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    with _hooked(handles):
        _run_model(model, batches)
    return inputs, kwargs


@torch.no_grad()
def quantize_block_by_block(
    model: nn.Module,
    names: list[str],
    batches: list[torch.Tensor],
    quantize_layers: Callable[[list[str], dict[str, torch.Tensor]], None],
) -> None:
    """Calibrate and quantize ``names`` one decoder block at a time, in order.

    ``quantize_layers(block_names, hessians)`` replaces those linears (e.g. by GPTQ ``QuantizedLinear``s);
    the block then runs again so the next block calibrates on quantized outputs. Targets outside the
    decoder blocks (if any) take their Hessians from the float model.
    """
    found = decoder_layers(model)
    prefix, layers = found if found else ("", nn.ModuleList())
    in_block = [[n for n in names if n.startswith(f"{prefix}.{i}.")] for i in range(len(layers))]
    outside = [n for n in names if not any(n in block for block in in_block)]
    if outside:
        quantize_layers(outside, collect_hessians(model, outside, batches))
    if not layers:
        return
    hidden, layer_kwargs = _record_layer_calls(model, layers, batches)
    for i, layer in enumerate(layers):
        if in_block[i]:
            hessians: dict[str, torch.Tensor] = {}
            counts: dict[str, int] = {}
            with _hooked(_hessian_hooks(model, in_block[i], hessians, counts)):
                for b, h in enumerate(hidden):
                    layer(h, **layer_kwargs[i][b])
            quantize_layers(in_block[i], {n: hessians[n] / counts[n] for n in in_block[i]})
        for b, h in enumerate(hidden):
            out = layer(h, **layer_kwargs[i][b])
            hidden[b] = out[0] if isinstance(out, tuple) else out
