"""One filter-driven swap of ``nn.Linear`` layers by dotted module name, for any architecture."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

# Attention and MLP projections of Llama, Mistral, Qwen2/3, Gemma/Gemma3, Phi-3-style layouts.
DEFAULT_TARGETS = r"(^|.*\.)(q_proj|k_proj|v_proj|o_proj|qkv_proj|gate_proj|up_proj|down_proj|gate_up_proj)$"
ALL_LINEAR = "all-linear"
# PEFT's rule for "all-linear": every linear except the output head.
_OUTPUT_HEADS = ("lm_head", "embed_out", "output", "score", "classifier")


def name_filter(target_modules: str) -> Callable[[str, nn.Module], bool]:
    """``target_modules`` is a regex matched (fully) against dotted names, or ``"all-linear"``."""
    if target_modules == ALL_LINEAR:
        return lambda name, module: isinstance(module, nn.Linear) and name.split(".")[-1] not in _OUTPUT_HEADS
    try:
        pattern = re.compile(target_modules)
    except re.error as err:
        raise ValueError(f"target_modules={target_modules!r}: not a valid regular expression ({err})") from err
    return lambda name, module: isinstance(module, nn.Linear) and pattern.fullmatch(name) is not None


def replace_linears(
    model: nn.Module,
    make: Callable[[str, nn.Linear], nn.Module],
    should_replace: Callable[[str, nn.Module], bool],
) -> list[str]:
    """Replace every module for which ``should_replace(name, module)`` holds by ``make(name, module)``.

    Returns:
        The dotted names replaced, in module order. Raises if nothing matched, since a run that
        quantizes nothing is never what the user meant.
    """
    targets = [(name, module) for name, module in model.named_modules() if name and should_replace(name, module)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(name, module))
    if not targets:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise ValueError(f"no linear layer matched the target filter; some linear layers of this model: {linears}")
    return [name for name, _ in targets]


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` without tied duplicates (the first name of a shared tensor is kept):
    safetensors refuses shared storage, and a tied embedding/head must be written once."""
    seen, state = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if key not in seen:
            seen.add(key)
            state[name] = tensor
    return state
