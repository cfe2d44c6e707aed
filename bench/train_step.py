"""Training-step time and peak memory: is quantization-aware LoRA as cheap as LoRA?

    python bench/train_step.py [--model PATH] [--batch 2] [--seq 256] [--steps 3] [--rounds 2] [--variants abcdefgh]

Same model, batch and sequence length for every variant, each in its own process (peak memory is that
process's peak resident set on CPU, or peak allocated on CUDA):
  (a) plain LoRA with PEFT on the float model (the baseline every ratio is against)
  (b) torchtune/torchao-style QAT+LoRA: fake-quantized frozen weight plus a float LoRA branch
  (c) dlqat DL-QAT phase 2 (m, A, B trained; lean backward)
  (d) dlqat L4Q (A, B, scale, offset trained; lean backward)
  (e) full-weight QAT (all linear weights trained through the fake quantizer)
  (f) L4Q with plain autograd instead of the lean backward (what the lean backward saves)
  (g) (c) with the quantized layers' elementwise work through torch.compile (``--compile``; compile time excluded)
  (h) (c) with the distillation loss (``--loss kd``: a no-grad float-teacher forward, chunked KL on the head)
The FLOP floor is 6 x linear parameters x tokens at this machine's fp32 matmul rate measured in the same run
(best over every variant's process),
shown against the whole step and against the target linear layers alone (each layer's forward + backward on
the step's tokens, timed in the same process: what the quantized layers cost without the model around them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = {
    "a": "PEFT LoRA (float)",
    "b": "QAT+LoRA, float branch (torchtune-style)",
    "c": "dlqat DL-QAT phase 2",
    "d": "dlqat L4Q",
    "e": "full-weight QAT",
    "f": "L4Q with plain autograd (no lean backward)",
    "g": "dlqat DL-QAT phase 2, torch.compile",
    "h": "dlqat DL-QAT phase 2, kd loss",
}


class FakeQuantPlusLoRA(nn.Module):
    """(b): ``y = x Q(W0)^T + scaling x A^T B^T`` with the LoRA branch outside the quantizer."""

    def __init__(self, linear: nn.Linear, n_bits: int, group_size: int, rank: int, alpha: float) -> None:
        super().__init__()
        from dlqat.quant import fake_quantize, minmax_scale_offset

        self._fq, self._minmax = fake_quantize, minmax_scale_offset
        self.weight, self.n_bits, self.group_size, self.scaling = linear.weight, n_bits, group_size, alpha / rank
        self.weight.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, linear.in_features) / rank)
        self.lora_b = nn.Parameter(torch.zeros(linear.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, offset = self._minmax(self.weight, self.n_bits, self.group_size)  # recomputed per step, as in torchao
        w = self._fq(self.weight, scale, offset, self.n_bits, self.group_size)
        return F.linear(x, w) + self.scaling * F.linear(F.linear(x, self.lora_a), self.lora_b)


def build(variant: str, model: nn.Module, n_bits: int, group_size: int, rank: int) -> nn.Module:
    from dlqat import phases, prepare
    from dlqat.methods import make_config
    from dlqat.methods.base import set_trainable
    from dlqat.surgery import DEFAULT_TARGETS, name_filter, replace_linears

    if variant == "a":
        import peft

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        return peft.get_peft_model(
            model, peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights="gaussian")
        )
    if variant == "b":
        replace_linears(
            model, lambda n, m: FakeQuantPlusLoRA(m, n_bits, group_size, rank, rank), name_filter(DEFAULT_TARGETS)
        )
        set_trainable(model, lambda n: n.rsplit(".", 1)[-1] in ("lora_a", "lora_b"))
        return model
    method = {"c": "dl_qat", "d": "l4q", "e": "full_qat", "f": "l4q", "g": "dl_qat", "h": "dl_qat"}[variant]
    extra = {"rank": rank} if variant != "e" else {}
    extra.update({"phase1_steps": 0, "phase2_steps": 1} if method == "dl_qat" else {"steps": 1})
    cfg = make_config(method, n_bits=n_bits, group_size=group_size, **extra)
    names = prepare(model, cfg)
    phase = phases(cfg, names)[-1]
    set_trainable(model, phase.trains)
    if variant == "g":
        from dlqat.quant.lean_linear import set_compile

        set_compile(True)
    if variant == "f":
        for module in model.modules():
            if hasattr(module, "lean"):
                module.lean = False
    return model


def linear_params(model: nn.Module) -> int:
    from dlqat.surgery import DEFAULT_TARGETS, name_filter

    keep = name_filter(DEFAULT_TARGETS)
    return sum(m.weight.numel() for n, m in model.named_modules() if keep(n, m))


def linear_layer_seconds(model: nn.Module, tokens: int, device: str, repeats: int = 3) -> float:
    """Forward + backward of the target linear layers alone, summed over the model's layers.

    The layers are the variant's own modules (PEFT's LoRA layer, dlqat's quantized layer, ...); one
    of each (class, shape) is timed on ``tokens`` rows, best of ``repeats``, and counted as often as
    the model has it.
    """
    import re

    from dlqat.surgery import DEFAULT_TARGETS

    target = re.compile(DEFAULT_TARGETS)
    groups: dict[tuple, list[nn.Module]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if target.fullmatch(name) and weight is not None:
            groups.setdefault((type(module), tuple(weight.shape)), []).append(module)
    total = 0.0
    for (_, (out_features, in_features)), modules in groups.items():
        layer = modules[0]
        x = torch.randn(tokens, in_features, device=device, requires_grad=True)
        grad_y = torch.randn(tokens, out_features, device=device)
        best = float("inf")
        for _ in range(repeats + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            layer(x).backward(grad_y)
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
            layer.zero_grad(set_to_none=True)
            x.grad = None
        total += best * len(modules)
    return total


def matmul_gflops(device: str, trials: int = 3) -> float:
    """fp32 matmul rate of a (512 x 1536) @ (1536 x 576) product (a SmolLM2 layer's shape): best of ``trials``."""
    a, b = torch.randn(512, 1536, device=device), torch.randn(1536, 576, device=device)
    for _ in range(3):
        a @ b
    best, n = 0.0, 20
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(n):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, n * 2 * 512 * 1536 * 576 / (time.perf_counter() - t0) / 1e9)
    return best


