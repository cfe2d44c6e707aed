"""Learning curves of finished (or running) runs: held-out perplexity vs optimizer steps, one panel per
text, one line per run, from each run's ``curve.jsonl`` (``dlqat train --eval_at ... --curve_eval_data``);
the float model's perplexity (from the run's checkpoint results) is the dashed line, each run's untrained
start (the PTQ result it starts from: RTN, GPTQ, ...) a dotted one: what training has to beat.

    python bench/plot_curve.py runs/long/w3g128-kd-200 --out docs/curve_w3g128.png
    python bench/plot_curve.py runs/a runs/b --labels "DL-QAT (cosine),L4Q (constant)" --out docs/ab.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dlqat.eval.tables import line_plot, markdown_table
from dlqat.methods import handler, make_config
from dlqat.run_folder import load_checkpoint


def read_curve(run: Path) -> dict[str, dict[int, float]]:
    """text name -> {step: perplexity}."""
    curve: dict[str, dict[int, float]] = {}
    for line in (run / "curve.jsonl").read_text().splitlines():
        row = json.loads(line)
        curve.setdefault(row["text"], {})[row["step"]] = row["perplexity"]
    return curve


def perplexities(run: Path, row: str) -> dict[str, float]:
    """Text -> perplexity of one row (``float``, ``rtn``, ...) from ``results.json`` or, for an unfinished
    run, its checkpoint."""
    if (run / "results.json").is_file():
        results = json.loads((run / "results.json").read_text())
    else:
        results = load_checkpoint(run / "checkpoint.pt")["results"]  # weights_only, as every checkpoint load
    return {text: rows[row] for text, rows in results.get("perplexity_by_text", {}).items() if row in rows}


def start_label(run: Path) -> str | None:
    """The row name of the PTQ result the run's untrained model computes (e.g. ``gptq-mse``), or None."""
    settings = json.loads((run / "run_config.json").read_text())
    fields = {k: v for k, v in settings["method_config"].items() if k != "method"}
    cfg = make_config(settings["method"], **fields)
    return handler(cfg).starts_at(cfg)


def line_names(runs: list[Path], labels: str | None) -> list[str]:
    """Each run's line name: its entry in the comma-separated ``labels``, else its folder name."""
    if labels is None:
        return [run.name for run in runs]
    names = [name.strip() for name in labels.split(",")]
    if len(names) != len(runs) or len(set(names)) != len(names) or not all(names):
        raise ValueError(f"--labels {labels!r}: expected {len(runs)} distinct non-empty names, one per run folder")
    return names


def untrained_starts(runs: list[Path], names: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Reference line name -> text -> perplexity of each run's untrained start. Seeds of one recipe share
    their start: then one line for all of them, else one per run, named after it (``names``, else its folder)."""
    names = names or line_names(runs, None)
    run_starts = [
        (name, label, perplexities(run, label)) for run, name in zip(runs, names) if (label := start_label(run))
    ]
    shared = len({(label, tuple(sorted(by_text.items()))) for _, label, by_text in run_starts}) == 1
    return {
        f"untrained ({label})" if shared else f"{name}: untrained ({label})": by_text
        for name, label, by_text in run_starts
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders with curve.jsonl")
    parser.add_argument("--labels", help="comma-separated line names, one per run (default: the folder names)")
    parser.add_argument("--out", required=True, help="PNG path (a Markdown table is printed)")
    args = parser.parse_args()
    runs = list(map(Path, args.runs))
    try:
        names = line_names(runs, args.labels)
    except ValueError as error:
        parser.error(str(error))
    curves = {name: read_curve(run) for name, run in zip(names, runs)}
    floats = perplexities(runs[0], "float")
    starts = untrained_starts(runs, names)
    texts = sorted({text for curve in curves.values() for text in curve})
    series = []
    for text in texts:
        refs = {"float": floats[text]} if text in floats else {}
        refs.update({name: by_text[text] for name, by_text in starts.items() if text in by_text})
        lines = {name: (sorted(c[text]), [c[text][s] for s in sorted(c[text])]) for name, c in curves.items()}
        series.append((text, lines, refs))
    line_plot(series, "optimizer steps", "held-out perplexity (log)", Path(args.out))
    rows = [
        [name, text, *(f"{step}: {ppl:.2f} ({ppl / floats[text]:.2f}x)" for step, ppl in sorted(c[text].items()))]
        for name, c in curves.items()
        for text in sorted(c)
        if text in floats
    ]
    width = max(len(row) for row in rows) - 2
    print(markdown_table(["run", "text", *(["step: ppl (x float)"] * width)], rows))


if __name__ == "__main__":
    main()
