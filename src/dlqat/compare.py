"""``dlqat compare``: several methods, same model, data, steps, seed and evaluation; one table.

Each run is a separate ``dlqat train`` process (so peak memory is that run's own), written to
``OUT/METHOD-wBITSgGROUP``; finished runs are reused when the comparison is run again. The table goes
to ``OUT/comparison.{md,csv}`` and a bar chart of perplexity to ``OUT/comparison.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from dlqat.fileio import atomic_write_json, atomic_write_text
from dlqat.methods import method_names

COLUMNS = [
    "method",
    "bits",
    "group",
    "perplexity",
    "float",
    "rtn",
    "trainable_params",
    "trainable_pct",
    "peak_memory_mb",
    "seconds_per_step",
]


def steps_flags(method: str, steps: int) -> list[str]:
    """Same optimizer-step budget for every trained method (DL-QAT: 1/5 in phase 1, the rest in phase 2)."""
    if method in ("rtn", "gptq"):
        return []
    if method == "dl_qat":
        phase1 = steps // 5
        return ["--phase1_steps", str(phase1), "--phase2_steps", str(steps - phase1)]
    return ["--steps", str(steps)]


def run_one(method: str, bits: int, group: int, steps: int, out: Path, extra: list[str]) -> dict:
    run_dir = out / f"{method}-w{bits}g{group}"
    results_file = run_dir / "results.json"
    if not results_file.is_file():
        argv = [
            sys.executable,
            "-m",
            "dlqat",
            "train",
            "--method",
            method,
            "--n_bits",
            str(bits),
            "--group_size",
            str(group),
            "--output_dir",
            str(run_dir),
            *steps_flags(method, steps),
            *extra,
        ]
        print(f"\n=== {method} W{bits} g{group}: {' '.join(argv[3:])}", flush=True)
        child = subprocess.Popen(argv)
        _, status, usage = os.wait4(child.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(
                f"{method} W{bits} g{group} failed (exit {os.waitstatus_to_exitcode(status)}); see {run_dir}"
            )
        data = json.loads(results_file.read_text())
        data["peak_memory_mb"] = (
            usage.ru_maxrss / 1024 if data.get("peak_memory_mb") is None else data["peak_memory_mb"]
        )
        atomic_write_json(results_file, data)
    data = json.loads(results_file.read_text())
    ppl = data["perplexity"]
    trainable = max(data["trainable_params"].values(), default=0)
    return {
        "method": method,
        "bits": bits,
        "group": group,
        "perplexity": ppl[method],
        "float": ppl.get("float"),
        "rtn": ppl.get("rtn"),
        "trainable_params": trainable,
        "trainable_pct": 100 * trainable / data["base_params"],
        "peak_memory_mb": data.get("peak_memory_mb"),
        "seconds_per_step": data.get("seconds_per_step"),
        "eval": data.get("eval"),
    }


def write_table(rows: list[dict], out: Path) -> str:
    with open(out / "comparison.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    lines = ["| method | W | g | perplexity | float | RTN | trainable | % | peak MB | s/step |", "|---" * 10 + "|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['bits']} | {r['group']} | {r['perplexity']:.3f} | {fmt(r['float'], '.3f')} "
            f"| {fmt(r['rtn'], '.3f')} | {r['trainable_params']:,} | {r['trainable_pct']:.2f} | "
            f"{fmt(r['peak_memory_mb'], '.0f')} | {fmt(r['seconds_per_step'], '.2f')} |"
        )
    if rows and rows[0].get("eval"):
        lines += ["", f"Perplexity: {rows[0]['eval']}."]
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "comparison.md", table)
    return table


def plot(rows: list[dict], out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return None
    settings = sorted({(r["bits"], r["group"]) for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(methods) * len(settings), 4))
    width = 0.8 / len(settings)
    for i, (bits, group) in enumerate(settings):
        vals = [
            next(
                (r["perplexity"] for r in rows if (r["method"], r["bits"], r["group"]) == (m, bits, group)),
                float("nan"),
            )
            for m in methods
        ]
        bars = ax.bar([j + i * width for j in range(len(methods))], vals, width, label=f"W{bits} g{group}")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    floats = [r["float"] for r in rows if r.get("float")]
    if floats:
        ax.axhline(floats[0], color="gray", linestyle="--", linewidth=1, label="float")
    ax.set_xticks([j + width * (len(settings) - 1) / 2 for j in range(len(methods))], methods, rotation=20)
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    path = out / "comparison.png"
    fig.savefig(path, dpi=120)
    return path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="dlqat compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--methods", default="rtn,gptq,lora_rtn,qa_lora,l4q,dl_qat", help=f"comma-separated, from {method_names()}"
    )
    parser.add_argument("--bits", default="4,3", help="comma-separated bit widths")
    parser.add_argument("--group_size", "--group-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per trained method")
    parser.add_argument("--output_dir", "--output-dir", default="runs/compare")
    args, extra = parser.parse_known_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in method_names()]
    if unknown:
        raise ValueError(f"methods={unknown}: expected names from {method_names()}")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [run_one(m, int(b), args.group_size, args.steps, out, extra) for b in args.bits.split(",") for m in methods]
    print("\n" + write_table(rows, out))
    png = plot(rows, out)
    print(f"table: {out / 'comparison.md'}, {out / 'comparison.csv'}" + (f"; plot: {png}" if png else ""))
    return 0
