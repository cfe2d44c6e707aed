"""Training losses: next-token cross-entropy and distillation from the float model, summed over tokens.

Every loss here returns a *sum* over the predicted tokens and their count, so the loop can divide by
the token count of the whole accumulated batch (not average per micro-batch, which would weight a
short sequence's tokens more than a long one's).

Distillation (``kd``): KL(teacher || student) over the full vocabulary at temperature ``T`` (scaled by
``T^2``, Hinton et al.). The teacher is the same model with every quantizer and adapter switched off
(``float_teacher``): the frozen ``W0`` is already in memory, so distillation costs one no-grad forward
and no second copy of the weights. The logits are never materialised for the whole sequence: the
loop takes the final hidden states ``(tokens, hidden)`` of student and teacher and this module runs
the output head over chunks of tokens, so the peak is one ``(chunk, vocab)`` block, not ``(tokens, vocab)``
twice (Gemma's vocabulary is 262k). Each chunk's gradient w.r.t. the student's hidden states is taken
in the forward pass, while its logits exist (as Liger's fused linear losses do), and kept as a
``(chunk, hidden)`` tensor: backward only scales it, so neither the student's nor the teacher's logits
are computed twice (recomputing them in backward made a ``kd`` step 1.5x a ``ce`` step).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dlqat.data import IGNORE_INDEX

LOSSES = ("ce", "kd", "kd+ce")
DEFAULT_CHUNK_TOKENS = 512


def shifted_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T)`` labels -> next-token targets ``(B, T)`` (the last position predicts nothing) and the
    mask of positions that predict a counted token."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return targets, targets != IGNORE_INDEX


def _logits(head: nn.Module, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # softmax in fp32 at least
    if softcap:  # Gemma's final logit soft-capping
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _chunk_losses(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    targets: torch.Tensor,
    heads: tuple[nn.Module, nn.Module],
    softcaps: tuple[float | None, float | None],
    temperature: float,
    want_ce: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed KL(teacher || student) * T^2 and summed CE of one chunk of ``(n, hidden)`` states."""
    z_s = _logits(heads[0], student, softcaps[0])  # (n, V)
    kl = z_s.new_zeros(())
    if teacher is not None:
        with torch.no_grad():
            log_p_t = F.log_softmax(_logits(heads[1], teacher, softcaps[1]) / temperature, dim=-1)
        log_p_s = F.log_softmax(z_s / temperature, dim=-1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum() * temperature**2
    ce = F.cross_entropy(z_s, targets, reduction="sum") if want_ce else z_s.new_zeros(())
    return kl, ce


class _ChunkLossWithGradient(torch.autograd.Function):
    """One chunk's ``(kl, ce)`` whose gradient w.r.t. the student's hidden states is computed in forward.

    The head's own parameters get no gradient here (the caller checks they are frozen)."""

    @staticmethod
    def forward(ctx, student, teacher, targets, heads, softcaps, temperature, want_ce):
        with torch.enable_grad():
            hidden = student.detach().requires_grad_()
            kl, ce = _chunk_losses(hidden, teacher, targets, heads, softcaps, temperature, want_ce)
            grad_kl = torch.autograd.grad(kl, hidden, retain_graph=want_ce)[0] if kl.requires_grad else None
            grad_ce = torch.autograd.grad(ce, hidden)[0] if ce.requires_grad else None
        ctx.save_for_backward(grad_kl, grad_ce)
        return kl.detach(), ce.detach()

    @staticmethod
    def backward(ctx, d_kl, d_ce):
        grad_kl, grad_ce = ctx.saved_tensors
        grads = [d * g for d, g in ((d_kl, grad_kl), (d_ce, grad_ce)) if g is not None]
        grad = sum(grads[1:], grads[0]) if grads else None
        return grad, None, None, None, None, None, None


def token_losses(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    labels: torch.Tensor,
    head: nn.Module,
    temperature: float = 1.0,
    want_ce: bool = False,
    softcap: float | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    teacher_head: nn.Module | None = None,
    teacher_softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Summed KL and CE over the counted tokens of a micro-batch, computed ``chunk_tokens`` at a time.

    Args:
        student_hidden, teacher_hidden: final hidden states ``(B, T, H)`` (teacher: no grad; ``None``
            for CE only).
        labels: ``(B, T)`` with ``IGNORE_INDEX`` where no loss is taken (prompt, padding).
        head: the output projection (``model.get_output_embeddings()``); ``teacher_head`` and
            ``teacher_softcap`` a separate teacher model's (default: the student's).

    Returns:
        ``(kl_sum, ce_sum, n_tokens)``.
    """
    targets, mask = shifted_targets(labels)
    student = student_hidden[mask]  # (n, H): only positions that predict a counted token
    teacher = None if teacher_hidden is None else teacher_hidden[mask]
    targets = targets[mask]
    heads = (head, head if teacher_head is None else teacher_head)
    softcaps = (softcap, softcap if teacher_head is None else teacher_softcap)
    kl_sum = ce_sum = student.new_zeros((), dtype=torch.float32)
    trained_head = any(p.requires_grad for p in head.parameters())  # the teacher's head runs without grad
    for start in range(0, len(targets), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        args = (student[part], None if teacher is None else teacher[part], targets[part], heads, softcaps)
        if not student.requires_grad:
            kl, ce = _chunk_losses(*args, temperature, want_ce)
        elif trained_head:  # the head's weight needs its gradient too: recompute the chunk in backward
            kl, ce = checkpoint(_chunk_losses, *args, temperature, want_ce, use_reentrant=False)
        else:
            kl, ce = _ChunkLossWithGradient.apply(*args, temperature, want_ce)
        kl_sum, ce_sum = kl_sum + kl, ce_sum + ce
    return kl_sum, ce_sum, len(targets)


def logit_softcap(model: nn.Module) -> float | None:
    """Gemma-style ``final_logit_softcapping`` of a model's config, if any."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "final_logit_softcapping", None)


@contextmanager
def float_teacher(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as the float model it was prepared from: every quantized layer computes with its
    frozen ``W0`` (no quantizer, no adapter, no activation/KV fake quantization) inside the block."""
    modules = list(model.modules())
    for module in modules:
        module.float_forward = True
    try:
        yield
    finally:
        for module in modules:
            module.__dict__.pop("float_forward", None)


class FinalHidden:
    """Captures the decoder's final (normed) hidden states ``(B, T, H)`` of each forward.

    The loop calls the (possibly DDP/FSDP-wrapped) model as usual, asking for the logits of the last
    position only, and reads the full hidden states from here: the wrapper's hooks stay in the path
    and the full ``(B, T, V)`` logits are never computed.
    """

    def __init__(self, model: nn.Module) -> None:
        self.hidden: torch.Tensor | None = None
        self._handle = model.get_decoder().register_forward_hook(self._keep)

    def _keep(self, _module: nn.Module, _args, output) -> None:
        self.hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state

    def take(self) -> torch.Tensor:
        hidden, self.hidden = self.hidden, None
        if hidden is None:
            raise RuntimeError("no decoder output captured: was the model called?")
        return hidden

    def remove(self) -> None:
        self._handle.remove()


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
