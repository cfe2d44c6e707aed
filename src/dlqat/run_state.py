"""A run in progress: what it holds, and its evaluations (perplexity rows, learning-curve points)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from dlqat.data import Example, leading_bos
from dlqat.eval.perplexity import perplexity
from dlqat.methods import QuantMethod, QuantMethodConfig
from dlqat.methods.base import Phase
from dlqat.run_folder import CURVE_FILE
from dlqat.train_config import TrainConfig

log = logging.getLogger("dlqat.train")


@dataclass
class Run:
    """Everything a run in progress holds (one object instead of a long argument list)."""

    method_cfg: QuantMethodConfig
    cfg: TrainConfig
    method: QuantMethod
    accelerator: Accelerator
    settings: dict
    ckpt: dict | None
    model: torch.nn.Module | None = None
    tokenizer: object = None
    teacher: torch.nn.Module | None = None
    examples: list[Example] = field(default_factory=list)
    eval_ids: list[int] = field(default_factory=list)
    eval_source: str = ""
    curve_ids: dict[str, list[int]] = field(default_factory=dict)  # text name -> tokens (eval_at points)
    results: dict = field(default_factory=lambda: {"perplexity": {}})
    names: list[str] = field(default_factory=list)
    schedule: list[Phase] = field(default_factory=list)
    model_digest: str | None = None  # of the float weights (``--start_cache`` keys by it)

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def label(self) -> str:
        return self.method_cfg.name

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def evaluate(run: Run, label: str) -> None:
    """Perplexity of the model as it is now, once per label (a resumed run keeps its earlier rows); with
    ``curve_eval_data`` also on each of those texts (``results["perplexity_by_text"]``)."""
    if label in run.results["perplexity"] or not run.main:
        return
    res = _perplexity(run, run.model, run.eval_ids, Path(run.eval_source).name)
    run.results["perplexity"][label] = res.perplexity
    run.results["eval"] = res.describe()
    log.info("perplexity %-8s %.3f  (%s)", label, res.perplexity, res.describe())
    by_text = run.results.setdefault("perplexity_by_text", {}) if run.curve_ids else {}
    for name, ids in run.curve_ids.items():
        value = (
            res.perplexity if name == Path(run.eval_source).name else _perplexity(run, run.model, ids, name).perplexity
        )
        by_text.setdefault(name, {})[label] = value


def _perplexity(run: Run, model, ids: list[int], name: str):
    with run.accelerator.autocast():
        return perplexity(
            model, ids, run.cfg.eval_seq_len, run.cfg.eval_max_windows, name, progress=run.cfg.progress,
            bos_token_id=leading_bos(run.tokenizer),
        )  # fmt: skip


def curve_point(run: Run, model, step: int) -> None:
    """``eval_at``: perplexity of the model being trained (its forward = the export's) on every curve text."""
    if step not in run.cfg.curve_steps:
        return
    if run.main:
        model = run.accelerator.unwrap_model(model)
        rows = [
            {"step": step, "text": name, "perplexity": _perplexity(run, model, ids, name).perplexity}
            for name, ids in run.curve_ids.items()
        ]
        with open(run.out / CURVE_FILE, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        log.info("step %d: %s", step, ", ".join(f"{r['text']} {r['perplexity']:.3f}" for r in rows))
    run.accelerator.wait_for_everyone()
