"""What every method shares: its config base, training phases, and parameter bookkeeping.

A method is a config dataclass deriving ``QuantMethodConfig`` plus a ``QuantMethod`` handler
registered for it (``dlqat.methods.registry``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from dlqat.layers import ClipMode, QuantLoRALinear
from dlqat.layers.weight_quantizer import GPTQ_INITS, INITS
from dlqat.quant.gptq import GRIDS
from dlqat.quant.primitives import FLOAT, Storage, check_bits, resolve_group_size
from dlqat.surgery import DEFAULT_TARGETS, name_filter, replace_linears


@dataclass
class QuantMethodConfig:
    """Settings every method has."""

    name: ClassVar[str] = ""  # the method's CLI name (``--method``)
    # Named settings (``--preset NAME``, ``dlqat compare --methods METHOD:NAME``): field -> value, over this
    # config's fields and TrainConfig's. A preset pins a published recipe so that it stays one flag away.
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    n_bits: int = field(default=4, metadata={"help": "weight bits, 2..8"})
    group_size: int = field(
        default=128,
        metadata={
            "help": "columns per quantization group along the input dim; -1 = per output channel. "
            "A ragged last group (in_features not a multiple) is allowed."
        },
    )
    target_modules: str = field(
        default=DEFAULT_TARGETS,
        metadata={"help": "regex over dotted module names of the linears to quantize, or 'all-linear'"},
    )

    def __post_init__(self) -> None:
        check_bits(self.n_bits)
        resolve_group_size(self.group_size, 1 << 30)
        name_filter(self.target_modules)  # fails early on a bad regex
        if isinstance(self, StorageFields):
            self.storage()  # validates zero_point and qparam_dtype
        for name, value in asdict(self).items():
            if name in ("rank", "calib_samples") and value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
            if name == "init" and value is not None and value not in INITS:  # None: the method's default
                raise ValueError(f"init={value!r}: expected one of {', '.join(INITS)}")
            if name == "init" and value in GPTQ_INITS and getattr(self, "zero_point", None) == "int":
                raise ValueError(
                    f"init={value!r} with zero_point='int': GPTQ's offsets are floats; use init=mse or minmax"
                )
            if name == "grid" and value not in GRIDS:
                raise ValueError(f"grid={value!r}: expected one of {', '.join(GRIDS)}")
            if (
                name in ("alpha", "lr", "quant_lr", "magnitude_lr", "shift_lr")
                and value is not None
                and not is_positive_finite(value)
            ):
                raise ValueError(f"{name}={value!r}: expected a positive finite number")
            if name == "damp" and not is_non_negative_finite(value):
                raise ValueError(
                    f"damp={value!r}: expected a finite number >= 0 (a fraction of the mean Hessian diagonal)"
                )
            if name.endswith("steps") and value is not None and value < 0:
                raise ValueError(f"{name}={value!r}: expected a non-negative integer")

    def to_dict(self) -> dict:
        return {"method": self.name, **asdict(self)}

    @classmethod
    def preset_settings(cls, preset: str) -> dict[str, Any]:
        """The settings ``preset`` names; one this method lacks is refused, listing what each method offers
        (presets are keyed by method: ``dlqat train --preset`` and ``dlqat compare METHOD:PRESET`` share this)."""
        if preset not in cls.presets:
            from dlqat.methods.registry import method_configs  # the registry imports this module

            offered = {name: sorted(c.presets) for name, c in method_configs().items() if c.presets}
            raise ValueError(
                f"preset={preset!r} with --method {cls.name}: expected one of {sorted(cls.presets)} "
                f"(presets by method: {offered})"
            )
        return cls.presets[preset]


QPARAM_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StorageFields:
    """How the export will store scale/offset; training rounds to exactly that (``dlqat.quant.Storage``)."""

    zero_point: str = field(
        default="float",
        metadata={"help": "float (offset any float) or int (offset = -scale * integer zero point: GPTQ-style formats)"},
    )
    qparam_dtype: str = field(
        default="fp32",
        metadata={"help": "fp32, bf16 or fp16: train with the final scale/offset rounded to the storage dtype"},
    )

    def start_label(self, init: str = "minmax") -> str:
        """Name of the PTQ result an untrained layer computes: ``rtn``, ``gptq``, or e.g. ``rtn-mse-int0-bf16``."""
        parts = [init] if init in GPTQ_INITS else ["rtn"] + (["mse"] if init == "mse" else [])
        parts += ["int0"] if self.zero_point == "int" else []
        return "-".join(parts + ([self.qparam_dtype] if self.qparam_dtype != "fp32" else []))

    def storage(self) -> Storage:
        if self.zero_point not in ("float", "int"):
            raise ValueError(f"zero_point={self.zero_point!r}: expected float or int")
        if self.qparam_dtype not in QPARAM_DTYPES:
            raise ValueError(f"qparam_dtype={self.qparam_dtype!r}: expected one of {sorted(QPARAM_DTYPES)}")
        return Storage(QPARAM_DTYPES[self.qparam_dtype], self.zero_point == "int")


# Quantizer parameters: never weight-decayed (see Phase.param_groups).
NO_DECAY = ("magnitude", "scale", "offset", "shift")


@dataclass(frozen=True)
class Phase:
    """One stretch of training with its own trainable set and optimizer.

    Attributes:
        name: shown in logs and the progress bar.
        steps: optimizer steps in this phase.
        lr: constant learning rate (AdamW).
        trains: ``trains(param_name) -> bool`` picks the parameters trained in this phase; all
            others are frozen.
        lr_by_suffix: per-parameter-kind learning rates (e.g. ``{"scale": 1e-5}``) overriding ``lr``.
    """

    name: str
    steps: int
    lr: float
    trains: Callable[[str], bool]
    lr_by_suffix: dict[str, float] = field(default_factory=dict)

    def param_groups(self, model: nn.Module, weight_decay: float = 0.0) -> list[dict]:
        """AdamW groups by learning rate; weight decay only for adapters and weights: decaying ``m`` toward
        0 or the clipping range toward a point would pull the quantizer away from the weights it codes."""
        groups: dict[tuple[float, float], list] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                kind = name.rsplit(".", 1)[-1]
                decay = 0.0 if kind in NO_DECAY else weight_decay
                groups.setdefault((self.lr_by_suffix.get(kind, self.lr), decay), []).append(param)
        return [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]


def swap_in_quant_lora(
    model: nn.Module,
    cfg: QuantMethodConfig,
    *,
    rank: int,
    alpha: float,
    use_magnitude: bool,
    clip_mode: ClipMode | str,
    quantize_enabled: bool = True,
    lean: bool = True,
    init: str = "minmax",
    use_shift: bool = False,
) -> list[str]:
    """Replace ``cfg``'s target linears by ``QuantLoRALinear`` layers (the shared layer of dl_qat,
    l4q, full_qat and the float LoRA of lora_rtn/lora_gptq); returns the replaced names."""

    def make(_name: str, linear: nn.Linear) -> QuantLoRALinear:
        layer = QuantLoRALinear.from_linear(
            linear, n_bits=cfg.n_bits, group_size=cfg.group_size, rank=rank, alpha=alpha,
            use_magnitude=use_magnitude, clip_mode=clip_mode, init=init, use_shift=use_shift,
            storage=cfg.storage() if isinstance(cfg, StorageFields) else FLOAT,
        )  # fmt: skip
        layer.quantize_enabled, layer.lean = quantize_enabled, lean
        return layer

    return replace_linears(model, make, name_filter(cfg.target_modules))


def require_steps(cfg: QuantMethodConfig, *names: str) -> None:
    """Lifecycle check: the step counts must be set before a schedule is built."""
    for name in names:
        if getattr(cfg, name) is None:
            raise ValueError(
                f"{type(cfg).__name__}.{name} is unset: give it, or let dlqat.fit / `dlqat train` fill the defaults"
            )


def param_of(*suffixes: str) -> Callable[[str], bool]:
    """Select parameters by their last name component (``lora_a``, ``scale``, ...)."""
    return lambda name: name.rsplit(".", 1)[-1] in suffixes


def set_trainable(model: nn.Module, trains: Callable[[str], bool]) -> list[str]:
    """Freeze every parameter but those ``trains`` selects; returns the selected names."""
    selected = []
    for name, param in model.named_parameters():
        param.requires_grad_(trains(name))
        if param.requires_grad:
            selected.append(name)
    return selected


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` over unique tensors (tied embeddings counted once)."""
    seen, trainable, total = set(), 0, 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def is_positive_finite(value: float) -> bool:
    """True for a finite number above 0: NaN and inf pass a plain ``<= 0`` check and would only show up as a
    NaN loss after the float evaluation and the start had run."""
    return value > 0 and math.isfinite(value)


def is_non_negative_finite(value: float) -> bool:
    """True for 0 or a finite number above it (NaN and inf refused, as in ``is_positive_finite``)."""
    return value >= 0 and math.isfinite(value)
