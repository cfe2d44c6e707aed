"""Shared fixtures: seeds, a tiny local tokenizer, tiny HF models built from configs (no downloads)."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from types import ModuleType

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from dlqat.methods.dl_qat import DLQATConfig
from dlqat.train import TrainConfig

VOCAB = 320
CORPUS = (
    "The quick brown fox jumps over the lazy dog. A quantized model stores integer codes and a scale "
    "and an offset for every group of weights. Low rank adapters train a small number of parameters. "
    "Perplexity is the exponential of the mean negative log likelihood per token. "
) * 40

TINY = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


@pytest.fixture(autouse=True)
def seed() -> int:
    random.seed(0)
    torch.manual_seed(0)
    return 0


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


ARCHS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**TINY)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**TINY)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=16)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**TINY)),
    "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(**TINY, head_dim=16, sliding_window=64)),
}


def tiny_model(arch: str = "llama") -> torch.nn.Module:
    return ARCHS[arch]().eval()


def load_bench(name: str) -> ModuleType:
    """A ``bench/`` script as a module (bench scripts are not a package), for testing its functions."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def converted_tiny_model(model_dir: Path, **method) -> torch.nn.Module:
    """The tiny model from ``model_dir`` through DL-QAT (``method``: ``DLQATConfig`` fields; rank 2, g32
    unless given) with trained-looking adapters and offsets, converted to ``QuantizedLinear`` codes."""
    from dlqat import convert, prepare

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prepare(model, DLQATConfig(**{"rank": 2, "group_size": 32, **method}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lora_b", "offset")):
                p.add_(0.05 * torch.randn_like(p))
    convert(model)
    return model


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama with tied embeddings and its tokenizer, saved as an ordinary HF folder."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=True))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text(CORPUS)
    return path


@pytest.fixture()
def alpaca_file(tmp_path) -> Path:
    records = [
        {"instruction": "Name a color.", "input": "", "output": "Blue."},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    ] * 4
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records))
    return path


def tiny_args(model_dir: Path, text_file: Path, out: Path, **flags) -> list[str]:
    """`dlqat train` flags for a seconds-long run of the tiny model on the tiny text (``flags`` override)."""
    values = {
        "model": model_dir,
        "data": text_file,
        "eval_data": text_file,
        "output_dir": out,
        "group_size": 32,
        "seq_len": 32,
        "grad_accum": 1,
        "eval_seq_len": 32,
        "eval_max_windows": 2,
        "loss": "ce",  # the tests of the loop pin ce; kd (the default for dl_qat/l4q) has its own tests
        **flags,
    }
    return [arg for key, value in values.items() for arg in (f"--{key}", str(value))] + ["--no_progress"]


def tiny_eval_args(path: Path, text_file: Path, output: Path, max_windows: int = 2, *extra: str) -> list[str]:
    """`dlqat eval` argv: perplexity of ``path`` on the tiny text in 32-token windows, saved to ``output``."""
    return ["eval", str(path), "--eval-data", str(text_file), "--seq-len", "32", "--max-windows", str(max_windows),
            "--output", str(output), *extra]  # fmt: skip


def tiny_configs(tiny_model_dir, text_file, out, **overrides):
    """``(DLQATConfig, TrainConfig)`` for a seconds-long Python-API run (``overrides`` go to whichever has the field)."""
    method = {
        "n_bits": 3,
        "group_size": 32,
        "rank": 4,
        "phase1_steps": 3,
        "phase2_steps": 12,
        "lr": 1e-2,
        "quant_lr": 1e-3,
        "init": None,
        "clip_mode": None,
    }
    run = {
        "model": str(tiny_model_dir),
        "data": str(text_file),
        "eval_data": str(text_file),
        "output_dir": str(out),
        "seq_len": 32,
        "grad_accum": 2,
        "micro_batch_size": 2,
        "eval_seq_len": 32,
        "eval_max_windows": 8,
        "save_every": 4,
        "progress": False,
        "loss": "ce",
    }
    for key, value in overrides.items():
        (method if key in method else run)[key] = value
    return DLQATConfig(**method), TrainConfig(**run)
