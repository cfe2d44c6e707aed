"""The public lifecycle, for every method, dispatched on the config's class (as PEFT's
``get_peft_model(model, LoraConfig(...))`` and torchao's ``quantize_(model, QATConfig(...))``):

    names = dlqat.prepare(model, DLQATConfig(n_bits=3))      # swap in quantized LoRA layers
    dlqat.calibrate(model, cfg, names, calibration)           # data-dependent start (init="gptq")
    schedule = dlqat.phases(cfg, names)                       # what trains, how long (or dlqat.fit)
    dlqat.finalize(model, cfg, names, calibration)            # post-training steps (GPTQ, merges)
    dlqat.convert(model)                                      # final codes: QuantizedLinear layers
    dlqat.save_quantized(model, tokenizer, "out/"); dlqat.load("out/")
"""

from __future__ import annotations

import torch
from torch import nn

from dlqat.methods import QuantMethodConfig, handler
from dlqat.methods.base import Phase


def prepare(model: nn.Module, cfg: QuantMethodConfig) -> list[str]:
    """Swap the method's layers into ``model`` in place; returns the replaced layers' names."""
    return handler(cfg).prepare(model, cfg)


def calibrate(
    model: nn.Module, cfg: QuantMethodConfig, layer_names: list[str], calibration: list[torch.Tensor] = ()
) -> None:
    """The method's data-dependent start (DL-QAT ``init="gptq"``: GPTQ on these batches); a no-op for most."""
    handler(cfg).calibrate(model, cfg, layer_names, list(calibration))


def phases(cfg: QuantMethodConfig, layer_names: list[str] = ()) -> list[Phase]:
    """The method's training schedule (step counts must be set: ``dlqat.fit`` fills the defaults)."""
    return handler(cfg).phases(cfg, list(layer_names))


def finalize(
    model: nn.Module, cfg: QuantMethodConfig, layer_names: list[str], calibration: list[torch.Tensor] = ()
) -> None:
    """The method's post-training steps (RTN/GPTQ quantization, LoRA merges); a no-op for most."""
    handler(cfg).finalize(model, cfg, layer_names, list(calibration))
