"""Decode/prefill speed and file size of an exported low-bit model vs the float model and llama.cpp.

    python bench/decode.py [--run RUN] [--tokens 64] [--prefill 256]

Without ``--run`` it quantizes the embedded SmolLM2-135M with RTN at W4 g128 (speed does not depend on
training). Everything is measured in this one run and printed as ratios to the fp32 transformers model.
Two more rows export the tied embedding/head table quantized too (`--embed-bits 8` g128 and 4 g32).
llama.cpp rows need ``llama-cpp-python`` (skipped, with a note, when it is not installed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from dlqat import DLQATConfig, prepare
from dlqat.data import leading_bos, read_text, tokenize_text
from dlqat.eval.perplexity import perplexity
from dlqat.export import convert, load_quantized, save_quantized
from dlqat.export.formats import export, quantized_dir
from dlqat.layers.quantized_linear import hold_unpacked, set_backend
from dlqat.models import load_model, source_gguf
from dlqat.resources import default_eval_text


def timed(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def prefill_of(model, ids: torch.Tensor) -> None:
    with torch.no_grad():
        model(input_ids=ids)


def hf_speeds(model, prompt_ids: torch.Tensor, prefill_ids: torch.Tensor, n_new: int) -> tuple[float, float, list[int]]:
    """(decode tok/s, prefill tok/s, greedy ids) with the KV cache, batch 1."""
    out = []

    def decode():
        with torch.no_grad():
            gen = model.generate(
                prompt_ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0
            )
        out[:] = gen[0, prompt_ids.shape[1] :].tolist()

    t_dec = timed(decode, 2)
    t_pre = timed(lambda: prefill_of(model, prefill_ids))
    # generate's time includes one prefill of the short prompt; subtract it
    t_prompt = timed(lambda: prefill_of(model, prompt_ids))
    return n_new / max(t_dec - t_prompt, 1e-9), prefill_ids.numel() / t_pre, out


def llama_cpp_speeds(gguf_path: Path, prompt: list[int], prefill: list[int], n_new: int):
    import llama_cpp

    # logits_all: llama-cpp-python exposes scores only then (decode evaluates one token per call anyway)
    llm = llama_cpp.Llama(
        model_path=str(gguf_path), n_ctx=2048, n_threads=torch.get_num_threads(), verbose=False, logits_all=True
    )
    prefill_llm = llama_cpp.Llama(
        model_path=str(gguf_path), n_ctx=2048, n_threads=torch.get_num_threads(), verbose=False
    )

    def decode():
        llm.reset()
        llm.eval(prompt)
        ids = []
        for _ in range(n_new):
            tok = int(llm.scores[llm.n_tokens - 1].argmax())
            ids.append(tok)
            llm.eval([tok])
        return ids

    def pre():
        prefill_llm.reset()
        prefill_llm.eval(prefill)

    t_prompt = timed(lambda: (llm.reset(), llm.eval(prompt)))
    t_dec = timed(decode, 2)
    return n_new / (t_dec - t_prompt), len(prefill) / timed(pre), decode()


def llama_cpp_perplexity(gguf_path: Path, ids: list[int], seq_len: int, windows: int, bos: int | None) -> float:
    """Same windows, BOS and token weighting as ``dlqat.eval.perplexity``, scored by llama.cpp."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(
        model_path=str(gguf_path), n_ctx=seq_len + 1, logits_all=True, n_threads=torch.get_num_threads(), verbose=False
    )
    prefix = [] if bos is None else [bos]
    nll, count = 0.0, 0
    for w in range(windows):
        window = ids[w * seq_len : (w + 1) * seq_len]
        llm.reset()
        llm.eval(prefix + window)
        logits = np.asarray(llm.scores[len(prefix) : len(prefix) + seq_len - 1], dtype=np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll += float((logz - logits[np.arange(seq_len - 1), window[1:]]).sum())
        count += seq_len - 1
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="trained run folder (default: RTN W4 g128 of the embedded model)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens to decode")
    parser.add_argument("--prefill", type=int, default=256, help="prompt tokens for the prefill measurement")
    parser.add_argument("--ppl-windows", type=int, default=4, help="512-token windows for the perplexity check")
    parser.add_argument("--output", default=None, help="also write the table as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="dlqat-bench-"))

    float_model, tok = load_model(None)
    if args.run:
        qdir = quantized_dir(args.run)
    else:
        model, _ = load_model(None)
        prepare(model, DLQATConfig(n_bits=4, group_size=128))
        qdir = save_quantized(model, tok, work / "rtn", convert(model), source_gguf=source_gguf(None))
    packed_dir = export(qdir, "dlqat", work / "packed", dtype="bf16")
    gguf_path = export(qdir, "gguf", work / "model.gguf")
    text_ids = tokenize_text(read_text(default_eval_text()), tok)
    bos = leading_bos(tok)
    prompt = torch.tensor([text_ids[:16]])
    prefill = torch.tensor([text_ids[1000 : 1000 + args.prefill]])

    rows = []
    bf16_size = sum(p.numel() for p in set(float_model.parameters())) * 2

    def add(name, dec, pre, size, ids):
        rows.append({"model": name, "decode_tok_s": dec, "prefill_tok_s": pre, "size_mb": size / 1e6, "ids": ids})

    dec, pre, ids_fp32 = hf_speeds(float_model, prompt, prefill, args.tokens)
    add("transformers fp32 (float)", dec, pre, bf16_size * 2, ids_fp32)
    bf16 = float_model.to(torch.bfloat16)
    dec, pre, ids = hf_speeds(bf16, prompt, prefill, args.tokens)
    add("transformers bf16 (float)", dec, pre, bf16_size, ids)
    del float_model, bf16

    q_model, _ = load_quantized(packed_dir, dtype=torch.float32)
    packed_size = (packed_dir / "model.safetensors").stat().st_size
    set_backend(q_model, "auto")
    dec, pre, ids_dlqat = hf_speeds(q_model, prompt, prefill, args.tokens)
    add("dlqat packed (int4 kernels)", dec, pre, packed_size, ids_dlqat)
    set_backend(q_model, "dequant")
    dec, pre, ids = hf_speeds(q_model, prompt, prefill, args.tokens)
    add("dlqat packed (float unpack)", dec, pre, packed_size, ids)
    hold_unpacked(q_model)  # what `dlqat eval` runs: unpacked once, held
    dec, pre, ids = hf_speeds(q_model, prompt, prefill, args.tokens)
    add("dlqat packed (float, unpacked once: dlqat eval)", dec, pre, packed_size, ids)
    hold_unpacked(q_model, False)
    ppl_ours = perplexity(q_model, text_ids, 512, args.ppl_windows, progress=False, bos_token_id=bos).perplexity
    notes = []

    ppl_embed = [f"bf16 table {ppl_ours:.3f}"]
    for bits, group in ((8, 128), (4, 32)):  # the tied embedding/head table quantized too
        embed_dir = export(
            qdir, "dlqat", work / f"packed-e{bits}", dtype="bf16", embed_bits=bits, embed_group_size=group
        )
        e_model, _ = load_quantized(embed_dir, dtype=torch.float32)
        set_backend(e_model, "auto")
        dec, pre, ids = hf_speeds(e_model, prompt, prefill, args.tokens)
        size = (embed_dir / "model.safetensors").stat().st_size
        add(f"dlqat packed + {bits}-bit g{group} embedding (int4 kernels)", dec, pre, size, ids)
        set_backend(e_model, "dequant")
        ppl = perplexity(e_model, text_ids, 512, args.ppl_windows, progress=False, bos_token_id=bos).perplexity
        ppl_embed.append(f"{bits}-bit g{group} table {ppl:.3f} ({100 * (ppl / ppl_ours - 1):+.2f}%)")
        del e_model
    notes.append(f"perplexity of the dlqat model, {args.ppl_windows} x 512 tokens: " + ", ".join(ppl_embed))

    if importlib.util.find_spec("llama_cpp"):
        dec, pre, ids_gguf = llama_cpp_speeds(gguf_path, prompt[0].tolist(), prefill[0].tolist(), args.tokens)
        add("llama.cpp, dlqat GGUF (Q4_1)", dec, pre, gguf_path.stat().st_size, ids_gguf)
        src = source_gguf(None)
        dec, pre, _ = llama_cpp_speeds(Path(src), prompt[0].tolist(), prefill[0].tolist(), args.tokens)
        add("llama.cpp, original SmolLM2 Q4_1 GGUF", dec, pre, Path(src).stat().st_size, None)
        same = sum(a == b for a, b in zip(ids_gguf, ids_dlqat))
        first_diff = next((i for i, (a, b) in enumerate(zip(ids_gguf, ids_dlqat)) if a != b), None)
        notes.append(
            f"greedy tokens equal between dlqat (int4 kernels) and llama.cpp on the GGUF: {same}/{args.tokens}"
            + ("" if first_diff is None else f" (first difference at token {first_diff})")
        )
        ppl_cpp = llama_cpp_perplexity(gguf_path, text_ids, 512, args.ppl_windows, bos)
        notes.append(
            f"perplexity, {args.ppl_windows} x 512 tokens of wiki.utf8: dlqat {ppl_ours:.3f}, "
            f"llama.cpp on the GGUF {ppl_cpp:.3f} ({100 * (ppl_cpp / ppl_ours - 1):+.2f}%)"
        )
    else:
        notes.append("llama.cpp rows skipped: pip install llama-cpp-python==0.3.36 (builds from source)")

    base = rows[0]
    print(
        f"\nSmolLM2-135M, batch 1, {torch.get_num_threads()} threads; decode {args.tokens} tokens after a "
        f"16-token prompt; prefill {args.prefill} tokens; ratios vs transformers fp32\n"
    )
    print("| model | decode tok/s | x fp32 | prefill tok/s | x fp32 | file MB | x bf16 size |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / base['decode_tok_s']:.2f} | "
            f"{r['prefill_tok_s']:.0f} | {r['prefill_tok_s'] / base['prefill_tok_s']:.2f} | {r['size_mb']:.1f} | "
            f"{r['size_mb'] * 1e6 / bf16_size:.2f} |"
        )
    for note in notes:
        print(f"\n{note}")
    if args.output:
        Path(args.output).write_text(json.dumps({"rows": rows, "notes": notes}, indent=2))


if __name__ == "__main__":
    main()
