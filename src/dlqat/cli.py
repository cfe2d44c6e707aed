"""``dlqat`` command line: subcommands mapped onto the same dataclass configs as the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from transformers import HfArgumentParser

from dlqat.methods import QuantMethodConfig, config_class, method_names
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
    presets = config_cls.presets
    parser.add_argument(
        "--preset", default=None, help=f"named settings of --method {config_cls.name}: {sorted(presets) or 'none'}"
    )
    if known.preset is not None:
        preset = config_cls.preset_settings(known.preset)
        given = {
            arg.split("=", 1)[0].removeprefix("--").replace("-", "_").removeprefix("no_")
            for arg in rest
            if arg.startswith("--")
        }
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
    _end_process_group()
    return 0 if results else 1


def _end_process_group() -> None:
    """Under torchrun, tear the process group down before exit: left to interpreter shutdown, a gloo worker
    sometimes aborts ("terminate called without an active exception") after the run has finished and written
    everything, and torchrun then reports the whole run as failed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _parse(config_cls: type, argv: list[str], prog: str, positional: str | None = None):
    """``config_cls`` from ``argv``: its fields are the flags (underscore spelling, hyphen and older
    names as aliases); ``positional`` names the field a leading bare argument fills."""
    if positional and argv and not argv[0].startswith("-"):
        argv = [f"--{positional}", argv[0], *argv[1:]]
    parser = HfArgumentParser(config_cls, prog=prog, description=config_cls.__doc__.splitlines()[0])
    (config,) = parser.parse_args_into_dataclasses(args=argv)
    return config


def _eval(argv: list[str]) -> int:
    from dlqat.commands import EvalConfig

    args = _parse(EvalConfig, argv, "dlqat eval", positional="path")
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
    from dlqat.commands import ExportConfig
    from dlqat.export.formats import export

    cfg = _parse(ExportConfig, argv, "dlqat export", positional="run")
    path = export(cfg.run, cfg.format, cfg.out, cfg.dtype, cfg.template, cfg.embed_bits, cfg.embed_group_size,
                  overwrite=cfg.overwrite)  # fmt: skip
    size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file())
    print(f"wrote {path} ({size / 2**20:.1f} MiB)")
    return 0


def _generate(argv: list[str]) -> int:
    from dlqat.commands import GenerateConfig

    cfg = _parse(GenerateConfig, argv, "dlqat generate", positional="path")
    generate(cfg)
    return 0


def generate(cfg) -> None:
    """Greedy generation from a low-bit model, streamed to stdout."""
    import torch
    from transformers import TextStreamer

    from dlqat.export import load_quantized
    from dlqat.export.formats import quantized_dir
    from dlqat.layers.quantized_linear import set_backend

    model, tokenizer = load_quantized(quantized_dir(cfg.path), dtype=torch.float32)
    set_backend(model, cfg.backend)
    if cfg.chat:
        messages = [{"role": "user", "content": cfg.prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]  # fmt: skip
    else:
        ids = tokenizer(cfg.prompt, return_tensors="pt")["input_ids"]
    streamer = TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=cfg.max_new_tokens, do_sample=False, streamer=streamer,
                       pad_token_id=tokenizer.pad_token_id)  # fmt: skip


def _starts(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="dlqat starts", description="What a --start_cache folder holds; remove the starts no run has used lately."
    )
    parser.add_argument("folder", help="the folder given to dlqat train --start_cache")
    parser.add_argument(
        "--prune_unused_days", "--prune-unused-days", type=float, default=None,
        help="remove the start files no run has written or loaded for this many days (a run that needs one "
        "calibrates it again); files that are not dlqat starts are never touched",
    )  # fmt: skip
    args = parser.parse_args(argv)
    from dlqat.start_cache import describe_starts, prune_starts, stored_starts

    if args.prune_unused_days is not None:
        for start in prune_starts(args.folder, args.prune_unused_days):
            print(f"removed {start.path} ({start.size / 2**20:.0f} MiB, {start.fields.get('start')} start)")
    print(describe_starts(*stored_starts(args.folder)))
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
    "starts": _starts,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(
            "usage: dlqat {train,eval,export,generate,compare,report,starts} [options]   (dlqat COMMAND --help for details)",
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
