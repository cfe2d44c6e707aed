"""Serving check: the same low-bit model in each engine that runs here, its perplexity (does the engine
compute what we trained?) and its decode speed, in one run.

    python bench/serve.py --run runs/serve-w4g64      # a finished `dlqat train` run (group size 32/64/128)

Rows: dlqat's own runtime in transformers (packed codes, int4 kernels), and mlx-lm on the MLX export
(``--mlx_dtypes``; fp32 by default: MLX's CPU backend has no native bf16 on AVX2 machines). Perplexity: token-level, ``--windows`` x 512 tokens of held-out wiki.utf8.
Decode: greedy, batch 1, ``--new_tokens`` after a 16-token prompt, tokens/s of the generation alone.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from dlqat import load, resources
from dlqat.data import leading_bos, read_text, tokenize_text
from dlqat.eval.perplexity import perplexity
from dlqat.eval.tables import markdown_table
from dlqat.export.formats import export
from dlqat.layers.quantized_linear import set_backend


def dlqat_row(run: Path, ids: list[int], bos: int | None, args) -> list:
    model, tokenizer = load(run / "quantized", dtype=torch.float32)
    ppl = perplexity(model, ids, 512, args.windows, "wiki.utf8", progress=False, bos_token_id=bos).perplexity
    set_backend(model, "auto")
    prompt = torch.tensor([ids[:16]])
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)  # warm-up
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return [
        "transformers + dlqat (int4 kernels)",
        "dlqat",
        f"{ppl:.3f}",
        f"{args.new_tokens / (time.perf_counter() - start):.1f}",
    ]


def mlx_row(run: Path, ids: list[int], bos: int | None, dtype: str, args) -> list:
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.generate import generate_step

    with tempfile.TemporaryDirectory() as tmp:
        out = export(run, "mlx", Path(tmp) / "mlx", dtype=dtype)
        model, _ = mlx_lm.load(str(out))
        nll, count = 0.0, 0
        prefix = [] if bos is None else [bos]  # read each window after the BOS, as dlqat's perplexity does
        for w in range(args.windows):
            window = mx.array([ids[w * 512 : (w + 1) * 512]])
            logits = model(mx.array([prefix + ids[w * 512 : (w + 1) * 512 - 1]])).astype(mx.float32)[:, len(prefix) :]
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            picked = mx.take_along_axis(logp, window[:, 1:, None], axis=-1)
            nll -= float(picked.sum())
            count += 511
        prompt = mx.array(ids[:16])
        for _ in zip(range(4), generate_step(prompt, model)):  # warm-up
            pass
        start = time.perf_counter()
        for _ in zip(range(args.new_tokens), generate_step(prompt, model)):
            pass
        tok_s = args.new_tokens / (time.perf_counter() - start)
    return [f"mlx-lm (MLX CPU), {dtype} scales/biases", "mlx", f"{math.exp(nll / count):.3f}", f"{tok_s:.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="finished run folder (group size 32, 64 or 128)")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument(
        "--mlx_dtypes", default="fp32", help="MLX storage dtypes to time (bf16 is emulated, ~7x slower, on AVX2 CPUs)"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    run = Path(args.run)
    _, tokenizer = load(run / "quantized")
    ids = tokenize_text(read_text(resources.default_eval_text()), tokenizer)
    bos = leading_bos(tokenizer)
    head = ["engine", "format", f"perplexity ({args.windows} x 512 wiki)", "decode tok/s"]
    rows = []
    for make in [
        lambda: dlqat_row(run, ids, bos, args),
        *(lambda d=d: mlx_row(run, ids, bos, d, args) for d in args.mlx_dtypes.split(",")),
    ]:
        rows.append(make())
        print(rows[-1], flush=True)
    print(markdown_table(head, rows))


if __name__ == "__main__":
    main()
