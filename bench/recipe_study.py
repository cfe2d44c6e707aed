"""Recipe study: train named recipes at one setting and budget, evaluate every run on several held-out
domains, and write one table. Resumable: a finished run is skipped, a killed one resumes.

Domains (all from ``exllamav2``'s calibration texts; training uses ``c4.utf8`` only):
``technical`` is the *selection* domain (pick a recipe by it), ``wiki`` and ``tiny`` (TinyStories)
are the *reported* ones, never used to choose.

    python bench/recipe_study.py --bits 3 --group_size 128 --phase1_steps 8 --phase2_steps 32 \\
        --recipes paper,ce-lr1e-3,kd-lr1e-3 --out docs/study/w3g128-40

``--model`` studies another model (a hub id, folder or .gguf; default: the embedded SmolLM2-135M);
``EMBEDDED`` in a recipe (a ``--teacher``) then means that model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from dlqat import resources

DOMAINS = {"technical": "selection", "wiki": "report", "tiny": "report"}
# name -> dlqat train flags on top of the setting's; "paper" = the DL-QAT paper's recipe as shipped so far.
# Every recipe pins --init: the default start changed (min/max -> mse) after the first ones ran.
# fmt: off
RECIPES = {
    "paper": ["--loss", "ce", "--lr", "2e-4", "--quant_lr", "1e-4", "--init", "minmax"],
    "ce-lr2e-4-mse": ["--loss", "ce", "--lr", "2e-4", "--quant_lr", "1e-4", "--init", "mse"],
    "ce-lr1e-3": ["--loss", "ce", "--lr", "1e-3", "--quant_lr", "1e-4", "--init", "minmax"],
    "kd-lr2e-4": ["--loss", "kd", "--lr", "2e-4", "--quant_lr", "1e-4", "--init", "minmax"],
    "kd-lr1e-3": ["--loss", "kd", "--lr", "1e-3", "--quant_lr", "1e-4", "--init", "minmax"],
    "kd-lr2e-3": ["--loss", "kd", "--lr", "2e-3", "--quant_lr", "1e-4", "--init", "minmax"],
    "kd-lr4e-3": ["--loss", "kd", "--lr", "4e-3", "--quant_lr", "1e-4", "--init", "minmax"],
    "kd-lr2e-3-mse": ["--loss", "kd", "--lr", "2e-3", "--quant_lr", "1e-4", "--init", "mse"],
    "kd-lr5e-4-mse": ["--loss", "kd", "--lr", "5e-4", "--quant_lr", "1e-4", "--init", "mse"],
    "kd-lr4e-3-mse": ["--loss", "kd", "--lr", "4e-3", "--quant_lr", "1e-4", "--init", "mse"],
    "kd-lr2e-3-mse-shift5e-4": ["--loss", "kd", "--lr", "2e-3", "--quant_lr", "1e-4", "--init", "mse", "--shift_lr", "5e-4"],
    "kd-lr2e-3-mse-shift5e-5": ["--loss", "kd", "--lr", "2e-3", "--quant_lr", "1e-4", "--init", "mse", "--shift_lr", "5e-5"],
    "kd-lr2e-3-mse-joint": ["--loss", "kd", "--lr", "2e-3", "--quant_lr", "1e-4", "--init", "mse", "--clip_mode", "joint"],
    "kd-lr2e-3-mse-cos": ["--loss", "kd", "--lr", "2e-3", "--quant_lr", "1e-4", "--init", "mse", "--lr_schedule", "cosine"],
    "kd-lr4e-3-mse-cos": ["--loss", "kd", "--lr", "4e-3", "--quant_lr", "1e-4", "--init", "mse", "--lr_schedule", "cosine"],
    "kd-lr2e-3-mse-wu4": ["--loss", "kd", "--lr", "2e-3", "--quant_lr", "1e-4", "--init", "mse", "--warmup_steps", "4"],
    "kd-lr2e-3-mse-p1-0": ["--loss", "kd", "--lr", "2e-3", "--quant_lr", "1e-4", "--init", "mse", "--phase1_steps", "0"],
    "kd-lr2e-3-mse-cos-p1-0": ["--loss", "kd", "--lr", "2e-3", "--quant_lr", "1e-4", "--init", "mse", "--lr_schedule", "cosine", "--phase1_steps", "0"],
    "kd-lr2e-3-mse-m6e-3": ["--loss", "kd", "--lr", "2e-3", "--quant_lr", "1e-4", "--init", "mse", "--magnitude_lr", "6e-3"],
    "kd-lr2e-3-mse-m6e-4": ["--loss", "kd", "--lr", "2e-3", "--quant_lr", "1e-4", "--init", "mse", "--magnitude_lr", "6e-4"],
    "kd-lr2e-3-mse-m2e-4": ["--loss", "kd", "--lr", "2e-3", "--quant_lr", "1e-4", "--init", "mse", "--magnitude_lr", "2e-4"],
    "kd-lr1e-3-q2e-4": ["--loss", "kd", "--lr", "1e-3", "--quant_lr", "2e-4", "--init", "minmax"],
    "kd-lr1e-3-q1e-3": ["--loss", "kd", "--lr", "1e-3", "--quant_lr", "1e-3", "--init", "minmax"],
    "kd-lr1e-3-joint": ["--loss", "kd", "--lr", "1e-3", "--quant_lr", "1e-4", "--clip_mode", "joint", "--init", "minmax"],
    "kd-lr1e-3-mse": ["--loss", "kd", "--lr", "1e-3", "--quant_lr", "1e-4", "--init", "mse"],
    "l4q-kd-lr1e-3": ["--method", "l4q", "--loss", "kd", "--lr", "1e-3", "--quant_lr", "1e-4"],
    "l4q-paper": ["--method", "l4q", "--loss", "ce", "--lr", "2e-4", "--quant_lr", "1e-4"],
    "l4q-kd-lr2e-4": ["--method", "l4q", "--loss", "kd", "--lr", "2e-4", "--quant_lr", "1e-4"],
    "l4q-kd-lr2e-3": ["--method", "l4q", "--loss", "kd", "--lr", "2e-3", "--quant_lr", "1e-4"],
    "qa_lora-lr2e-4": ["--method", "qa_lora", "--lr", "2e-4"],
    "qa_lora-lr2e-3": ["--method", "qa_lora", "--lr", "2e-3"],
    "qa_lora-gptq-r64-lr2e-4": ["--method", "qa_lora", "--base", "gptq", "--rank", "64", "--lr", "2e-4"],
    "qa_lora-gptq-r64-lr2e-3": ["--method", "qa_lora", "--base", "gptq", "--rank", "64", "--lr", "2e-3"],
    "qa_lora-gptq-r64-lr5e-3": ["--method", "qa_lora", "--base", "gptq", "--rank", "64", "--lr", "5e-3"],
    "qa_lora-gptq-r64-kd-lr2e-3": ["--method", "qa_lora", "--base", "gptq", "--rank", "64", "--lr", "2e-3", "--loss", "kd", "--teacher", "EMBEDDED"],
    "qa_lora-gptq-r64-kd-lr5e-3": ["--method", "qa_lora", "--base", "gptq", "--rank", "64", "--lr", "5e-3", "--loss", "kd", "--teacher", "EMBEDDED"],
    "qa_lora-gptqmse-r64-kd-lr5e-3": ["--method", "qa_lora", "--base", "gptq-mse", "--rank", "64", "--lr", "5e-3", "--loss", "kd", "--teacher", "EMBEDDED"],
    "qa_lora-gptq-r64-kd-lr5e-3-cos": ["--method", "qa_lora", "--base", "gptq", "--rank", "64", "--lr", "5e-3", "--loss", "kd", "--teacher", "EMBEDDED", "--lr_schedule", "cosine"],
    "qa_lora-gptqmse-r64-lr2e-3": ["--method", "qa_lora", "--base", "gptq-mse", "--rank", "64", "--lr", "2e-3"],
    "full_qat-lr2e-5": ["--method", "full_qat", "--lr", "2e-5"],
    "full_qat-lr2e-4": ["--method", "full_qat", "--lr", "2e-4"],
    "full_qat-kd-lr2e-5": ["--method", "full_qat", "--lr", "2e-5", "--loss", "kd", "--teacher", "EMBEDDED"],
    "lora_gptq": ["--method", "lora_gptq"],
    "kd-lr2e-3-mse-zpint": ["--loss", "kd", "--lr", "2e-3", "--quant_lr", "1e-4", "--init", "mse", "--zero_point", "int"],
    "kd-lr2e-3-gptq": ["--loss", "kd", "--lr", "2e-3", "--quant_lr", "1e-4", "--init", "gptq", "--teacher", "EMBEDDED"],
    "kd-lr2e-4-gptq": ["--loss", "kd", "--lr", "2e-4", "--quant_lr", "1e-4", "--init", "gptq", "--teacher", "EMBEDDED"],
    "kd-lr5e-4-gptq": ["--loss", "kd", "--lr", "5e-4", "--quant_lr", "1e-4", "--init", "gptq", "--teacher", "EMBEDDED"],
    "kd-lr2e-3-gptq-cos": ["--loss", "kd", "--lr", "2e-3", "--quant_lr", "1e-4", "--init", "gptq", "--teacher", "EMBEDDED", "--lr_schedule", "cosine"],
    "kd-lr2e-3-gptq-cos-r64": ["--loss", "kd", "--lr", "2e-3", "--quant_lr", "1e-4", "--init", "gptq", "--teacher", "EMBEDDED", "--lr_schedule", "cosine", "--rank", "64", "--alpha", "64"],
    "kd-lr2e-3-gptq-cos-joint": ["--loss", "kd", "--lr", "2e-3", "--quant_lr", "1e-4", "--init", "gptq", "--teacher", "EMBEDDED", "--lr_schedule", "cosine", "--clip_mode", "joint"],
    "kd-lr2e-3-gptqmse": ["--loss", "kd", "--lr", "2e-3", "--quant_lr", "1e-4", "--init", "gptq-mse", "--teacher", "EMBEDDED"],
    "kd-lr5e-4-gptqmse": ["--loss", "kd", "--lr", "5e-4", "--quant_lr", "1e-4", "--init", "gptq-mse", "--teacher", "EMBEDDED"],
    "kd-lr2e-4-gptqmse": ["--loss", "kd", "--lr", "2e-4", "--quant_lr", "1e-4", "--init", "gptq-mse", "--teacher", "EMBEDDED"],
    "kd-lr2e-3-gptq-p1-0": ["--loss", "kd", "--lr", "2e-3", "--quant_lr", "1e-4", "--init", "gptq", "--teacher", "EMBEDDED", "--phase1_steps", "0"],
    "kd-lr2e-4-gptqmse-p1-0": ["--loss", "kd", "--lr", "2e-4", "--quant_lr", "1e-4", "--init", "gptq-mse", "--teacher", "EMBEDDED", "--phase1_steps", "0"],
    "kd-lr5e-4-gptqmse-p1-0": ["--loss", "kd", "--lr", "5e-4", "--quant_lr", "1e-4", "--init", "gptq-mse", "--teacher", "EMBEDDED", "--phase1_steps", "0"],
    "kd-lr2e-4-mse": ["--loss", "kd", "--lr", "2e-4", "--quant_lr", "1e-4", "--init", "mse"],
    "kd-lr2e-3-gptqmse-cos": ["--loss", "kd", "--lr", "2e-3", "--quant_lr", "1e-4", "--init", "gptq-mse", "--teacher", "EMBEDDED", "--lr_schedule", "cosine"],
    "kd-lr2e-3-gptqmse-cos-joint": ["--loss", "kd", "--lr", "2e-3", "--quant_lr", "1e-4", "--init", "gptq-mse", "--teacher", "EMBEDDED", "--lr_schedule", "cosine", "--clip_mode", "joint"],
    "kd-lr2e-3-gptqmse-cos-p1-0": ["--loss", "kd", "--lr", "2e-3", "--quant_lr", "1e-4", "--init", "gptq-mse", "--teacher", "EMBEDDED", "--lr_schedule", "cosine", "--phase1_steps", "0"],
    "l4q-kd-lr2e-3-gptqmse-cos": ["--method", "l4q", "--loss", "kd", "--lr", "2e-3", "--quant_lr", "1e-4", "--init", "gptq-mse", "--teacher", "EMBEDDED", "--lr_schedule", "cosine"],
    "lora_gptq-mse": ["--method", "lora_gptq", "--grid", "mse"],
    "gptq": ["--method", "gptq"],
    "gptq-mse": ["--method", "gptq", "--grid", "mse"],
}
# fmt: on
UNTRAINED = {"gptq", "gptq-mse"}  # post-training methods: no step count


def domain_file(name: str) -> Path:
    return resources.package_file("exllamav2", f"conversion/standard_cal_data/{name}.utf8")


def dlqat(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "dlqat", *args], check=True)  # PYTHONPATH picks the dlqat to study


def run_recipe(name: str, args: argparse.Namespace, runs: Path) -> dict:
    run = runs / name
    total = args.phase1_steps + args.phase2_steps  # every recipe trains the same number of steps
    model = args.model or str(resources.default_gguf())
    flags = [model if flag == "EMBEDDED" else flag for flag in RECIPES[name]]
    flags += ["--model", args.model] if args.model else []
    flags += ["--start_cache", args.start_cache] if args.start_cache and name not in UNTRAINED else []
    if name in UNTRAINED:
        steps = []
    elif "--method" in flags:
        steps = ["--steps", str(total)]
    elif "joint" in flags:  # no range-only phase: the whole budget in phase 2
        steps = ["--phase1_steps", "0", "--phase2_steps", str(total)]
    elif "--phase1_steps" in flags:  # the recipe sets phase 1's share of the same total
        steps = ["--phase2_steps", str(total - int(flags[flags.index("--phase1_steps") + 1]))]
    else:
        steps = ["--phase1_steps", str(args.phase1_steps), "--phase2_steps", str(args.phase2_steps)]
    if name not in UNTRAINED and "--lr_schedule" not in flags:
        flags += ["--lr_schedule", "constant"]  # a recipe without "-cos" ran at a constant lr, the default before auto
    if "--method" not in flags and "--clip_mode" not in flags:  # a DL-QAT recipe without "-joint" ran so
        flags += ["--clip_mode", "learn_then_fix"]  # (the default at every width before 2-bit joint)
    if not (run / "results.json").is_file():
        dlqat(
            "train", "--data", str(resources.default_train_text()), "--eval_data", str(domain_file("wiki")),
            "--n_bits", str(args.bits), "--group_size", str(args.group_size), *steps,
            "--seq_len", str(args.seq_len), "--grad_accum", str(args.grad_accum), "--seed", str(args.seed),
            "--eval_seq_len", "512", "--eval_max_windows", str(args.windows), "--save_every", "10",
            "--output_dir", str(run), *flags, *(["--resume"] if (run / "checkpoint.pt").is_file() else []),
        )  # fmt: skip
    row = {"recipe": name, "flags": " ".join(RECIPES[name])}
    for domain in DOMAINS:
        result = run / f"eval-{domain}.json"
        if not result.is_file():
            dlqat("eval", "--path", str(run), "--eval-data", str(domain_file(domain)), "--seq-len", "512",
                  "--max-windows", str(args.windows), "--output", str(result))  # fmt: skip
        row[domain] = json.loads(result.read_text())["perplexity"]["perplexity"]
    return row


def reference(kind: str, args: argparse.Namespace, runs: Path) -> dict:
    row = {"recipe": kind, "flags": ""}
    for domain in DOMAINS:
        result = runs / f"{kind}-eval-{domain}.json"
        if not result.is_file():
            extra = ["--rtn-bits", str(args.bits), "--group-size", str(args.group_size)] if kind == "rtn" else []
            extra += ["--path", args.model] if args.model else []
            dlqat("eval", "--eval-data", str(domain_file(domain)), "--seq-len", "512",
                  "--max-windows", str(args.windows), "--output", str(result), *extra)  # fmt: skip
        row[domain] = json.loads(result.read_text())["perplexity"]["perplexity"]
    return row


def table(rows: list[dict], float_row: dict) -> str:
    head = " | ".join(f"{d} ({DOMAINS[d]})" for d in DOMAINS)
    lines = [f"| recipe | {head} | flags |", "|---" * (len(DOMAINS) + 2) + "|"]
    for row in rows:
        cells = " | ".join(f"{row[d]:.2f} ({row[d] / float_row[d]:.2f}x)" for d in DOMAINS)
        lines.append(f"| {row['recipe']} | {cells} | `{row['flags']}` |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group_size", type=int, default=128)
    parser.add_argument("--phase1_steps", type=int, default=8)
    parser.add_argument("--phase2_steps", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--grad_accum", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--windows", type=int, default=16, help="512-token windows per domain")
    parser.add_argument("--recipes", default="paper,ce-lr1e-3,kd-lr1e-3")
    parser.add_argument("--model", default=None, help="hub id, folder or .gguf (default: the embedded SmolLM2-135M)")
    parser.add_argument("--start_cache", default=None, help="dlqat train --start_cache: GPTQ starts calibrated once")
    parser.add_argument("--out", required=True, help="folder for table.md and rows.json (committed)")
    parser.add_argument("--runs", default=None, help="folder for the run folders (default runs/study/<out name>)")
    args = parser.parse_args()
    out = Path(args.out)
    runs = Path(args.runs or Path("runs/study") / out.name)
    out.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    rows = [reference("float", args, runs), reference("rtn", args, runs)]
    for name in args.recipes.split(","):
        if name not in RECIPES:
            raise SystemExit(f"--recipes: {name!r} is not one of {sorted(RECIPES)}")
        rows.append(run_recipe(name, args, runs))
        budget = (args.phase1_steps + args.phase2_steps) * args.grad_accum * args.seq_len
        text = (
            (f"{args.model}: " if args.model else "")
            + f"W{args.bits} g{args.group_size}, {args.phase1_steps}+{args.phase2_steps} steps x {args.grad_accum} x "
            f"{args.seq_len} tokens ({budget:,} training tokens of c4.utf8), seed {args.seed}; token-level "
            f"perplexity, {args.windows} x 512-token windows per domain (ratio to float in brackets)\n\n"
            + table(rows, rows[0])
            + "\n"
        )
        (out / "table.md").write_text(text)
        (out / "rows.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
