"""Distillation: the chunked KL/CE against a direct full-vocabulary reference, the float teacher equal to
the original model, and a tiny run where ``kd`` lowers the student-teacher KL."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_configs, tiny_model
from dlqat import DLQATConfig, prepare
from dlqat.data import IGNORE_INDEX
from dlqat.losses import FinalHidden, Objective, float_teacher, token_losses
from dlqat.train import train


def reference_losses(z_s, z_t, labels, temperature):
    """Full (B, T, V) logits at once: KL(teacher || student) * T^2 and CE, summed over counted tokens."""
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    mask = targets != IGNORE_INDEX
    p_t = F.softmax(z_t[mask] / temperature, -1)
    kl = F.kl_div(F.log_softmax(z_s[mask] / temperature, -1), p_t, reduction="sum") * temperature**2
    ce = F.cross_entropy(z_s[mask], targets[mask], reduction="sum")
    return kl, ce, int(mask.sum())


@pytest.mark.parametrize("chunk", [1, 7, 512])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("head_trained", [False, True], ids=["frozen_head", "trained_head"])
@pytest.mark.parametrize("want_ce", [False, True], ids=["kd", "kd+ce"])
def test_chunked_losses_equal_the_full_vocabulary_reference(chunk, temperature, head_trained, want_ce):
    """Values and gradients: a frozen head takes each chunk's gradient in forward, a trained one recomputes
    the chunk in backward (its weight needs a gradient too)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).double().requires_grad_(head_trained)
    h_s = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(2, 9, 16, dtype=torch.float64)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :3] = IGNORE_INDEX  # a prompt
    labels[1, 7:] = IGNORE_INDEX  # padding
    kl, ce, n = token_losses(h_s, h_t, labels, head, temperature, want_ce=want_ce, chunk_tokens=chunk)
    ref_kl, ref_ce, ref_n = reference_losses(head(h_s), head(h_t).detach(), labels, temperature)  # teacher: a target
    assert n == ref_n == 12
    torch.testing.assert_close(kl.double(), ref_kl, rtol=1e-6, atol=1e-9)
    if want_ce:
        torch.testing.assert_close(ce.double(), ref_ce, rtol=1e-6, atol=1e-9)
    else:
        assert ce == 0
    inputs = [h_s, head.weight] if head_trained else [h_s]
    weights = (0.7, 1.9 if want_ce else 0.0)  # kl and ce get different gradients from the caller
    grads = torch.autograd.grad(weights[0] * kl + weights[1] * ce, inputs)
    ref_grads = torch.autograd.grad(weights[0] * ref_kl + weights[1] * ref_ce, inputs)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-9)


