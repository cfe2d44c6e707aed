"""A run's lifecycle, on Accelerate (so ``accelerate launch`` runs it on many processes).

setup (run folder, model, data; evaluate float; prepare: for most methods the untrained model *is* a
named PTQ result, evaluated as such) -> run the method's phases (``dlqat.loop``) -> finish (finalize,
convert to codes, save, evaluate the saved model). ``fit`` is the Python entry point; ``dlqat train``
calls ``train``, which is ``fit`` on the model and data its config names.
"""

from __future__ import annotations

import copy
import logging
import resource
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_file

from dlqat import resources
from dlqat.data import Example, collate, examples_fingerprint, load_examples, read_text, tokenize_text
from dlqat.eval.report import write_results
from dlqat.export import convert, save_quantized
from dlqat.fileio import atomic_write, atomic_write_json
from dlqat.layers import set_act_quant
from dlqat.layers.weight_quantizer import GPTQ_INITS, minmax_ranges
from dlqat.loop import Checkpointer, batches, quant_state, run_phases
from dlqat.losses import Objective
from dlqat.methods import QuantMethodConfig, count_parameters, handler
from dlqat.models import load_model, source_gguf
from dlqat.quant.lean_linear import set_compile
from dlqat.run_folder import (
    CHECKPOINT,
    CONFIG_FILE,
    CURVE_FILE,
    LOG_FILE,
    check_same_data,
    check_same_run,
    discard_run,
    load_checkpoint,
    prepare_run_folder,
    run_schedule,
    run_settings,
    truncate_log,
)
from dlqat.run_state import Run, curve_point, evaluate
from dlqat.sharding import is_fsdp, make_accelerator, optimizer_layout
from dlqat.start_cache import cache_path, load_start, model_digest, save_start, start_key
from dlqat.train_config import TrainConfig, resolve_defaults

log = logging.getLogger(__name__)


def train(method_cfg: QuantMethodConfig, cfg: TrainConfig) -> dict:
    """``dlqat train``: ``fit`` on the model (``cfg.model``) and data (``cfg.data``) the config names."""
    return fit(None, None, method_cfg, cfg)


def fit(
    model: torch.nn.Module | None,
    tokenizer,
    method_cfg: QuantMethodConfig,
    cfg: TrainConfig,
    data: str | list[Example] | None = None,
) -> dict:
    """Quantization-aware fine-tuning of ``model`` by the method ``method_cfg`` names, end to end.

    Args:
        model, tokenizer: a float causal LM (fp32 master weights) and its tokenizer; ``None``: load
            ``cfg.model`` (needed under FSDP2, where the finished model is rebuilt from it).
        data: a data file / hub dataset name, or ready token examples (``{"input_ids", "labels"}``);
            default ``cfg.data``.

    Returns:
        The results (perplexities, trainable parameters, ...), also written to ``cfg.output_dir``
        with ``checkpoint.pt``, ``train_log.jsonl``, ``quant_state.safetensors`` and ``quantized/``.
    """
    run = _setup(method_cfg, cfg, model, tokenizer, data)
    model, seconds_per_step = _train_phases(run)
    return _finish(run, model, seconds_per_step)


def _setup(method_cfg, cfg, model, tokenizer, data) -> Run:
    """Check the run folder and checkpoint first (nothing is loaded or written for a refused run), then
    load, then write ``run_config.json``, then evaluate float and prepare the method's layers."""
    if cfg.curve_steps and not handler(method_cfg).trains_final_forward(method_cfg):
        raise ValueError(
            f"eval_at={cfg.eval_at!r} with method {method_cfg.name!r}: the model it trains is quantized only "
            "after training, so a mid-run point would not be the low-bit model; train one run per budget "
            "(`dlqat compare --steps 40,120` does that for this method)"
        )
    out = Path(cfg.output_dir)
    prepare_run_folder(out, cfg.resume, cfg.overwrite)
    ckpt = load_checkpoint(out / CHECKPOINT) if cfg.resume else None
    given_schedule = cfg.lr_schedule
    method_cfg, cfg = resolve_defaults(method_cfg, cfg, run_schedule(ckpt.get("settings") if ckpt else None))
    if given_schedule == "auto":
        log.info("lr schedule: %s (--lr_schedule auto%s)", cfg.lr_schedule, ", the resumed run's" if ckpt else "")
    settings = run_settings(method_cfg, cfg)
    if ckpt:
        check_same_run(ckpt.get("settings"), settings, out / CHECKPOINT)
    run = Run(method_cfg, cfg, handler(method_cfg), _accelerator(cfg), settings, ckpt)
    set_seed(cfg.seed)
    _load_inputs(run, model, tokenizer, data)
    settings["data_fingerprint"] = examples_fingerprint(run.examples)
    if ckpt:
        check_same_data(ckpt["settings"].get("data_fingerprint"), settings["data_fingerprint"], out / CHECKPOINT)
    if ckpt and ckpt["optimizer_layout"] != optimizer_layout(run.accelerator):
        raise ValueError(
            f"{out / CHECKPOINT}: optimizer state laid out as {ckpt['optimizer_layout']!r} (written by a run on "
            f"another engine); this run needs {optimizer_layout(run.accelerator)!r}: resume on the engine that wrote it"
        )
    if ckpt:
        run.results = ckpt["results"]
    if run.main:  # the run is known to start: only now touch the folder
        if cfg.overwrite:
            discard_run(out)
        atomic_write_json(out / CONFIG_FILE, settings)
        if ckpt:
            truncate_log(out / LOG_FILE, ckpt["step"])
            truncate_log(out / CURVE_FILE, ckpt["step"])
    run.accelerator.wait_for_everyone()
    _prepare(run)
    return run


