"""``dlqat compare``: several methods, same model, data, steps, seed and evaluation; one table.

Each run is a separate ``dlqat train`` process (so peak memory is that run's own), written to
``OUT/METHOD-wBITSgGROUP``; finished runs are reused when the comparison is run again, killed ones
resume (or, killed before their first checkpoint, start again), each only with the settings it ran with
(a run there with others is refused, naming the fields, not reported as the run asked for). The table goes to
``OUT/comparison.{md,csv}`` and a bar chart of perplexity to ``OUT/comparison.png``. A method may name
one of its presets: ``dl_qat:paper``, ``qa_lora:paper``.

Learning curves: ``--steps 40,120,400`` trains each method once for the largest budget and evaluates
it at each listed step (``--eval_at``), on ``--eval_data`` and every ``--curve_eval_data`` text:
``OUT/curves.{md,png}``, perplexity against optimizer steps, one line per method. With a constant
learning rate (pinned for curves; ``--lr_schedule auto`` would decay DL-QAT's from ``COSINE_FROM_STEPS``)
and a fixed data order, the model at step 40 of that run is the model a 40-step run ends with (DL-QAT's
phase 1 is fixed at a fifth of the *first* point, so every point has the same phase 1; at 2 bits, where its
default ``--clip_mode joint`` has no phase 1, every step is phase 2). A method whose
trained model is quantized only after training (LoRA then RTN/GPTQ) gets one run per budget instead
(``OUT/METHOD-wBITSgGROUP-Nsteps`` for the shorter ones): its mid-run model is float + LoRA, not the
low-bit model.

A curve grows across sessions: ``--steps 40,120,200`` on a folder whose runs finished at 120 steps resumes
each of them to 200 (a constant-lr run continued from its checkpoint is the longer run; ``dlqat train``
refuses anything else), and a per-budget method's 120-step run keeps its point under its ``-120steps``
name. A run planned for more steps than asked is refused rather than reported as the shorter budget.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from dlqat.cli import parse_train_args
from dlqat.eval.tables import bar_axes, figure, line_plot, markdown_table, plain_log_y
from dlqat.fileio import atomic_write, atomic_write_json, atomic_write_text
from dlqat.layers import ClipMode
from dlqat.methods import config_class, handler, method_names
from dlqat.methods.dl_qat import COSINE_FROM_STEPS
from dlqat.quant.primitives import MAX_BITS, MIN_BITS, check_group_size
from dlqat.run_folder import run_schedule, run_settings, settings_diffs
from dlqat.train_config import resolve_defaults

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


def steps_flags(method: str, steps: list[int], bits: int, extra: list[str]) -> list[str]:
    """Same optimizer-step budget for every trained method (DL-QAT with a range-only phase: a fifth of the
    first point in phase 1; without one, the whole budget in phase 2)."""
    name = method.split(":")[0]
    if name in ("rtn", "gptq"):
        return []
    curve = ["--eval_at", ",".join(map(str, steps))] if len(steps) > 1 else []
    if name == "dl_qat":
        phase1 = steps[0] // 5 if dl_qat_clip_mode(method, bits, extra) == ClipMode.LEARN_THEN_FIX.value else 0
        return ["--phase1_steps", str(phase1), "--phase2_steps", str(steps[-1] - phase1), *curve]
    return ["--steps", str(steps[-1]), *curve]


def dl_qat_clip_mode(method: str, bits: int, extra: list[str]) -> str:
    """The clip mode the ``dlqat train`` run of this DL-QAT method will have, resolved by the same parser and
    config (a flag passed on, the preset, or the default at this bit width: joint at 2 bits has no phase 1)."""
    return parse_train_args([*method_flags(method), "--n_bits", str(bits), *extra])[0].resolved_clip_mode


def given_schedule(extra: list[str]) -> str | None:
    """The ``--lr_schedule`` among the flags passed on to ``dlqat train`` (None: not given, i.e. auto)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--lr_schedule", "--lr-schedule", default=None)
    return parser.parse_known_args(extra)[0].lr_schedule