def run_variant(args) -> dict:
    from dlqat.models import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = load_model(args.model)
    n_linear = linear_params(model)
    model = build(args.variant, model, args.bits, args.group_size, args.rank).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    )

    if args.variant == "h":  # the training loop's distillation objective, per token like the ce loss
        from dlqat.losses import Objective

        objective = Objective(model, "kd", 1.0)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        n_predicted = ids[:, 1:].numel()
        forward = lambda: objective(model, batch) / n_predicted
    else:
        forward = lambda: model(input_ids=ids, labels=ids).loss

    def step():
        with autocast:
            loss = forward()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    with autocast:
        linear_seconds = linear_layer_seconds(model, args.batch * args.seq, device)
    return {
        "variant": args.variant,
        "seconds_per_step": min(times),
        "peak_mb": peak,
        "trainable": sum(p.numel() for p in params),
        "linear_params": n_linear,
        "tokens": args.batch * args.seq,
        "linear_seconds": linear_seconds,
        "gflops": matmul_gflops(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process (after one warm-up step)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="run every variant this many times, interleaved; keep each one's best"
    )
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--variants", default="abcdefgh")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants {args.variants!r}: unknown {unknown}; expected letters from {''.join(VARIANTS)}")
    variants = "a" + args.variants.replace("a", "")  # every ratio is against (a), so (a) always runs first
    shared = ["--batch", args.batch, "--seq", args.seq, "--steps", args.steps, "--bits", args.bits]
    shared += ["--group-size", args.group_size, "--rank", args.rank] + (["--model", args.model] if args.model else [])
    best: dict[str, dict] = {}
    # Rounds of a b c ... a b c ...: a shared machine's speed drifts over minutes, and interleaving
    # spreads that drift over every variant instead of charging it to whichever ran during a slow spell.
    for _ in range(args.rounds):
        for v in variants:
            cmd = [sys.executable, __file__, "--variant", v] + [str(a) for a in shared]
            out = subprocess.run(
                cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=False
            )
            if out.returncode:
                raise RuntimeError(f"variant {v} failed:\n{out.stderr[-3000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            if v not in best or row["seconds_per_step"] < best[v]["seconds_per_step"]:
                best[v] = row
    rows = [best[v] for v in variants]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # the machine's rate: the best measured in any variant's process (the floor is then a strict one)
    gflops = max([matmul_gflops(device)] + [r["gflops"] for r in rows])
    base = rows[0]
    print(
        f"\n{args.batch} x {args.seq} tokens per step, W{args.bits} g{args.group_size}, rank {args.rank}, "
        f"{device} ({torch.get_num_threads()} threads), fp32 matmul {gflops:.0f} GFLOP/s; best step of "
        f"{args.rounds} rounds x {args.steps} steps; ratios vs (a)\n"
    )
    print(
        "| variant | s/step | x (a) | peak MB | x (a) | trainable | tokens/s | % of FLOP floor: step "
        "| linear layers s/step | x (a) | % of FLOP floor: linear layers |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tok_s = r["tokens"] / r["seconds_per_step"]
        floor_seconds = 6 * r["linear_params"] * r["tokens"] / (gflops * 1e9)
        print(
            f"| ({r['variant']}) {VARIANTS[r['variant']]} | {r['seconds_per_step']:.2f} | "
            f"{r['seconds_per_step'] / base['seconds_per_step']:.2f} | {r['peak_mb']:.0f} | "
            f"{r['peak_mb'] / base['peak_mb']:.2f} | {r['trainable']:,} | {tok_s:.0f} | "
            f"{100 * floor_seconds / r['seconds_per_step']:.0f}% | {r['linear_seconds']:.2f} | "
            f"{r['linear_seconds'] / base['linear_seconds']:.2f} | {100 * floor_seconds / r['linear_seconds']:.0f}% |"
        )
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"rows": rows, "gflops": gflops}, f, indent=2)


if __name__ == "__main__":
    main()