def _accelerator(cfg: TrainConfig) -> Accelerator:
    mixed = cfg.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() else "no"
    if mixed == "fp16" and not torch.cuda.is_available():
        raise ValueError("mixed_precision='fp16': fp16 autocast needs a CUDA GPU (none found); use bf16 or no")
    return make_accelerator(cfg.grad_accum, mixed, cfg.micro_batch_size, cfg.max_grad_norm)


def _load_inputs(run: Run, model, tokenizer, data) -> None:
    """Model (and teacher), training examples and evaluation tokens, each checked with a clear error."""
    cfg = run.cfg
    copy_teacher = cfg.loss != "ce" and cfg.teacher is None and not run.method.float_teacher(run.method_cfg)
    if model is not None and is_fsdp(run.accelerator):
        raise ValueError(
            "FSDP2 rebuilds the finished model from its source: pass the model as cfg.model, not an object"
        )
    if model is None:
        model, tokenizer = load_model(cfg.model)  # fp32 master weights; bf16 comes from autocast
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    run.model, run.tokenizer = model.to(run.accelerator.device), tokenizer
    if copy_teacher:
        autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.accelerator.mixed_precision)
        run.teacher = _float_copy(model, f"loss={cfg.loss!r} with method {run.label}", autocast)
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    set_compile(cfg.compile)
    if cfg.teacher:
        run.teacher = _load_teacher(cfg.teacher, tokenizer, run.accelerator.device)
    if data is None:
        data = cfg.data or str(resources.default_train_text())
    run.examples = data if isinstance(data, list) else load_examples(data, tokenizer, cfg.seq_len, cfg.train_on_prompt)
    run.eval_source = cfg.eval_data or str(resources.default_eval_text())
    run.eval_ids = tokenize_text(read_text(run.eval_source), tokenizer)
    if len(run.eval_ids) < cfg.eval_seq_len:
        raise ValueError(
            f"eval_data={run.eval_source!r}: {len(run.eval_ids)} tokens, fewer than one perplexity window of "
            f"--eval_seq_len={cfg.eval_seq_len}; lower --eval_seq_len or give a longer file"
        )
    log.info("train data: %d examples; eval text %s: %d tokens", len(run.examples), run.eval_source, len(run.eval_ids))
    if cfg.curve_steps or cfg.curve_texts:
        if is_fsdp(run.accelerator):
            raise ValueError("eval_at/curve_eval_data: not under FSDP2 (evaluate the finished run with `dlqat eval`)")
        run.curve_ids = {Path(run.eval_source).name: run.eval_ids}
        run.curve_ids.update({Path(t).name: tokenize_text(read_text(t), tokenizer) for t in cfg.curve_texts})


def _float_copy(model: torch.nn.Module, why: str, autocast: torch.dtype | None = None) -> torch.nn.Module:
    """The teacher for a method that keeps no frozen float weight (QA-LoRA replaces it by codes, full-weight
    QAT trains it, a GPTQ start replaces it by GPTQ's): a frozen copy of the model before surgery.

    Under ``autocast`` every linear layer casts its fp32 weight to that dtype on each call, so the copy
    holds its linear weights in it already: the same products bit for bit at half the memory. The output
    head (the loss runs it outside the model, and often shares it with the embedding) and any weight a
    linear layer shares with another module keep their dtype."""
    teacher = copy.deepcopy(model).requires_grad_(False)
    if autocast is not None:
        head = teacher.get_output_embeddings()
        uses = Counter(id(p) for m in teacher.modules() for p in m.parameters(recurse=False))
        for module in teacher.modules():
            if type(module) is torch.nn.Linear and module is not head:
                for param in module.parameters(recurse=False):
                    if uses[id(param)] == 1:
                        param.data = param.data.to(autocast)
    mib = sum(t.numel() * t.element_size() for t in (*teacher.parameters(), *teacher.buffers())) / 2**20
    log.info("%s: the float weights are not kept, so a frozen copy of the model (%.0f MiB) is the teacher; "
             "--teacher MODEL picks another, --loss ce needs none", why, mib)  # fmt: skip
    return teacher


