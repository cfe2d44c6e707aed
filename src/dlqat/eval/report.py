"""Evaluation of one model (perplexity + lm-eval tasks) and side-by-side reports of several."""

from __future__ import annotations

import json
from pathlib import Path

from dlqat.commands import EvalConfig
from dlqat.eval.paired import average_difference, paired_difference, report_metric
from dlqat.eval.tables import bar_axes, figure, markdown_table
from dlqat.fileio import atomic_write_json, atomic_write_text

TASK_COLUMNS = ["arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande"]


def load_for_eval(path: str | None, rtn_bits: int | None, group_size: int):
    """(model, tokenizer, label) for a run / quantized folder / float model (optionally RTN); low-bit layers
    unpack their weights once and hold them (see ``hold_unpacked``)."""
    from dlqat.api import finalize, prepare
    from dlqat.export import load_quantized
    from dlqat.export.formats import quantized_dir
    from dlqat.layers.quantized_linear import hold_unpacked
    from dlqat.methods import RTNConfig
    from dlqat.models import load_model

    qdir = quantized_dir(path) if path else None
    if qdir is not None and (qdir / "dlqat_quant.json").is_file():
        if rtn_bits is not None:
            raise ValueError(f"--rtn-bits={rtn_bits}: {qdir} is already quantized; pass a float model")
        model, tokenizer = load_quantized(qdir)
        hold_unpacked(model)
        run_config = qdir.parent / "run_config.json"
        label = json.loads(run_config.read_text())["method"] if run_config.is_file() else str(qdir)
        return model, tokenizer, f"{label} ({Path(path).name})"
    model, tokenizer = load_model(path)
    label = f"float {path or 'SmolLM2-135M'}"
    if rtn_bits is not None:
        rtn = RTNConfig(n_bits=rtn_bits, group_size=group_size)
        finalize(model, rtn, prepare(model, rtn))
        hold_unpacked(model)
        label = f"RTN W{rtn_bits} g{group_size}"
    return model, tokenizer, label


def evaluate_model(args: EvalConfig) -> dict:
    """What ``dlqat eval`` computes, as a JSON-ready dict (perplexity is token-level, labelled so)."""
    import torch

    from dlqat import resources
    from dlqat.data import leading_bos, read_text, tokenize_text
    from dlqat.eval.perplexity import perplexity
    from dlqat.eval.zero_shot import check_tasks, evaluate_tasks, expand_tasks
    from dlqat.layers import set_act_quant

    tasks = expand_tasks(args.tasks or "")
    check_tasks(tasks, args.task_source)  # a misspelt task fails before the model loads
    model, tokenizer, label = load_for_eval(args.path, args.rtn_bits, args.group_size)
    if args.act_bits or args.kv_bits:  # else a saved model keeps the activation/KV settings it was trained with
        set_act_quant(model, args.act_bits, args.kv_bits)
        label += f" A{args.act_bits or 16}KV{args.kv_bits or 16}"
    result: dict = {"model": label}
    if not args.no_ppl:
        source = args.eval_data or str(resources.default_eval_text())
        with torch.no_grad():
            ppl = perplexity(
                model,
                tokenize_text(read_text(source), tokenizer),
                args.eval_seq_len,
                args.eval_max_windows,
                Path(source).name,
                bos_token_id=leading_bos(tokenizer),
            )
        result["perplexity"] = {"kind": "token-level", **ppl.to_dict(), "description": ppl.describe()}
    if tasks:
        result.update(
            evaluate_tasks(
                model,
                tokenizer,
                tasks,
                limit=args.limit,
                num_fewshot=args.num_fewshot,
                batch_size=args.batch_size,
                task_source=args.task_source,
                cache_dir=args.cache_dir,
            )
        )
    return result


def markdown(results: list[dict]) -> str:
    """The paper's layout: a row per model; perplexity, then acc / acc_norm per task, then MMLU."""
    tasks = [t for t in TASK_COLUMNS if any(t in r.get("tasks", {}) for r in results)]
    tasks += sorted({t for r in results for t in r.get("tasks", {})} - set(tasks))
    has_mmlu = any("mmlu" in r for r in results)
    head = ["model", "ppl"] + [f"{t} acc / acc_norm" for t in tasks] + (["MMLU avg"] if has_mmlu else [])
    rows = []
    for r in results:
        cells = [r["model"], f"{r['perplexity']['perplexity']:.3f}" if "perplexity" in r else "-"]
        for t in tasks:
            m = r.get("tasks", {}).get(t)
            cells.append("-" if m is None else " / ".join(f"{100 * m[k]:.1f}" for k in ("acc", "acc_norm") if k in m))
        if has_mmlu:
            cells.append(f"{100 * r['mmlu']['average']:.1f}" if "mmlu" in r else "-")
        rows.append(cells)
    notes = []
    for r in results:
        if "perplexity" in r:
            notes.append(f"Perplexity: {r['perplexity']['description']}.")
            break
    for part, settings in _settings(results).items():
        notes.append(
            f"{part}: lm-eval-harness, "
            + ("every example (full split)" if settings["limit"] is None else f"limit {settings['limit']} per task")
            + f", {settings['num_fewshot'] or 0}-shot, "
            f"{settings['task_source']} data, split: {settings['split']}; accuracies in %."
        )
    paired = paired_markdown(results)
    blocks = [markdown_table(head, rows), "\n".join(notes), paired]
    return "\n\n".join(b for b in blocks if b) + "\n"


