"""The literal training loop on Accelerate: phases of optimizer steps, each over accumulated micro-batches,
with checkpoints. ``dlqat.train`` wraps it in the run's lifecycle (setup before, finish after)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from dlqat.data import Example, collate, micro_batch_indices
from dlqat.losses import Objective, shifted_targets
from dlqat.methods.base import Phase, set_trainable
from dlqat.run_folder import save_checkpoint
from dlqat.schedules import lr_factor
from dlqat.sharding import gather_parameters, load_optimizer_state, optimizer_layout, optimizer_state, release_engine
from dlqat.train_config import TrainConfig

_QUANT_KINDS = ("lora_a", "lora_b", "magnitude", "scale", "offset", "shift")


def quant_state(model: torch.nn.Module, schedule: list[Phase] = ()) -> dict[str, torch.Tensor]:
    """Every tensor a method trains (A, B, m, scale, offset, shift; full-weight QAT: the weights), whole, by
    name. A collective under FSDP: every rank calls it."""
    return gather_parameters(
        model, lambda n: n.rsplit(".", 1)[-1] in _QUANT_KINDS or any(phase.trains(n) for phase in schedule)
    )


def batches(examples: list[Example], cfg: TrainConfig, pad_id: int, start: int, accelerator: Accelerator) -> Iterator:
    """This process's micro-batches from micro-step ``start`` on (the order depends on seed and step only)."""
    indices = micro_batch_indices(
        len(examples), cfg.micro_batch_size, cfg.seed, start, accelerator.process_index, accelerator.num_processes
    )
    for idx in indices:
        yield {k: v.to(accelerator.device) for k, v in collate([examples[i] for i in idx], pad_id).items()}


class Checkpointer:
    """Writes ``checkpoint.pt`` (gathered on every rank, written by the main one) every ``save_every`` steps.
    It also carries the seconds the saved steps took, so a resumed or grown run reports the time per step of
    the whole run, not only of its last session (None: resumed from a checkpoint that did not record them)."""

    def __init__(
        self, accelerator: Accelerator, path: Path, schedule: list[Phase], results: dict, settings: dict,
        train_seconds: float | None = 0.0,
    ):  # fmt: skip
        self.accelerator, self.path, self.schedule = accelerator, path, schedule
        self.results, self.settings = results, settings
        self.train_seconds = train_seconds

    def add_step_time(self, seconds: float) -> None:
        if self.train_seconds is not None:
            self.train_seconds += seconds

    def save(self, model, optimizer, step: int, phase: Phase) -> None:
        self.accelerator.wait_for_everyone()
        model = self.accelerator.unwrap_model(model)
        state = {
            "step": step,
            "phase": phase.name,
            "quant_state": quant_state(model, self.schedule),
            "optimizer": optimizer_state(self.accelerator, model, optimizer),
            "optimizer_layout": optimizer_layout(self.accelerator),
            "results": self.results,
            "settings": self.settings,
            "train_seconds": self.train_seconds,
        }
        if self.accelerator.is_main_process:
            save_checkpoint(state, self.path)