def curve_schedule_flags(method: str, steps: list[int], extra: list[str]) -> list[str]:
    """A curve read off one run needs a constant lr: pinned where ``auto`` (given or by default) would let
    the run decay it, unless the method's preset sets the schedule itself (a repeated flag is refused)."""
    if len(steps) == 1 or given_schedule(extra) not in (None, "auto"):
        return []
    name, _, preset = method.partition(":")
    if preset and "lr_schedule" in config_class(name).preset_settings(preset):
        return []
    return ["--lr_schedule", "constant"]


def method_flags(method: str) -> list[str]:
    name, _, preset = method.partition(":")
    return ["--method", name, *(["--preset", preset] if preset else [])]


def curve_in_one_run(method: str) -> bool:
    """Whether one run's ``--eval_at`` points are shorter runs' results (else: one run per budget)."""
    cfg = config_class(method.split(":")[0])()
    return handler(cfg).trains_final_forward(cfg)


def run_one(method: str, bits: int, group: int, steps: list[int], out: Path, extra: list[str]) -> dict:
    """The method's row: its largest budget's results, and its curve (one run, or one run per budget)."""
    run_dir = out / f"{method.replace(':', '-')}-w{bits}g{group}"
    if len(steps) == 1 or curve_in_one_run(method):
        return row_of(method, bits, group, train_once(method, bits, group, steps, run_dir, extra), read_curve(run_dir))
    budgets = {s: run_dir if s == steps[-1] else run_dir.with_name(f"{run_dir.name}-{s}steps") for s in steps}
    earlier = planned_steps(saved_run_config(run_dir))  # run_dir held the largest budget of an earlier, shorter curve
    if earlier in budgets and earlier != steps[-1] and not budgets[earlier].exists():
        run_dir.rename(budgets[earlier])
    results = {s: train_once(method, bits, group, [s], folder, extra) for s, folder in budgets.items()}
    name = method.split(":")[0]
    curve = [
        {"step": s, "text": text, "perplexity": values[name]}
        for s, data in results.items()
        for text, values in data.get("perplexity_by_text", {}).items()
    ]
    return row_of(method, bits, group, results[steps[-1]], curve)


def saved_run_config(run_dir: Path) -> dict | None:
    """The run_config.json of the run set up in ``run_dir`` (None: no run there)."""
    config_file = run_dir / "run_config.json"
    return json.loads(config_file.read_text()) if config_file.is_file() else None


def planned_steps(saved: dict | None) -> int | None:
    """The optimizer steps of a saved run config (None: no run, or a method that does not train)."""
    cfg = saved["method_config"] if saved else {}
    if "steps" in cfg:
        return cfg["steps"]
    return cfg["phase1_steps"] + cfg["phase2_steps"] if "phase2_steps" in cfg else None


def finished_steps(run_dir: Path) -> int | None:
    """The optimizer steps the run in ``run_dir`` had trained when it last finished (None: never finished)."""
    results_file = run_dir / "results.json"
    return json.loads(results_file.read_text())["settings"]["steps"] if results_file.is_file() else None


def refuse_unfit_run(method: str, run_dir: Path, saved: dict | None, done: int | None, budget: int) -> None:
    """A run in ``run_dir`` (its saved config ``saved``, ``done`` steps finished) that cannot become the
    ``budget``-step run: refused, naming what is there."""
    planned = planned_steps(saved)
    there = f"{run_dir} holds a {max(planned or 0, done or 0)}-step {method} run"
    if max(planned or 0, done or 0) > budget:
        raise ValueError(f"{there}, more than --steps asks for ({budget}): end --steps at that, or pass another "
                         "--output_dir")  # fmt: skip
    if done is None or planned is None or done == budget:
        return
    if not (run_dir / "checkpoint.pt").is_file():
        raise ValueError(f"{there} and no checkpoint.pt to continue it to {budget} steps: pass another --output_dir")
    schedule = run_schedule(saved)
    if schedule != "constant":
        raise ValueError(
            f"{there} with lr_schedule={schedule!r}: only a constant-lr run continued to {budget} steps is the "
            f"{budget}-step run; pass another --output_dir"
        )


