"""The training loop's view of the engine ``accelerate launch`` picked: one process, DDP, FSDP2 or
DeepSpeed ZeRO-1/2, so that train.py reads and writes whole tensors the same way under all of them.

Under one process or DDP every rank holds whole tensors and one optimizer. Under FSDP2 each parameter
is a ``DTensor`` whose rank-local part is a slice: reading it whole is a collective that *every* rank
must join, and the optimizer moments are sliced the same way. Under ZeRO-1/2 the parameters are whole
but each rank's optimizer holds only its partition of the flat fp32 master weights and moments.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedType,
    FullyShardedDataParallelPlugin,
    InitProcessGroupKwargs,
    send_to_device,
)

# How a checkpoint's optimizer state is laid out; a run resumes only from its own layout.
LAYOUT_WHOLE, LAYOUT_FSDP, LAYOUT_ZERO = "whole", "fsdp2-full-state", "zero-per-rank"


def make_accelerator(grad_accum: int, mixed_precision: str, micro_batch_size: int, max_grad_norm: float) -> Accelerator:
    """Accelerate picks the engine from ``accelerate launch``'s environment; CPU-only hosts use gloo."""
    on_gpu = torch.cuda.is_available()
    common = {"gradient_accumulation_steps": grad_accum, "mixed_precision": mixed_precision}
    if not on_gpu:  # say it rather than let DeepSpeed (imported by Accelerate when installed) guess and warn
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # spelled as Accelerate's own AcceleratorState reads it ("true" only), so both agree on the engine
    launched_with_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if launched_with_deepspeed:
        check_no_stale_build_lock(torch_extensions_root())
    if not on_gpu and launched_with_deepspeed:
        # DeepSpeed brings its own CPU accelerator; Accelerate only has to name the gloo backend.
        accelerator = Accelerator(**common, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    else:
        # cpu=True lets Accelerate run several CPU processes (gloo) under torchrun
        accelerator = Accelerator(**common, cpu=not on_gpu, fsdp_plugin=_fsdp_plugin())
    check_supported(accelerator)
    if is_deepspeed(accelerator):  # what a DataLoader and a clip call would tell it in another loop
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        for key, value in (("train_micro_batch_size_per_gpu", micro_batch_size), ("gradient_clipping", max_grad_norm)):
            if config.get(key, "auto") == "auto":
                config[key] = value
    return accelerator


# DeepSpeed JIT-builds its ops (on CPU: deepspeed_shm_comm) in minutes at most; a lock older than this
# was left by a build that was killed, and torch's FileBaton would wait on it forever, silently.
STALE_LOCK_AGE_S = 30 * 60


def torch_extensions_root() -> Path:
    """Where torch's JIT builds (and DeepSpeed's ops) keep one folder per extension, each with its lock."""
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    from torch.utils.cpp_extension import get_default_build_root

    accelerator = "cpu" if torch.version.cuda is None else f"cu{torch.version.cuda.replace('.', '')}"
    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def check_no_stale_build_lock(root: Path, max_age_s: float = STALE_LOCK_AGE_S) -> None:
    """Refuse to start while an old build lock would hang every rank at start-up without a word.

    A run killed while DeepSpeed builds an op leaves ``<root>/<op>/lock`` behind; the next run's ranks
    then sleep on it forever. A young lock is a build in progress (another run, or another rank) and
    is left alone.
    """
    now = time.time()
    stale = [lock for lock in sorted(root.glob("*/lock")) if now - lock.stat().st_mtime > max_age_s]
    if stale:
        names = ", ".join(str(lock) for lock in stale)
        raise RuntimeError(
            f"stale build lock {names} (older than {max_age_s / 60:.0f} min, left by a killed DeepSpeed op "
            "build): every rank would wait on it forever. If no build is running, delete it and rerun"
        )


def _fsdp_plugin() -> FullyShardedDataParallelPlugin | None:
    """The plugin ``accelerate launch --use_fsdp`` describes, with two defaults of dlqat's.

    Sharding unit: one decoder layer (the model's ``_no_split_modules``) unless the launcher names a
    wrap policy; Accelerate's own default (no wrap) would gather the whole model at once.
    Precision: parameters stay fp32 under bf16. Accelerate's bf16 policy casts every parameter to
    bf16 before the forward, so the quantizer would round with bf16 scales, offsets and adapters
    while the export uses the fp32 ones; the loop autocasts the forward instead (the price: the
    frozen weights are gathered in fp32).
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    os.environ.setdefault("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    from torch.distributed.fsdp import MixedPrecisionPolicy  # torch >= 2.6, as Accelerate's FSDP2 needs

    plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* environment
    if plugin.fsdp_version == 2 and plugin.mixed_precision_policy is None:
        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    return plugin


def is_fsdp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _zero_stage(accelerator: Accelerator) -> int:
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def check_supported(accelerator: Accelerator) -> None:
    """Refuse engine settings the loop cannot drive, saying what to use instead."""
    if is_deepspeed(accelerator) and _zero_stage(accelerator) not in (1, 2):
        raise NotImplementedError(
            f"accelerate config: DeepSpeed zero_stage {_zero_stage(accelerator)} is not supported; use zero_stage 1 "
            "or 2 (partitioned optimizer state), or FSDP (fsdp_version: 2) to shard the frozen weights too"
        )
    if is_fsdp(accelerator) and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise NotImplementedError(
            f"accelerate config: fsdp_version {accelerator.state.fsdp_plugin.fsdp_version} is not supported; "
            "set fsdp_version: 2 (per-parameter sharding keeps frozen and trained tensors apart)"
        )


def release_engine(accelerator: Accelerator) -> None:
    """Before a phase re-prepares the model: a DeepSpeed engine owns one optimizer, so the old one goes."""
    if is_deepspeed(accelerator):
        accelerator.free_memory()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on this rank (a collective for a sharded ``DTensor``: every rank must call it)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # DTensor


def gather_parameters(model: torch.nn.Module, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """Whole CPU copies of the parameters whose names ``keep`` accepts. Every rank must call it."""
    return {n: full_tensor(p.detach()).cpu().clone() for n, p in model.named_parameters() if keep(n)}


def optimizer_layout(accelerator: Accelerator) -> str:
    return LAYOUT_FSDP if is_fsdp(accelerator) else LAYOUT_ZERO if is_deepspeed(accelerator) else LAYOUT_WHOLE


def optimizer_state(accelerator: Accelerator, model: torch.nn.Module, optimizer) -> dict:
    """The optimizer's state in one rank-independent object. Every rank must call it.

    Whole: plain ``state_dict()``. FSDP2: torch's distributed-checkpoint helper gathers the sliced
    moments, keyed by parameter name. ZeRO: every rank's partition, gathered into one list (what
    DeepSpeed's own loader takes), so the checkpoint stays one atomically written file.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's optimizer wrappers hold the real one
    layout = optimizer_layout(accelerator)
    if layout == LAYOUT_FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if layout == LAYOUT_ZERO:
        partitions = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(partitions, send_to_device(inner.state_dict(), "cpu"))
        return {"partitions": partitions}
    return inner.state_dict()


def load_optimizer_state(accelerator: Accelerator, model: torch.nn.Module, optimizer, state: dict) -> None:
    """Inverse of :func:`optimizer_state`: each rank takes back its own part."""
    inner = getattr(optimizer, "optimizer", optimizer)
    layout = optimizer_layout(accelerator)
    if layout == LAYOUT_FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, inner, state, options=StateDictOptions(full_state_dict=True))
    elif layout == LAYOUT_ZERO:
        saved = len(state["partitions"])
        if saved != accelerator.num_processes:
            raise ValueError(
                f"checkpoint: ZeRO optimizer state of {saved} processes; resume with {saved} processes, "
                f"not {accelerator.num_processes}"
            )
        inner.load_state_dict(state["partitions"], load_optimizer_states=True, load_from_fp32_weights=True)
    else:
        inner.load_state_dict(state)