def run_phases(
    accelerator: Accelerator,
    model: torch.nn.Module,
    schedule: list[Phase],
    step: int,
    data: Iterator[dict],
    objective: Objective,
    cfg: TrainConfig,
    checkpointer: Checkpointer,
    log_path: Path,
    resume_state: dict | None = None,
    after_step: Callable[[torch.nn.Module, int], None] | None = None,
) -> tuple[torch.nn.Module, list[float]]:
    """Train every phase from optimizer step ``step`` on; returns the (wrapped) model and step times.
    ``after_step(model, step)`` runs after each step's log line, before its checkpoint."""
    main = accelerator.is_main_process
    total = sum(p.steps for p in schedule)
    step_times: list[float] = []
    log_file = open(log_path, "a") if main else None  # noqa: SIM115 - kept open across phases
    phase_end = 0
    try:
        for phase in schedule:
            phase_start, phase_end = phase_end, phase_end + phase.steps
            if step >= phase_end:
                continue
            model, optimizer = start_phase(accelerator, model, phase, cfg)
            if resume_state and resume_state.get("phase") == phase.name:
                load_optimizer_state(accelerator, model, optimizer, resume_state["optimizer"])
            bar = tqdm(
                total=phase.steps, initial=step - phase_start, desc=phase.name, disable=not (main and cfg.progress)
            )
            while step < phase_end:
                t0 = time.perf_counter()
                lr = set_lr(
                    optimizer, phase, lr_factor(cfg.lr_schedule, step - phase_start, phase.steps, cfg.warmup_steps)
                )
                loss, n_tokens = optimizer_step(accelerator, model, optimizer, data, objective, cfg)
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"loss became {loss} at step {step + 1} ({phase.name}); the last good checkpoint is "
                        f"{checkpointer.path} (lower --lr/--quant_lr and --resume)"
                    )
                step += 1
                step_times.append(time.perf_counter() - t0)
                checkpointer.add_step_time(step_times[-1])
                tok_s = n_tokens / step_times[-1]
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:.0f}")
                if log_file:
                    record = {"step": step, "phase": phase.name, "loss": loss, "lr": lr, "tokens_per_s": tok_s}
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                if after_step is not None:
                    after_step(model, step)
                if step % cfg.save_every == 0 or step == total:
                    checkpointer.save(model, optimizer, step, phase)
            bar.close()
    finally:
        if log_file:
            log_file.close()
    return model, step_times


def start_phase(accelerator: Accelerator, model, phase: Phase, cfg: TrainConfig):
    """Freeze all but the phase's parameters and (re)wrap the model: DDP fixes its set of
    gradient-synchronised parameters when it wraps, a DeepSpeed engine its optimizer, so every phase
    wraps afresh (FSDP2 keeps its sharding and follows ``requires_grad``)."""
    model = accelerator.unwrap_model(model)
    release_engine(accelerator)
    selected = set_trainable(model, phase.trains)
    if not selected:
        raise ValueError(f"{phase.name}: no parameter to train")
    optimizer = torch.optim.AdamW(phase.param_groups(model, cfg.weight_decay), lr=phase.lr)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]  # what a schedule scales (torch's schedulers use the same key)
    model.train()
    return accelerator.prepare(model, optimizer)


def set_lr(optimizer, phase: Phase, factor: float) -> float:
    """Scale every group's starting lr by ``factor``; returns the phase's main lr as set (for the log)."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return phase.lr * factor


def optimizer_step(accelerator: Accelerator, model, optimizer, data, objective: Objective, cfg: TrainConfig):
    """One optimizer step over ``grad_accum`` micro-batches; returns (mean loss per token, tokens seen).

    The loss is normalised by the predicted tokens of the whole accumulated batch on all processes:
    each micro-batch's token sum is scaled by ``processes * grad_accum / tokens`` because Accelerate
    divides by ``grad_accum`` and DDP/ZeRO average over processes.
    """
    micro = [next(data) for _ in range(cfg.grad_accum)]
    local = sum(shifted_targets(b["labels"])[1].sum() for b in micro)
    counted = accelerator.reduce(local.to(accelerator.device), "sum").item()
    norm = accelerator.num_processes * cfg.grad_accum / max(counted, 1)
    loss_sum = torch.zeros((), device=accelerator.device)
    for batch in micro:
        with accelerator.accumulate(model):
            with accelerator.autocast():  # Accelerate autocasts DDP's forward itself, not FSDP2's
                summed = objective(model, batch)
            accelerator.backward(summed * norm)
            if accelerator.sync_gradients and cfg.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        loss_sum += summed.detach().float()
    n_tokens = sum(int(b["attention_mask"].sum()) for b in micro) * accelerator.num_processes
    return accelerator.reduce(loss_sum, "sum").item() / max(counted, 1), n_tokens