def _load_teacher(spec: str, tokenizer, device) -> torch.nn.Module:
    """A separate distillation teacher; it must predict the same vocabulary with the same tokenizer."""
    teacher, teacher_tokenizer = load_model(spec)
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"teacher={spec!r}: its tokenizer differs from the model's; kd needs the same vocabulary")
    return teacher.to(device).requires_grad_(False)


def _prepare(run: Run) -> None:
    """Evaluate float, swap in the method's layers, evaluate the untrained start, restore a checkpoint."""
    evaluate(run, "float")
    base_params = count_parameters(run.model)[1]
    if run.cfg.start_cache:  # before surgery: the weights the calibration starts from
        run.model_digest = model_digest(run.model)
    run.names = run.method.prepare(run.model, run.method_cfg)
    set_act_quant(run.model, run.cfg.act_bits, run.cfg.kv_bits)
    start = run.method.starts_at(run.method_cfg)
    # a searched or GPTQ start also reports the plain RTN row
    if start in ("rtn-mse", "gptq", "gptq-mse") and "rtn" not in run.results["perplexity"]:
        with minmax_ranges(run.model):
            evaluate(run, "rtn")
    _calibrate(run, run.model)
    if start:  # e.g. DL-QAT: B = 0, m = 1, min/max scale/offset is exactly round-to-nearest
        evaluate(run, start)
    run.accelerator.wait_for_everyone()
    if run.ckpt:
        _, unexpected = run.model.load_state_dict(run.ckpt["quant_state"], strict=False)
        if unexpected:
            raise ValueError(
                f"{run.out / CHECKPOINT}: checkpoint holds tensors this model does not have: {unexpected[:4]}"
            )
    run.schedule = run.method.phases(run.method_cfg, run.names)
    trainable = {p.name: sum(t.numel() for n, t in run.model.named_parameters() if p.trains(n)) for p in run.schedule}
    run.results.update(trainable_params=trainable, base_params=base_params, quantized_layers=len(run.names))
    log.info("quantized %d linear layers of a %s-parameter model", len(run.names), f"{base_params:,}")
    for name, count in trainable.items():
        log.info("%s trains %s parameters (%.2f%% of the model)", name, f"{count:,}", 100 * count / base_params)


def _calibrate(run: Run, model: torch.nn.Module) -> None:
    """The method's data-dependent start (e.g. GPTQ); with ``--start_cache``, loaded from the cache where
    an earlier run of the same model, data and quantizer saved it, else calibrated and saved there."""
    method, cfg = run.method, run.method_cfg
    expected = method.calibrated_state(model, cfg, run.names) if run.cfg.start_cache else {}
    if not expected:
        method.calibrate(model, cfg, run.names, _Calibration(run))
        return
    fields = {
        "model": run.model_digest, "data": run.settings["data_fingerprint"], "start": method.starts_at(cfg),
        "layer": type(model.get_submodule(run.names[0])).__name__, "layers": run.names, "n_bits": cfg.n_bits,
        "group_size": cfg.group_size, "zero_point": getattr(cfg, "zero_point", None),
        "qparam_dtype": getattr(cfg, "qparam_dtype", None), "device": run.accelerator.device.type,
        "mixed_precision": str(run.accelerator.mixed_precision), "torch": torch.__version__,
        "act_bits": run.cfg.act_bits, "kv_bits": run.cfg.kv_bits,  # the calibration forward quantizes with them
    }  # fmt: skip
    key = start_key(fields)
    path = cache_path(run.cfg.start_cache, key)
    state = load_start(path, key, expected)
    if state is not None:
        method.load_calibrated(model, cfg, run.names, state)
        log.info("%s start: loaded from %s (no calibration)", fields["start"], path)
        return
    method.calibrate(model, cfg, run.names, _Calibration(run))
    if run.main:
        save_start(path, key, fields, method.calibrated_state(model, cfg, run.names))
        log.info(
            "%s start: saved to %s (a later run of this model, data and quantizer loads it)", fields["start"], path
        )