def refuse_other_settings(method: str, run_dir: Path, saved: dict, argv: list[str]) -> None:
    """A run in ``run_dir`` (saved config ``saved``) that compare would reuse or continue, but whose settings
    are not those ``argv`` (the ``dlqat train`` flags of this comparison) asks for: refused, naming each field,
    rather than reported (or grown) as the run asked for."""
    method_cfg, cfg = parse_train_args(argv)
    method_cfg, cfg = resolve_defaults(method_cfg, cfg, run_schedule(saved))
    diffs = settings_diffs(saved, run_settings(method_cfg, cfg))
    if diffs:
        raise ValueError(
            f"{run_dir} holds a {method} run with other settings than this comparison asks for: {'; '.join(diffs)}. "
            "Pass the flags it ran with (its run_config.json) or another --output_dir"
        )


def train_once(method: str, bits: int, group: int, steps: list[int], run_dir: Path, extra: list[str]) -> dict:
    """``dlqat train`` in its own process (reused if finished, continued if it finished short of the budget,
    resumed if killed; in each case only with the settings asked for); its results.json."""
    results_file = run_dir / "results.json"
    saved, done = saved_run_config(run_dir), finished_steps(run_dir)
    planned = planned_steps(saved)
    refuse_unfit_run(method, run_dir, saved, done, steps[-1])
    flags = [
        *method_flags(method), "--n_bits", str(bits), "--group_size", str(group), "--output_dir", str(run_dir),
        *steps_flags(method, steps, bits, extra), *extra, *curve_schedule_flags(method, steps, extra),
    ]  # fmt: skip
    has_checkpoint = (run_dir / "checkpoint.pt").is_file()
    rerun = done is None or (planned is not None and done != steps[-1])
    if saved is not None and (has_checkpoint or not rerun):
        refuse_other_settings(method, run_dir, saved, flags)
    # a run that finished short resumes from its last checkpoint; its results.json stays until the longer run
    # replaces it (a continuation killed on the way still has the shorter run's results, whose steps say so)
    if rerun:
        # killed after a checkpoint: resume it; killed before one (or a post-training method, which has none):
        # nothing trained is kept, so start it afresh in place of its run_config.json and partial logs
        if has_checkpoint:
            restart = ["--resume"]
        elif saved is not None:
            restart = ["--overwrite"]
        else:
            restart = []
        argv = [sys.executable, "-m", "dlqat", "train", *flags, *restart]
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
    return json.loads(results_file.read_text())


def read_curve(run_dir: Path) -> list[dict]:
    """The run's ``--eval_at`` points (curve.jsonl), or none."""
    curve_file = run_dir / "curve.jsonl"
    return [json.loads(line) for line in curve_file.read_text().splitlines()] if curve_file.is_file() else []


def row_of(method: str, bits: int, group: int, data: dict, curve: list[dict]) -> dict:
    """One comparison row from a run's results and its learning-curve points."""
    ppl = data["perplexity"]
    trainable = max(data["trainable_params"].values(), default=0)
    return {
        "method": method,
        "bits": bits,
        "group": group,
        "perplexity": ppl[method.split(":")[0]],
        "float": ppl.get("float"),
        "rtn": ppl.get("rtn"),
        "trainable_params": trainable,
        "trainable_pct": 100 * trainable / data["base_params"],
        "peak_memory_mb": data.get("peak_memory_mb"),
        "seconds_per_step": data.get("seconds_per_step"),
        "eval": data.get("eval"),
        "by_text": data.get("perplexity_by_text", {}),
        "curve": curve,
    }


def curve_points(row: dict, steps: list[int]) -> dict[str, dict[int, float]]:
    """text -> step -> perplexity; a method that does not train is flat at its one value."""
    method = row["method"].split(":")[0]
    if row["curve"]:
        points: dict[str, dict[int, float]] = {}
        for r in row["curve"]:
            points.setdefault(r["text"], {})[r["step"]] = r["perplexity"]
        return points
    return {text: dict.fromkeys(steps, values[method]) for text, values in row["by_text"].items()}