def paired_markdown(results: list[dict]) -> str:
    """Each later model against the first on the same questions: per-task and average differences, 95 %.

    Uses the tasks every model has per-question scores for (evaluations from before those were saved
    have none); empty when there are none.
    """
    scored = [r for r in results if r.get("samples")]
    if len(scored) < 2 or scored[0] is not results[0]:
        return ""
    base = results[0]["samples"]
    order = TASK_COLUMNS + sorted(set(base) - set(TASK_COLUMNS))
    tasks = [t for t in order if all(t in r["samples"] for r in scored)]
    if not tasks:
        return ""
    rows = []
    for r in scored[1:]:
        diffs = [paired_difference(base[t], r["samples"][t], report_metric(base[t])) for t in tasks]
        rows.append([r["model"], *(d.points() for d in diffs), average_difference(diffs).points()])
    head = ["model", *(f"{t} Δ {report_metric(base[t])}" for t in tasks), "average Δ"]
    note = (
        f"Paired differences against {results[0]['model']} on the same questions, in accuracy points, with the "
        "95 % interval of the mean per-question difference (normal approximation); the average is the "
        "unweighted mean over the tasks shown (tasks are disjoint, so their variances add)."
    )
    return "\n".join([markdown_table(head, rows), "", note])


def merge_eval(old: dict, new: dict) -> dict:
    """``new`` over ``old``: task results merged; per-part settings kept under ``settings_by_part``."""
    merged = {**old, **{k: v for k, v in new.items() if k not in ("tasks", "settings")}}
    merged["tasks"] = {**old.get("tasks", {}), **new.get("tasks", {})}
    merged["samples"] = {**old.get("samples", {}), **new.get("samples", {})}
    parts = dict(old.get("settings_by_part") or ({_part_key(old): old["settings"]} if "settings" in old else {}))
    if "settings" in new:
        parts[_part_key(new)] = new["settings"]
    merged["settings_by_part"] = parts
    merged.pop("settings", None)
    return merged


def _part_key(result: dict) -> str:
    """An evaluation part is named by its tasks, so that two parts run with different limits keep both."""
    return "mmlu" if "mmlu" in result else ",".join(result.get("tasks", {})) or "tasks"


def _settings(results: list[dict]) -> dict:
    for r in results:
        if "settings_by_part" in r:
            parts = r["settings_by_part"]
            task_parts = [k for k in parts if k != "mmlu"]
            return {
                ("MMLU" if k == "mmlu" else "Tasks" if len(task_parts) == 1 else k.replace(",", ", ")): v
                for k, v in parts.items()
            }
        if "settings" in r:
            return {"Tasks": r["settings"]}
    return {}


def write_eval(result: dict, out: Path | None) -> str:
    table = markdown([result])
    if out is not None:
        atomic_write_json(out, result)
        atomic_write_text(out.with_suffix(".md"), table)
    return table


def report(paths: list[str], out_prefix: Path) -> str:
    """Side-by-side table (Markdown) and bar plot (PNG) of several evaluations."""
    results = []
    for p in paths:
        path = Path(p)
        path = path / "eval.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no evaluation found (run `dlqat eval RUN` first)")
        results.append(json.loads(path.read_text()))
    table = markdown(results)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_prefix.with_suffix(".md"), table)
    _plot(results, out_prefix.with_suffix(".png"))
    return table


def _plot(results: list[dict], path: Path) -> None:
    tasks = [t for t in TASK_COLUMNS if any(t in r.get("tasks", {}) for r in results)]
    names = [r["model"] for r in results]
    ppl = [r.get("perplexity", {}).get("perplexity", float("nan")) for r in results]

    def accuracy(r: dict, task: str) -> float:
        metrics = r.get("tasks", {}).get(task, {})
        return 100 * metrics.get("acc_norm", metrics.get("acc", 0))

    def draw(axes):
        bar_axes(axes[0], names, {"perplexity": ppl})
        axes[0].set_ylabel("perplexity (token-level, lower is better)")
        if tasks:
            bar_axes(axes[1], tasks, {r["model"]: [accuracy(r, t) for t in tasks] for r in results})
            axes[1].set_ylabel("accuracy % (acc_norm where defined)")
            axes[1].legend(fontsize=7)

    figure(1 + bool(tasks), 4 + 1.6 * len(tasks), path, draw)


def write_results(results: dict, out: Path) -> None:
    """``results.json`` and a Markdown table ``results.md``."""
    atomic_write_json(out / "results.json", results)
    s = results.get("settings", {})
    lines = [
        (
            f"# Perplexity: {s.get('method')} W{s.get('n_bits')} g{s.get('group_size')}, rank {s.get('rank')}, "
            f"{s.get('steps')} steps"
        ),
        "",
        f"{results.get('eval', '')}",
        "",
        markdown_table(["model", "perplexity"], [[k, f"{v:.3f}"] for k, v in results["perplexity"].items()]),
    ]
    base = results["base_params"]
    lines += ["", f"trainable parameters (of {base:,}):"]
    lines += [f"- {name}: {count:,} ({100 * count / base:.2f}%)" for name, count in results["trainable_params"].items()]
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