def _train_phases(run: Run) -> tuple[torch.nn.Module, float | None]:
    """Train; the (wrapped) model and the mean seconds per optimizer step over the whole run (a resumed run's
    earlier sessions included where its checkpoint recorded them, else this session's steps)."""
    step = run.ckpt["step"] if run.ckpt else 0
    data = batches(run.examples, run.cfg, run.tokenizer.pad_token_id, step * run.cfg.grad_accum, run.accelerator)
    objective = Objective(run.model, run.cfg.loss, run.cfg.kd_temperature, run.teacher)
    checkpointer = Checkpointer(run.accelerator, run.out / CHECKPOINT, run.schedule, run.results, run.settings,
                                run.ckpt.get("train_seconds") if run.ckpt else 0.0)  # fmt: skip
    try:
        model, step_times = run_phases(run.accelerator, run.model, run.schedule, step, data, objective, run.cfg,
                                       checkpointer, run.out / LOG_FILE, run.ckpt,
                                       lambda model, step: curve_point(run, model, step))  # fmt: skip
    finally:
        objective.remove()
    steps = sum(p.steps for p in run.schedule)
    if checkpointer.train_seconds is not None and steps:
        return model, checkpointer.train_seconds / steps
    return model, sum(step_times) / len(step_times) if step_times else None


def _finish(run: Run, model: torch.nn.Module, seconds_per_step: float | None) -> dict:
    """Finalize, convert to codes, save and evaluate the low-bit model (on the main process)."""
    model = run.accelerator.unwrap_model(model)
    trained = quant_state(model, run.schedule)
    if is_fsdp(run.accelerator):  # the main process finishes alone: on a whole copy, not on a shard
        model = _rebuild(run, trained) if run.main else None
    if run.main:
        model.eval()
        atomic_write(run.out / "quant_state.safetensors", lambda tmp: save_file(_contiguous(trained), tmp))
        with torch.no_grad():
            run.method.finalize(model, run.method_cfg, run.names, _Calibration(run))
        layers = convert(model)  # act/KV quantization settings travel with the layers
        save_quantized(model, run.tokenizer, run.out / "quantized", layers, source_gguf=source_gguf(run.cfg.model),
                       overwrite=True)  # fmt: skip
        run.model = model
        evaluate(run, run.label)
        _warn_if_worse_than_start(run.results["perplexity"], run.method.starts_at(run.method_cfg), run.label)
        run.results["settings"] = {
            "method": run.label, "n_bits": run.method_cfg.n_bits, "group_size": run.method_cfg.group_size,
            "act_bits": run.cfg.act_bits, "kv_bits": run.cfg.kv_bits, "rank": getattr(run.method_cfg, "rank", None),
            "steps": sum(p.steps for p in run.schedule), "loss": run.cfg.loss,
        }  # fmt: skip
        run.results["seconds_per_step"] = seconds_per_step
        run.results["peak_memory_mb"] = _peak_memory_mb()
        write_results(run.results, run.out)
    run.accelerator.wait_for_everyone()
    return run.results


def _warn_if_worse_than_start(perplexity: dict[str, float], start: str | None, label: str) -> None:
    """Say so when training left the model worse than the PTQ result it started from: at small budgets and too
    high an lr this happens (Gemma-3-270m, W4, 40 steps from GPTQ), and the untrained start is then the better
    model to ship."""
    if not (start and start in perplexity and label in perplexity) or perplexity[label] <= perplexity[start]:
        return
    ship = f"--method gptq --grid {GPTQ_INITS[start]}" if start in GPTQ_INITS else {"rtn": "--method rtn"}.get(start)
    log.warning(
        "training made the eval perplexity worse than the untrained %s start (%.3f -> %.3f, %+.1f%%): try a "
        "lower --lr or more steps%s",
        start, perplexity[start], perplexity[label], 100 * (perplexity[label] / perplexity[start] - 1),
        f", or ship the start itself (dlqat train {ship} ...)" if ship else "",
    )  # fmt: skip


class _Calibration(Sequence):
    """The training examples as single-example batches on the run's device (GPTQ's calibration set, first
    ones first), each built when read: GPTQ reads its first ``calib_samples``, most methods none, so the
    data set is never collated and moved to the device as a whole."""

    def __init__(self, run: Run) -> None:
        self.examples, self.pad, self.device = run.examples, run.tokenizer.pad_token_id, run.accelerator.device

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return collate([self.examples[index]], self.pad)["input_ids"].to(self.device)


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in tensors.items()}


def _peak_memory_mb() -> float:
    """Peak GPU memory allocated (CUDA) or the process's peak resident memory (CPU)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rebuild(run: Run, trained: dict) -> torch.nn.Module:
    """A whole (unsharded) copy of the trained model: the base model, the method's layers, the trained tensors."""
    model, _ = load_model(run.cfg.model)
    model.to(run.accelerator.device)
    run.method.prepare(model, run.method_cfg)
    set_act_quant(model, run.cfg.act_bits, run.cfg.kv_bits)
    _calibrate(run, model)  # e.g. the GPTQ base weights
    missing = set(trained) - set(model.state_dict())
    if missing:
        raise RuntimeError(f"rebuilding the trained model: no place for {sorted(missing)[:4]}")
    model.load_state_dict({k: v.to(run.accelerator.device) for k, v in trained.items()}, strict=False)
    return model