def write_curves(rows: list[dict], steps: list[int], out: Path) -> str:
    """Markdown: one table per text, a row per (method, setting), a column per step, float last."""
    texts = list(dict.fromkeys(t for r in rows for t in r["by_text"]))
    parts = []
    for text in texts:
        head = ["method", "W", "g", *(f"{s} steps" for s in steps), "float"]
        body = []
        for r in rows:
            points = curve_points(r, steps).get(text, {})
            ref = r["by_text"].get(text, {}).get("float")
            cells = [f"{points[s]:.2f} ({points[s] / ref:.2f}x)" if s in points and ref else "-" for s in steps]
            body.append([r["method"], r["bits"], r["group"], *cells, f"{ref:.2f}" if ref else "-"])
        parts.append(f"Held-out text: {text} (perplexity, ratio to float)\n\n" + markdown_table(head, body))
    text = "\n\n".join(parts) + "\n"
    atomic_write_text(out / "curves.md", text)
    return text


def plot_curves(rows: list[dict], steps: list[int], out: Path) -> Path | None:
    texts = list(dict.fromkeys(t for r in rows for t in r["by_text"]))
    settings = sorted({(r["bits"], r["group"]) for r in rows}, reverse=True)
    panels = [(b, g, t) for b, g in settings for t in texts]
    series = []
    for bits, group, text in panels:
        lines = {}
        for r in (r for r in rows if (r["bits"], r["group"]) == (bits, group)):
            points = curve_points(r, steps).get(text, {})
            lines[r["method"]] = ([s for s in steps if s in points], [points[s] for s in steps if s in points])
        ref = next((r["by_text"][text].get("float") for r in rows if text in r["by_text"]), None)
        series.append((f"W{bits} g{group}, {text}", lines, {"float": ref} if ref else {}))
    return line_plot(series, "optimizer steps", "held-out perplexity (log)", out / "curves.png")


def more_texts(rows: list[dict]) -> list[str]:
    """The held-out texts after ``--eval_data`` (``--curve_eval_data``), in the order the runs name them."""
    return list(dict.fromkeys(t for r in rows for t in r["by_text"]))[1:]


def text_perplexity(row: dict, text: str) -> float | None:
    return row["by_text"].get(text, {}).get(row["method"].split(":")[0])


def write_table(rows: list[dict], out: Path) -> str:
    """Markdown and CSV; one more perplexity column (with its ratio to float) per ``--curve_eval_data`` text."""
    texts = more_texts(rows)
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=[*COLUMNS, *(f"perplexity_{t}" for t in texts)], extrasaction="ignore")
    writer.writeheader()
    writer.writerows({**r, **{f"perplexity_{t}": text_perplexity(r, t) for t in texts}} for r in rows)
    atomic_write(out / "comparison.csv", lambda tmp: tmp.write_bytes(buffer.getvalue().encode("utf-8")))
    fmt = lambda v, spec: "-" if v is None else format(v, spec)

    def on_text(row: dict, text: str) -> str:
        ppl, ref = text_perplexity(row, text), row["by_text"].get(text, {}).get("float")
        return "-" if ppl is None else f"{ppl:.3f}" + (f" ({ppl / ref:.2f}x)" if ref else "")

    head = ["method", "W", "g", "perplexity", *texts, "float", "RTN", "trainable", "%", "peak MB", "s/step"]
    body = [
        [r["method"], r["bits"], r["group"], f"{r['perplexity']:.3f}", *(on_text(r, t) for t in texts),
         fmt(r["float"], ".3f"), fmt(r["rtn"], ".3f"), f"{r['trainable_params']:,}", f"{r['trainable_pct']:.2f}",
         fmt(r["peak_memory_mb"], ".0f"), fmt(r["seconds_per_step"], ".2f")]
        for r in rows
    ]  # fmt: skip
    table = markdown_table(head, body)
    if rows and rows[0].get("eval"):
        table += f"\n\nPerplexity: {rows[0]['eval']}."
    table += "\n"
    atomic_write_text(out / "comparison.md", table)
    return table


