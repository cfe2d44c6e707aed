"""DL-QAT: weight-decomposed low-rank QAT (Ke et al., 2024).

``W = m * Q(W0 + scaling * B @ A)``. Phase 1 trains only the clipping range ``scale, offset``
(from min/max init), which is then frozen; phase 2 trains the magnitude ``m`` and LoRA ``A, B``.
The paper's ablations (Table 3) are options: ``use_magnitude`` and ``clip_mode``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from dlqat.layers import ClipMode, QuantLoRALinear
from dlqat.methods.base import Phase
from dlqat.quant.primitives import check_bits, resolve_group_size
from dlqat.surgery import DEFAULT_TARGETS, name_filter, replace_linears

_CLIP_MODES = [mode.value for mode in ClipMode]


@dataclass
class DLQATConfig:
    """DL-QAT method settings (defaults: the paper's)."""

    n_bits: int = field(default=4, metadata={"help": "weight bits, 2..8"})
    group_size: int = field(
        default=128,
        metadata={"help": "columns per quantization group along the input dim; -1 = per output channel. "
                  "A ragged last group (in_features not a multiple) is allowed."},
    )
    rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; scaling = alpha / rank"})
    use_magnitude: bool = field(default=True, metadata={"help": "train DL-QAT's per-group magnitude m"})
    clip_mode: str = field(
        default=ClipMode.LEARN_THEN_FIX.value,
        metadata={"help": f"clipping range: one of {_CLIP_MODES}"},
    )
    target_modules: str = field(
        default=DEFAULT_TARGETS,
        metadata={"help": "regex over dotted module names of the linears to quantize, or 'all-linear'"},
    )
    phase1_steps: int | None = field(
        default=None,
        metadata={"help": "phase-1 optimizer steps (scale/offset only); default 1000 (paper), 20 for the demo"},
    )
    phase2_steps: int | None = field(
        default=None,
        metadata={"help": "phase-2 optimizer steps (m, A, B); default 1000, 40 for the demo"},
    )
    lr: float = field(default=2e-4, metadata={"help": "phase-2 learning rate (AdamW, constant)"})
    quant_lr: float = field(default=1e-4, metadata={"help": "phase-1 learning rate for scale/offset"})

    def __post_init__(self) -> None:
        check_bits(self.n_bits)
        resolve_group_size(self.group_size, 1 << 30)
        if self.rank < 1:
            raise ValueError(f"rank={self.rank!r}: expected a positive integer")
        if self.alpha <= 0:
            raise ValueError(f"alpha={self.alpha!r}: expected a positive number")
        if self.clip_mode not in _CLIP_MODES:
            raise ValueError(f"clip_mode={self.clip_mode!r}: expected one of {_CLIP_MODES}")
        for name in ("phase1_steps", "phase2_steps"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name}={value!r}: expected a non-negative integer")
        for name in ("lr", "quant_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a positive number")
        name_filter(self.target_modules)  # fails early on a bad regex

    def to_dict(self) -> dict:
        return asdict(self)


def prepare(model: nn.Module, cfg: DLQATConfig) -> list[str]:
    """Swap the target linears for ``QuantLoRALinear`` in place; returns the replaced names."""
    def make(_name: str, linear: nn.Linear) -> QuantLoRALinear:
        return QuantLoRALinear.from_linear(
            linear,
            n_bits=cfg.n_bits,
            group_size=cfg.group_size,
            rank=cfg.rank,
            alpha=cfg.alpha,
            use_magnitude=cfg.use_magnitude,
            clip_mode=cfg.clip_mode,
        )

    return replace_linears(model, make, name_filter(cfg.target_modules))


def _param_of(*suffixes: str):
    return lambda name: name.rsplit(".", 1)[-1] in suffixes


def phases(cfg: DLQATConfig) -> list[Phase]:
    """The DL-QAT schedule, adjusted for the ablation switches."""
    assert cfg.phase1_steps is not None and cfg.phase2_steps is not None, "resolve step defaults first"
    phase2 = ("lora_a", "lora_b") + (("magnitude",) if cfg.use_magnitude else ())
    clip = ClipMode(cfg.clip_mode)
    if clip is ClipMode.JOINT:
        phase2 += ("scale", "offset")
    schedule = []
    if clip is not ClipMode.DYNAMIC and cfg.phase1_steps:
        schedule.append(Phase("phase1: scale/offset", cfg.phase1_steps, cfg.quant_lr, _param_of("scale", "offset")))
    schedule.append(Phase("phase2: " + "/".join(phase2), cfg.phase2_steps, cfg.lr, _param_of(*phase2)))
    return schedule
