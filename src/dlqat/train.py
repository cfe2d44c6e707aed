"""One explicit training loop on Accelerate (so ``accelerate launch`` runs it on many processes).

Lifecycle: load -> evaluate float -> prepare (quantized layers; for most methods the untrained model
*is* RTN: evaluated as such) -> train the method's phases -> finalize (post-training steps) ->
convert to codes -> save -> evaluate the saved model.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_file
from tqdm.auto import tqdm

from dlqat import resources
from dlqat.act_quant import install_act_quant
from dlqat.data import collate, load_examples, micro_batch_indices, read_text, tokenize_text
from dlqat.eval.perplexity import perplexity
from dlqat.losses import LOSSES, FinalHidden, float_teacher, logit_softcap, shifted_targets, token_losses
from dlqat.export import convert, save_quantized
from dlqat.fileio import atomic_write, atomic_write_json, atomic_write_text
from dlqat.methods import QuantMethodConfig, method_module, method_name
from dlqat.methods.base import Phase, count_parameters, set_trainable
from dlqat.models import load_model, source_gguf
from dlqat.quant.lean_linear import set_compile
from dlqat.run_folder import (
    CHECKPOINT,
    CONFIG_FILE,
    LOG_FILE,
    check_same_run,
    discard_run,
    load_checkpoint,
    prepare_run_folder,
    run_settings,
    save_checkpoint,
    truncate_log,
)
from dlqat.sharding import (
    gather_parameters,
    is_fsdp,
    load_optimizer_state,
    make_accelerator,
    optimizer_layout,
    optimizer_state,
    release_engine,
)

log = logging.getLogger(__name__)

# Used when no model and no data are given (the embedded demo): finishes in minutes on 2 CPU cores.
DEMO_DEFAULTS = {
    "phase1_steps": 10,
    "phase2_steps": 30,
    "steps": 40,
    "seq_len": 256,
    "grad_accum": 4,
    "eval_max_windows": 8,
    "eval_seq_len": 512,
}
PAPER_DEFAULTS = {
    "phase1_steps": 1000,
    "phase2_steps": 1000,
    "steps": 2000,
    "seq_len": 1024,
    "grad_accum": 16,
    "eval_max_windows": None,
    "eval_seq_len": 2048,
}


@dataclass
class TrainConfig:
    """Run settings shared by every method."""

    model: str | None = field(
        default=None, metadata={"help": "hub id, local HF folder, or .gguf file; default: the embedded SmolLM2-135M"}
    )
    data: str | None = field(
        default=None,
        metadata={
            "help": "training data: Alpaca .json/.jsonl, text "
            "(.txt/.utf8/.md) or a hub dataset; default: embedded C4 text"
        },
    )
    eval_data: str | None = field(
        default=None, metadata={"help": "held-out text file for perplexity; default: embedded Wikipedia text"}
    )
    output_dir: str = field(default="runs/dlqat", metadata={"help": "run folder (config, checkpoints, model, results)"})
    seq_len: int | None = field(default=None, metadata={"help": "training tokens per example; default 1024 (256 demo)"})
    micro_batch_size: int = field(default=1, metadata={"help": "examples per forward pass per process"})
    grad_accum: int | None = field(
        default=None,
        metadata={"help": "micro-batches per optimizer step; default 16 (effective batch 16; 4 in the demo)"},
    )
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay of adapters/weights (never of magnitude, scale, offset)"}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 = off)"})
    seed: int = field(default=42, metadata={"help": "seed for init and data order"})
    train_on_prompt: bool = field(default=False, metadata={"help": "instruction data: also train on prompt tokens"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N optimizer steps"})
    resume: bool = field(
        default=False, metadata={"help": "continue the run in output_dir from its checkpoint.pt (same settings)"}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "replace the run in output_dir (its artefacts only; other files stay)"}
    )
    eval_seq_len: int | None = field(default=None, metadata={"help": "perplexity window; default 2048 (512 demo)"})
    eval_max_windows: int | None = field(
        default=None, metadata={"help": "cap on perplexity windows; default all (8 in the demo)"}
    )
    mixed_precision: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), no, bf16, fp16"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute decoder layers in backward"})
    compile: bool = field(
        default=False,
        metadata={"help": "torch.compile the quantized layers' backward elementwise work (one-off compile cost)"},
    )
    act_bits: int | None = field(
        default=None,
        metadata={"help": "fake-quantize the inputs of quantized linears per token at these bits (W4A8KV8: 8)"},
    )
    kv_bits: int | None = field(default=None, metadata={"help": "fake-quantize k/v projections per token (KV8: 8)"})
    loss: str = field(
        default="ce",
        metadata={
            "help": "ce (next-token cross-entropy), kd (KL to the float model: the same weights with quantizers "
            "and adapters off, or --teacher), kd+ce (their sum)"
        },
    )
    kd_temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the kd loss"})
    teacher: str | None = field(
        default=None,
        metadata={"help": "kd: a separate teacher model (same tokenizer); default: the float model being quantized"},
    )
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        for name in ("seq_len", "grad_accum", "eval_seq_len", "eval_max_windows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        for name in ("micro_batch_size", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a positive integer")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision={self.mixed_precision!r}: expected auto, no, bf16 or fp16")
        for name in ("act_bits", "kv_bits"):
            value = getattr(self, name)
            if value is not None and not 2 <= value <= 8:
                raise ValueError(f"{name}={value!r}: expected 2..8 bits or unset (per-token codes are int8 at most)")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}: expected one of {', '.join(LOSSES)}")
        if not self.kd_temperature > 0:
            raise ValueError(f"kd_temperature={self.kd_temperature!r}: expected a positive number")
        if self.teacher is not None and self.loss == "ce":
            raise ValueError(f"teacher={self.teacher!r} needs --loss kd or kd+ce (loss=ce uses no teacher)")
        if self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ValueError("max_grad_norm and weight_decay must be >= 0")

    @property
    def is_demo(self) -> bool:
        return self.model is None and self.data is None


def resolve_defaults(method_cfg: QuantMethodConfig, cfg: TrainConfig) -> None:
    """Fill the ``None`` (auto) settings: the paper's values, or the short demo's."""
    defaults = DEMO_DEFAULTS if cfg.is_demo else PAPER_DEFAULTS
    if getattr(method_cfg, "clip_mode", None) in ("dynamic", "joint") and method_cfg.phase1_steps is None:
        # no range-only phase: the whole budget goes to the one phase (equal steps across the ablation grid)
        method_cfg.phase1_steps = 0
        if method_cfg.phase2_steps is None:
            method_cfg.phase2_steps = defaults["phase1_steps"] + defaults["phase2_steps"]
    for target in (method_cfg, cfg):
        for name, value in defaults.items():
            if hasattr(target, name) and getattr(target, name) is None:
                setattr(target, name, value)


_QUANT_KINDS = ("lora_a", "lora_b", "magnitude", "scale", "offset")


def _quant_state(model: torch.nn.Module, schedule: list[Phase] = ()) -> dict[str, torch.Tensor]:
    """Every tensor a method trains (A, B, m, scale, offset; full-weight QAT: the weights), whole, by
    name. A collective under FSDP: every rank calls it."""
    return gather_parameters(
        model, lambda n: n.rsplit(".", 1)[-1] in _QUANT_KINDS or any(phase.trains(n) for phase in schedule)
    )


def _batches(examples, cfg: TrainConfig, pad_id: int, start: int, accelerator: Accelerator) -> Iterator[dict]:
    indices = micro_batch_indices(
        len(examples), cfg.micro_batch_size, cfg.seed, start, accelerator.process_index, accelerator.num_processes
    )
    for idx in indices:
        yield {k: v.to(accelerator.device) for k, v in collate([examples[i] for i in idx], pad_id).items()}


def train(method_cfg: QuantMethodConfig, cfg: TrainConfig) -> dict:
    """Run a method end to end; returns (and writes) the results."""
    resolve_defaults(method_cfg, cfg)
    method = method_module(method_cfg)
    label = method_name(method_cfg)
    out = Path(cfg.output_dir)
    ckpt_path = out / CHECKPOINT
    prepare_run_folder(out, cfg.resume, cfg.overwrite)
    settings = run_settings(label, method_cfg.to_dict(), asdict(cfg))
    ckpt = load_checkpoint(ckpt_path) if cfg.resume else None
    if ckpt:
        check_same_run(ckpt.get("settings"), settings, ckpt_path)
    mixed = cfg.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() else "no"
    if mixed == "fp16" and not torch.cuda.is_available():
        raise ValueError("mixed_precision='fp16': fp16 autocast needs a CUDA GPU (none found); use bf16 or no")
    accelerator = make_accelerator(cfg.grad_accum, mixed, cfg.micro_batch_size, cfg.max_grad_norm)
    main = accelerator.is_main_process
    set_seed(cfg.seed)

    model, tokenizer = load_model(cfg.model)  # fp32 master weights; bf16 comes from autocast
    model.to(accelerator.device)
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    set_compile(cfg.compile)
    if cfg.loss != "ce" and cfg.teacher is None and label in ("qa_lora", "full_qat"):
        raise ValueError(
            f"loss={cfg.loss!r} with method {label}: the model keeps no frozen float weight to teach with "
            "(QA-LoRA replaces it by codes, full-weight QAT trains it); give a separate --teacher or use --loss ce"
        )
    teacher = _load_teacher(cfg.teacher, tokenizer, accelerator.device) if cfg.teacher else None
    train_source = cfg.data or str(resources.default_train_text())
    eval_source = cfg.eval_data or str(resources.default_eval_text())
    examples = load_examples(train_source, tokenizer, cfg.seq_len, cfg.train_on_prompt)
    eval_ids = tokenize_text(read_text(eval_source), tokenizer)
    if len(eval_ids) < cfg.eval_seq_len:
        raise ValueError(
            f"eval_data={eval_source!r}: {len(eval_ids)} tokens, fewer than one perplexity window of "
            f"--eval_seq_len={cfg.eval_seq_len}; lower --eval_seq_len or give a longer file"
        )
    log.info(
        "train data %s: %d examples; eval text %s: %d tokens", train_source, len(examples), eval_source, len(eval_ids)
    )

    if ckpt and ckpt["optimizer_layout"] != optimizer_layout(accelerator):
        raise ValueError(
            f"{ckpt_path}: optimizer state laid out as {ckpt['optimizer_layout']!r} (written by a run on another "
            f"engine); this run needs {optimizer_layout(accelerator)!r}: resume on the engine that wrote it"
        )
    results = ckpt["results"] if ckpt else {"perplexity": {}}
    if main:  # the run is known to start: only now touch the folder
        if cfg.overwrite:
            discard_run(out)
        atomic_write_json(out / CONFIG_FILE, settings)
        if ckpt:
            truncate_log(out / LOG_FILE, ckpt["step"])
    accelerator.wait_for_everyone()

    def evaluate(label: str) -> None:
        if label in results["perplexity"] or not main:
            return
        with accelerator.autocast():
            res = perplexity(
                model, eval_ids, cfg.eval_seq_len, cfg.eval_max_windows, Path(eval_source).name, progress=cfg.progress
            )
        results["perplexity"][label] = res.perplexity
        results["eval"] = res.describe()
        log.info("perplexity %-8s %.3f  (%s)", label, res.perplexity, res.describe())

    evaluate("float")
    base_params = count_parameters(model)[1]
    names = method.prepare(model, method_cfg)
    act_hooks = install_act_quant(model, cfg.act_bits, cfg.kv_bits)
    if method.STARTS_AT_RTN:  # e.g. DL-QAT: B = 0, m = 1, min/max scale/offset is exactly round-to-nearest
        evaluate("rtn" if getattr(method_cfg, "init", "minmax") == "minmax" else f"rtn-{method_cfg.init}")
    accelerator.wait_for_everyone()
    if ckpt:
        _, unexpected = model.load_state_dict(ckpt["quant_state"], strict=False)
        if unexpected:
            raise ValueError(
                f"{ckpt_path}: checkpoint holds tensors this model does not have: {unexpected[:4]}; "
                "was it written with other --target_modules/--clip_mode settings?"
            )

    schedule = method.phases(method_cfg, names)
    trainable = {p.name: sum(t.numel() for n, t in model.named_parameters() if p.trains(n)) for p in schedule}
    results.update(trainable_params=trainable, base_params=base_params, quantized_layers=len(names))
    log.info("quantized %d linear layers of a %s-parameter model", len(names), f"{base_params:,}")
    for name, count in trainable.items():
        log.info("%s trains %s parameters (%.2f%% of the model)", name, f"{count:,}", 100 * count / base_params)

    step = ckpt["step"] if ckpt else 0
    total_steps = sum(p.steps for p in schedule)
    batches = _batches(examples, cfg, tokenizer.pad_token_id, step * cfg.grad_accum, accelerator)
    objective = Objective(accelerator.unwrap_model(model), cfg.loss, cfg.kd_temperature, teacher)
    log_file = open(out / LOG_FILE, "a") if main else None
    step_times = []
    phase_end = 0
    for phase in schedule:
        phase_start, phase_end = phase_end, phase_end + phase.steps
        if step >= phase_end:
            continue
        model, optimizer = _start_phase(accelerator, model, phase, cfg)
        if ckpt and ckpt.get("phase") == phase.name:
            load_optimizer_state(accelerator, model, optimizer, ckpt["optimizer"])
        bar = tqdm(total=phase.steps, initial=step - phase_start, desc=phase.name, disable=not (main and cfg.progress))
        while step < phase_end:
            t0 = time.perf_counter()
            loss_sum, n_tokens = _optimizer_step(accelerator, model, optimizer, batches, objective, cfg)
            if not math.isfinite(loss_sum):
                raise FloatingPointError(
                    f"loss became {loss_sum} at step {step + 1} ({phase.name}); "
                    f"the last good checkpoint is {ckpt_path} (lower --lr/--quant-lr and --resume)"
                )
            step += 1
            step_times.append(time.perf_counter() - t0)
            tok_s = n_tokens / step_times[-1]
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{tok_s:.0f}")
            if log_file:
                log_file.write(
                    json.dumps(
                        {"step": step, "phase": phase.name, "loss": loss_sum, "lr": phase.lr, "tokens_per_s": tok_s}
                    )
                    + "\n"
                )
                log_file.flush()
            if step % cfg.save_every == 0 or step == total_steps:
                _save_checkpoint(accelerator, model, optimizer, step, phase, results, ckpt_path, schedule, settings)
        bar.close()
    if log_file:
        log_file.close()
    objective.remove()

    model = accelerator.unwrap_model(model)
    trained = _quant_state(model, schedule)
    if is_fsdp(accelerator):  # the main process finishes alone: on a whole copy, not on a shard
        model = _rebuild(cfg, method, method_cfg, trained, accelerator.device) if main else None
        act_hooks = install_act_quant(model, cfg.act_bits, cfg.kv_bits) if main else []
    if main:
        model.eval()
        atomic_write(out / "quant_state.safetensors", lambda tmp: save_file(_contiguous(trained), tmp))
        if hasattr(method, "finalize"):
            calibration = [collate([e], tokenizer.pad_token_id)["input_ids"].to(accelerator.device) for e in examples]
            with torch.no_grad():
                method.finalize(model, method_cfg, names, calibration)
        layers = convert(model)
        for hook in act_hooks:  # the converted layers are new modules: hook them again
            hook.remove()
        install_act_quant(model, cfg.act_bits, cfg.kv_bits)
        save_quantized(model, tokenizer, out / "quantized", layers, source_gguf=source_gguf(cfg.model), overwrite=True)
        evaluate(label)
        results["settings"] = {
            "method": label,
            "n_bits": method_cfg.n_bits,
            "group_size": method_cfg.group_size,
            "act_bits": cfg.act_bits,
            "kv_bits": cfg.kv_bits,
            "rank": getattr(method_cfg, "rank", None),
            "steps": total_steps,
        }
        results["seconds_per_step"] = sum(step_times) / len(step_times) if step_times else None
        results["peak_memory_mb"] = _peak_memory_mb()
        write_results(results, out)
    accelerator.wait_for_everyone()
    return results


class Objective:
    """The loss of one micro-batch, *summed* over its predicted tokens (the loop divides by the
    accumulated batch's token count): next-token CE, or KL to a teacher (``kd``, ``kd+ce``).

    With ``kd`` the model is called for the last position's logits only; the decoder's final hidden
    states go to ``dlqat.losses.token_losses``, which runs the output head in token chunks. Without a
    separate ``teacher`` the teacher is the model itself under ``float_teacher`` (quantizers and
    adapters off: the float model, at the cost of one no-grad forward and no extra weights).
    """

    def __init__(self, model: torch.nn.Module, loss: str, temperature: float, teacher=None) -> None:
        self.loss, self.temperature, self.model, self.teacher = loss, temperature, model, teacher
        self.hooks: list[FinalHidden] = []
        if loss != "ce":
            self.student = FinalHidden(model)
            self.teacher_hidden = FinalHidden(teacher) if teacher is not None else self.student
            self.hooks = list({id(h): h for h in (self.student, self.teacher_hidden)}.values())

    def __call__(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        if self.loss == "ce":
            return model(**batch).loss * shifted_targets(batch["labels"])[1].sum()
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "logits_to_keep": 1}
        with torch.no_grad():
            if self.teacher is None:
                with float_teacher(self.model):
                    model(**inputs)
            else:
                self.teacher(**inputs)
            teacher_hidden = self.teacher_hidden.take()
        out = model(**inputs)
        separate = self.teacher is not None
        kl, ce, _ = token_losses(
            self.student.take(), teacher_hidden, batch["labels"], self.model.get_output_embeddings(),
            self.temperature, want_ce=self.loss == "kd+ce", softcap=logit_softcap(self.model),
            teacher_head=self.teacher.get_output_embeddings() if separate else None,
            teacher_softcap=logit_softcap(self.teacher) if separate else None,
        )  # fmt: skip
        return kl + ce + 0.0 * out.logits.sum()  # the head's output stays in the graph (wrappers' hooks)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def _load_teacher(spec: str, tokenizer, device) -> torch.nn.Module:
    """A separate distillation teacher; it must predict the same vocabulary with the same tokenizer."""
    teacher, teacher_tokenizer = load_model(spec)
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"teacher={spec!r}: its tokenizer differs from the model's; kd needs the same vocabulary")
    return teacher.to(device).requires_grad_(False)


def _optimizer_step(accelerator: Accelerator, model, optimizer, batches, objective: Objective, cfg: TrainConfig):
    """One optimizer step over ``grad_accum`` micro-batches; returns (mean loss per token, tokens seen).

    The loss is normalised by the predicted tokens of the whole accumulated batch on all processes:
    each micro-batch's token sum is scaled by ``processes * grad_accum / tokens`` because Accelerate
    divides by ``grad_accum`` and DDP/ZeRO average over processes.
    """
    micro = [next(batches) for _ in range(cfg.grad_accum)]
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


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in tensors.items()}


def _peak_memory_mb() -> float:
    """Peak GPU memory allocated (CUDA) or the process's peak resident memory (CPU)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rebuild(cfg: TrainConfig, method, method_cfg: QuantMethodConfig, trained: dict, device) -> torch.nn.Module:
    """A whole (unsharded) copy of the trained model: the base model, the method's layers, the trained tensors."""
    model, _ = load_model(cfg.model)
    model.to(device)
    method.prepare(model, method_cfg)
    missing = set(trained) - set(model.state_dict())
    if missing:
        raise RuntimeError(f"rebuilding the trained model: no place for {sorted(missing)[:4]}")
    model.load_state_dict({k: v.to(device) for k, v in trained.items()}, strict=False)
    return model


def _start_phase(accelerator: Accelerator, model, phase: Phase, cfg: TrainConfig):
    """Freeze all but the phase's parameters and (re)wrap the model: DDP fixes its set of
    gradient-synchronised parameters when it wraps, a DeepSpeed engine its optimizer, so every phase
    wraps afresh (FSDP2 keeps its sharding and follows ``requires_grad``)."""
    model = accelerator.unwrap_model(model)
    release_engine(accelerator)
    selected = set_trainable(model, phase.trains)
    if not selected:
        raise ValueError(f"{phase.name}: no parameter to train")
    optimizer = torch.optim.AdamW(phase.param_groups(model, cfg.weight_decay), lr=phase.lr)
    model.train()
    return accelerator.prepare(model, optimizer)


def _save_checkpoint(accelerator, model, optimizer, step, phase, results, path: Path, schedule, settings) -> None:
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(model)
    state = {  # gathered on every rank (collectives under FSDP), written by the main one
        "step": step,
        "phase": phase.name,
        "quant_state": _quant_state(model, schedule),
        "optimizer": optimizer_state(accelerator, model, optimizer),
        "optimizer_layout": optimizer_layout(accelerator),
        "results": results,
        "settings": settings,
    }
    if accelerator.is_main_process:
        save_checkpoint(state, path)


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
        "| model | perplexity |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.3f} |" for k, v in results["perplexity"].items()]
    base = results["base_params"]
    lines += ["", f"trainable parameters (of {base:,}):"]
    lines += [f"- {name}: {count:,} ({100 * count / base:.2f}%)" for name, count in results["trainable_params"].items()]
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
