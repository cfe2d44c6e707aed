"""Run settings shared by every method (``TrainConfig``) and their defaults."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TypeVar

from dlqat.losses import LOSSES
from dlqat.methods import QuantMethodConfig, handler
from dlqat.methods.base import is_non_negative_finite, is_positive_finite
from dlqat.methods.dl_qat import COSINE_FROM_STEPS
from dlqat.schedules import LR_SCHEDULES

M = TypeVar("M", bound=QuantMethodConfig)
C = TypeVar("C")

# Used when no model and no data are given (the embedded demo): finishes in minutes on 2 CPU cores.
DEMO_DEFAULTS = {
    "phase1_steps": 10,
    "phase2_steps": 30,
    "steps": 40,
    "seq_len": 256,
    "grad_accum": 4,
    "eval_max_windows": 8,
    "eval_seq_len": 512,
}
# A full run's defaults (``--preset paper`` sets the paper's own step counts and learning rates).
RUN_DEFAULTS = {
    "phase1_steps": 1000,
    "phase2_steps": 1000,
    "steps": 2000,
    "seq_len": 1024,
    "grad_accum": 16,
    "eval_max_windows": None,
    "eval_seq_len": 2048,
}


@dataclass
class TrainConfig:
    """Run settings shared by every method."""

    model: str | None = field(
        default=None, metadata={"help": "hub id, local HF folder, or .gguf file; default: the embedded SmolLM2-135M"}
    )
    data: str | None = field(
        default=None,
        metadata={
            "help": "training data: Alpaca .json/.jsonl, text "
            "(.txt/.utf8/.md) or a hub dataset; default: embedded C4 text"
        },
    )
    eval_data: str | None = field(
        default=None, metadata={"help": "held-out text file for perplexity; default: embedded Wikipedia text"}
    )
    output_dir: str = field(default="runs/dlqat", metadata={"help": "run folder (config, checkpoints, model, results)"})
    seq_len: int | None = field(default=None, metadata={"help": "training tokens per example; default 1024 (256 demo)"})
    micro_batch_size: int = field(default=1, metadata={"help": "examples per forward pass per process"})
    grad_accum: int | None = field(
        default=None,
        metadata={"help": "micro-batches per optimizer step; default 16 (effective batch 16; 4 in the demo)"},
    )
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay of adapters/weights (never of magnitude, scale, offset)"}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 = off)"})
    lr_schedule: str = field(
        default="auto",
        metadata={
            "help": "learning rate within each phase: constant (the paper's; its runs may grow on --resume and "
            "their curve points equal shorter runs), or cosine/linear decay from the phase's lr toward 0 at its "
            f"last step; auto: cosine for DL-QAT runs of {COSINE_FROM_STEPS} steps or more (measured: worse at 40 "
            "steps, level at 80-120, better from 200), constant otherwise; on --resume, the run's own schedule"
        },
    )
    warmup_steps: int = field(
        default=0,
        metadata={
            "help": "linear warmup over the first N optimizer steps of each phase, from lr/(N+1) up to the lr, "
            "then --lr_schedule over the rest"
        },
    )
    seed: int = field(default=42, metadata={"help": "seed for init and data order"})
    train_on_prompt: bool = field(default=False, metadata={"help": "instruction data: also train on prompt tokens"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N optimizer steps"})
    resume: bool = field(
        default=False, metadata={"help": "continue the run in output_dir from its checkpoint.pt (same settings)"}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "replace the run in output_dir (its artefacts only; other files stay)"}
    )
    eval_seq_len: int | None = field(default=None, metadata={"help": "perplexity window; default 2048 (512 demo)"})
    eval_max_windows: int | None = field(
        default=None, metadata={"help": "cap on perplexity windows; default all (8 in the demo)"}
    )
    mixed_precision: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), no, bf16, fp16"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute decoder layers in backward"})
    compile: bool = field(
        default=False,
        metadata={"help": "torch.compile the quantized layers' backward elementwise work (one-off compile cost)"},
    )
    act_bits: int | None = field(
        default=None,
        metadata={"help": "fake-quantize the inputs of quantized linears per token at these bits (W4A8KV8: 8)"},
    )
    kv_bits: int | None = field(default=None, metadata={"help": "fake-quantize k/v projections per token (KV8: 8)"})
    loss: str = field(
        default="auto",
        metadata={
            "help": "ce (next-token cross-entropy), kd (KL to the float model: the same weights with quantizers "
            "and adapters off, or --teacher), kd+ce (their sum); auto: kd for dl_qat and l4q, ce otherwise"
        },
    )
    kd_temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the kd loss"})
    teacher: str | None = field(
        default=None,
        metadata={"help": "kd: a separate teacher model (same tokenizer); default: the float model being quantized"},
    )
    eval_at: str = field(
        default="",
        metadata={
            "help": "learning curve: comma-separated optimizer steps (e.g. 40,120,400) at which to evaluate "
            "perplexity on eval_data and curve_eval_data, appended to curve.jsonl"
        },
    )
    curve_eval_data: str = field(
        default="", metadata={"help": "more held-out text files (comma-separated) for the eval_at points and the end"}
    )
    start_cache: str | None = field(
        default=None,
        metadata={
            "help": "folder that keeps calibrated GPTQ starts (--init gptq|gptq-mse, QA-LoRA --base gptq|gptq-mse): "
            "a later run of the same model, data and quantizer loads its start instead of calibrating again "
            "(an lr or seed sweep calibrates once)"
        },
    )
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        for name in ("seq_len", "grad_accum", "eval_seq_len", "eval_max_windows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        for name in ("micro_batch_size", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a positive integer")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision={self.mixed_precision!r}: expected auto, no, bf16 or fp16")
        for name in ("act_bits", "kv_bits"):
            value = getattr(self, name)
            if value is not None and not 2 <= value <= 8:
                raise ValueError(f"{name}={value!r}: expected 2..8 bits or unset (per-token codes are int8 at most)")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps!r}: expected 0 or a positive integer")
        if self.lr_schedule not in (*LR_SCHEDULES, "auto"):
            raise ValueError(f"lr_schedule={self.lr_schedule!r}: expected auto or one of {', '.join(LR_SCHEDULES)}")
        if self.loss not in (*LOSSES, "auto"):
            raise ValueError(f"loss={self.loss!r}: expected auto or one of {', '.join(LOSSES)}")
        if not is_positive_finite(self.kd_temperature):
            raise ValueError(f"kd_temperature={self.kd_temperature!r}: expected a positive finite number")
        if self.teacher is not None and self.loss in ("ce", "auto"):
            raise ValueError(f"teacher={self.teacher!r} needs --loss kd or kd+ce (loss=ce uses no teacher)")
        try:
            steps = self.curve_steps
        except ValueError as err:
            raise ValueError(f"eval_at={self.eval_at!r}: expected comma-separated positive integers") from err
        if any(s < 1 for s in steps):
            raise ValueError(f"eval_at={self.eval_at!r}: expected comma-separated positive integers")
        for name in ("max_grad_norm", "weight_decay"):
            if not is_non_negative_finite(value := getattr(self, name)):
                raise ValueError(f"{name}={value!r}: expected a finite number >= 0")

    @property
    def curve_steps(self) -> list[int]:
        return sorted({int(s) for s in self.eval_at.split(",") if s.strip()})

    @property
    def curve_texts(self) -> list[str]:
        return [s.strip() for s in self.curve_eval_data.split(",") if s.strip()]

    @property
    def is_demo(self) -> bool:
        return self.model is None and self.data is None


def resolve_defaults(method_cfg: M, cfg: TrainConfig, resumed_schedule: str | None = None) -> tuple[M, TrainConfig]:
    """Copies of both configs with the ``None`` and ``auto`` settings filled: the full-run values, or the
    short demo's; the method's loss and (for the filled step counts) its schedule. A DL-QAT setting
    without a range-only phase (dynamic, joint) gets the whole budget in phase 2, so every setting of the
    ablation grid trains equally long. ``resumed_schedule``: the schedule of the run being resumed, which
    ``auto`` keeps (a constant-lr run grown on resume stays constant rather than being refused)."""
    defaults = dict(DEMO_DEFAULTS if cfg.is_demo else RUN_DEFAULTS)
    if getattr(method_cfg, "resolved_clip_mode", None) in ("dynamic", "joint"):
        defaults.update(phase1_steps=0, phase2_steps=defaults["phase1_steps"] + defaults["phase2_steps"])
    method_cfg, cfg = _filled(method_cfg, defaults), _filled(cfg, defaults)
    if cfg.loss == "auto":
        cfg = replace(cfg, loss=handler(method_cfg).default_loss(method_cfg))
    if cfg.lr_schedule == "auto":
        cfg = replace(cfg, lr_schedule=resumed_schedule or handler(method_cfg).default_lr_schedule(method_cfg))
    return method_cfg, cfg


def _filled(config: C, defaults: dict) -> C:
    names = {f.name for f in fields(config)}
    return replace(config, **{k: v for k, v in defaults.items() if k in names and getattr(config, k) is None})