def test_softcap_and_a_separate_teacher_head():
    torch.manual_seed(0)
    head, t_head = torch.nn.Linear(8, 20, bias=False), torch.nn.Linear(12, 20, bias=False)
    h_s, h_t = torch.randn(1, 5, 8), torch.randn(1, 5, 12)
    labels = torch.randint(0, 20, (1, 5))
    kl, _, _ = token_losses(
        h_s, h_t, labels, head, softcap=3.0, teacher_head=t_head, teacher_softcap=4.0, chunk_tokens=2
    )
    z_s, z_t = torch.tanh(head(h_s) / 3.0) * 3.0, torch.tanh(t_head(h_t) / 4.0) * 4.0
    torch.testing.assert_close(kl, reference_losses(z_s, z_t, labels, 1.0)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_float_teacher_is_the_original_model(arch):
    """Inside float_teacher a prepared (and trained-looking) model computes the float logits exactly."""
    model = tiny_model(arch)
    original = copy.deepcopy(model)
    prepare(model, DLQATConfig(n_bits=2, group_size=16, rank=4, init="mse"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("lora_b", "magnitude")):
                param.add_(0.1 * torch.randn_like(param))  # adapters that change the output
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        expected = original(ids).logits
        quantized = model(ids).logits
        with float_teacher(model):
            teacher = model(ids).logits
        after = model(ids).logits
    torch.testing.assert_close(teacher, expected, atol=0, rtol=0)
    assert not torch.allclose(quantized, expected, atol=1e-3)
    torch.testing.assert_close(after, quantized, atol=0, rtol=0)  # switched back on


def test_final_hidden_gives_the_head_input():
    model = tiny_model("llama")
    hidden = FinalHidden(model)
    ids = torch.randint(0, 320, (1, 6))
    with torch.no_grad():
        full = model(ids).logits
        model(ids, logits_to_keep=1)
    torch.testing.assert_close(model.get_output_embeddings()(hidden.take()), full, atol=1e-6, rtol=1e-5)
    hidden.remove()


def test_objective_ce_is_the_token_sum():
    model = tiny_model("llama")
    ids = torch.randint(0, 320, (2, 10))
    labels = ids.clone()
    labels[0, -3:] = IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        summed = Objective(model, "ce", 1.0)(model, batch)
    with torch.no_grad():
        _, ce, n = token_losses(_hidden(model, ids), None, labels, model.get_output_embeddings(), want_ce=True)
    assert n == 2 * 9 - 3
    torch.testing.assert_close(summed, ce, rtol=1e-5, atol=1e-5)


def _hidden(model, ids):
    hook = FinalHidden(model)
    model(ids)
    hook.remove()
    return hook.take()


@pytest.fixture(scope="module")
def trained_tiny_model_dir(tiny_model_dir, tokenizer, text_file, tmp_path_factory):
    """The tiny Llama after 40 float steps on the tiny text: a teacher with peaked predictions (a random
    model's are near uniform, so any student is already close to it)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    ids = torch.tensor(tokenizer(text_file.read_text())["input_ids"][: 16 * 32]).view(16, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(40):
        batch = ids[(step % 4) * 4 : (step % 4) * 4 + 4]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    path = tmp_path_factory.mktemp("trained-tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_kd_run_lowers_the_student_teacher_kl(trained_tiny_model_dir, tokenizer, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from dlqat.export import load_quantized

    method, cfg = tiny_configs(trained_tiny_model_dir, text_file, tmp_path / "kd", n_bits=2, init="mse",
                               clip_mode="learn_then_fix", phase1_steps=4, phase2_steps=24, lr=1e-3, loss="kd",
                               save_every=100)  # fmt: skip
    train(method, cfg)
    teacher = AutoModelForCausalLM.from_pretrained(trained_tiny_model_dir).eval()
    rtn = copy.deepcopy(teacher)
    prepare(rtn, DLQATConfig(n_bits=2, group_size=32, rank=4, init="mse"))  # the untrained start
    student, _ = load_quantized(tmp_path / "kd" / "quantized")
    ids = torch.tensor(tokenizer(text_file.read_text())["input_ids"][: 8 * 32]).view(8, 32)

    def kl_to_teacher(model):
        with torch.no_grad():
            log_p, log_q = F.log_softmax(teacher(ids).logits, -1), F.log_softmax(model(ids).logits, -1)
        return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())

    before, after = kl_to_teacher(rtn), kl_to_teacher(student)
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("tied", [True, False])
def test_teacher_copy_under_autocast_is_exact_at_half_width(arch, tied):
    """The float-copy teacher holds its linear weights in the autocast dtype: the same logits bit for bit
    (autocast casts every linear weight on each call anyway), with the output head (and a weight tied to
    the embedding) left as they were."""
    from dlqat.train import _float_copy

    torch.manual_seed(0)
    model = tiny_model(arch)
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    teacher = _float_copy(model, "test", torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(teacher(ids).logits, model(ids).logits)
    dtypes = {name: p.dtype for name, p in teacher.named_parameters()}
    assert dtypes["lm_head.weight" if not tied else "model.embed_tokens.weight"] == torch.float32
    assert (
        dtypes["model.layers.0.self_attn.q_proj.weight"]
        == dtypes["model.layers.0.mlp.down_proj.weight"]
        == torch.bfloat16
    )
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the student is untouched
    assert not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize(("method", "mixed"), [("qa_lora", "no"), ("full_qat", "no"), ("qa_lora", "bf16")])
def test_kd_without_a_float_weight_distils_from_a_float_copy(
    method, mixed, tiny_model_dir, text_file, tmp_path, caplog
):
    """QA-LoRA replaces W0 by codes and full QAT trains it: kd then keeps a frozen copy made before surgery,
    which must teach exactly what the same model given as --teacher does (same losses, step by step)."""
    import json
    import logging
    from pathlib import Path

    from dlqat.methods import make_config
    from dlqat.train import TrainConfig

    def losses(**overrides) -> list[float]:
        cfg = TrainConfig(model=str(tiny_model_dir), data=str(text_file), eval_data=str(text_file), loss="kd",
                          seq_len=32, eval_seq_len=32, progress=False, **overrides)  # fmt: skip
        train(make_config(method, group_size=32, steps=3), cfg)
        log = (Path(cfg.output_dir) / "train_log.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in log]

    with caplog.at_level(logging.INFO, logger="dlqat"):
        copied = losses(output_dir=str(tmp_path / "copy"))
    assert "the float weights are not kept, so a frozen copy of the model" in caplog.text
    assert copied == losses(output_dir=str(tmp_path / "given"), teacher=str(tiny_model_dir))
    assert len(copied) == 3 and copied[0] > 0


def test_half_width_teacher_copy_under_bf16_teaches_as_the_model_given_as_teacher(tiny_model_dir, text_file, tmp_path):
    """End to end under bf16 autocast (own processes: Accelerate fixes the precision once per process)."""
    import json
    import os
    import subprocess
    import sys

    def losses(out, *extra) -> list[float]:
        args = ["--method", "qa_lora", "--group_size", "32", "--steps", "3", "--loss", "kd", "--mixed_precision",
                "bf16", "--model", str(tiny_model_dir), "--data", str(text_file), "--eval_data", str(text_file),
                "--seq_len", "32", "--eval_seq_len", "32", "--output_dir", str(tmp_path / out), *extra]  # fmt: skip
        done = subprocess.run([sys.executable, "-m", "dlqat", "train", *args], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return [json.loads(line)["loss"] for line in (tmp_path / out / "train_log.jsonl").read_text().splitlines()]

    assert losses("copy") == losses("given", "--teacher", str(tiny_model_dir))