def plot(rows: list[dict], out: Path) -> Path | None:
    settings = sorted({(r["bits"], r["group"]) for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    value = {(r["method"], r["bits"], r["group"]): r["perplexity"] for r in rows}
    groups = {f"W{b} g{g}": [value.get((m, b, g), float("nan")) for m in methods] for b, g in settings}
    floats = [r["float"] for r in rows if r.get("float")]

    def draw(axes):
        ax = axes[0]
        bar_axes(ax, methods, groups, value_labels=True)
        if floats:
            ax.axhline(floats[0], color="gray", linestyle="--", linewidth=1, label="float")
        ax.set(ylabel="held-out perplexity (lower is better)")
        plain_log_y(ax)
        ax.legend()

    return figure(1, 1.2 + 1.1 * len(methods) * len(settings), out / "comparison.png", draw)


def int_list(flag: str, value: str, low: int, high: int | None, expected: str) -> list[int]:
    """``"40,120"`` -> ``[40, 120]``; refused (naming the flag) if empty, not integers or out of range."""
    error = ValueError(f"{flag}={value!r}: expected comma-separated {expected}")
    try:
        numbers = [int(v) for v in value.split(",") if v]
    except ValueError as err:
        raise error from err
    if not numbers or any(n < low or (high is not None and n > high) for n in numbers):
        raise error
    return numbers


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="dlqat compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--methods", default="rtn,gptq,lora_rtn,qa_lora,l4q,dl_qat", help=f"comma-separated, from {method_names()}"
    )
    parser.add_argument("--bits", default="4,3", help="comma-separated bit widths")
    parser.add_argument("--group_size", "--group-size", type=int, default=128)
    parser.add_argument(
        "--steps", default="100", help="optimizer steps per trained method; a list (40,120,400) draws learning curves"
    )
    parser.add_argument("--output_dir", "--output-dir", default="runs/compare")
    args, extra = parser.parse_known_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m.split(":")[0] not in method_names()]
    if unknown:
        raise ValueError(f"methods={unknown}: expected names from {method_names()}")
    for name, _, preset in (m.partition(":") for m in methods):
        if not preset:
            continue
        try:  # refused now, not after the runs before it
            config_class(name).preset_settings(preset)
        except ValueError as err:
            raise ValueError(f"--methods {name}:{preset}: {err}") from None
    steps = sorted(set(int_list("--steps", args.steps, 1, None, "positive integers")))
    bits = int_list("--bits", args.bits, MIN_BITS, MAX_BITS, f"integers from {MIN_BITS} to {MAX_BITS}")
    check_group_size(args.group_size, "--group_size")  # else the first run refuses it, after --output_dir exists
    lr_schedule = given_schedule(extra)
    if len(steps) > 1 and lr_schedule not in (None, "auto", "constant"):
        raise ValueError(
            f"--steps={args.steps!r} with --lr_schedule {lr_schedule}: a curve read off one run equals shorter runs "
            "only at a constant lr; run each budget separately (one --steps value per compare)"
        )
    if len(steps) > 1 and lr_schedule != "constant":
        print(
            f"--steps {args.steps}: every run at a constant lr (a curve read off one run equals shorter runs only "
            f"then; `--lr_schedule auto` decays DL-QAT's lr from {COSINE_FROM_STEPS} steps: compare one budget for it)"
        )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [run_one(m, b, args.group_size, steps, out, extra) for b in bits for m in methods]
    print("\n" + write_table(rows, out))
    png = plot(rows, out)
    print(f"table: {out / 'comparison.md'}, {out / 'comparison.csv'}" + (f"; plot: {png}" if png else ""))
    if len(steps) > 1:
        print("\n" + write_curves(rows, steps, out))
        print(f"curves: {out / 'curves.md'}; plot: {plot_curves(rows, steps, out)}")
    return 0
