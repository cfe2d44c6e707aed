"""GPTQ-style token perplexity over a text file.

The text is tokenized as one stream (no special tokens added) and cut into non-overlapping windows of
``seq_len`` tokens (stride = ``seq_len``; the tail shorter than a window is dropped). Each window is
scored independently; the first token of a window is not predicted. Perplexity is token-weighted:
``exp(sum of NLL over predicted tokens / number of predicted tokens)``. For a model whose tokenizer puts
a BOS before every text (``bos_token_id``), each window is fed as ``[BOS] + window`` and the same tokens
are predicted: such models are far worse without it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@dataclass
class PerplexityResult:
    perplexity: float
    nll_sum: float
    tokens: int  # predicted tokens
    windows: int
    seq_len: int
    source: str

    def describe(self) -> str:
        return (
            f"token-level ppl, {self.windows} non-overlapping windows of {self.seq_len} tokens "
            f"(stride {self.seq_len}), {self.tokens} predicted tokens of {self.source}"
        )

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    token_ids: list[int] | torch.Tensor,
    seq_len: int = 2048,
    max_windows: int | None = None,
    source: str = "text",
    batch_size: int = 1,
    progress: bool = True,
    bos_token_id: int | None = None,
) -> PerplexityResult:
    """Token-weighted perplexity of ``model`` on ``token_ids`` (see module docstring)."""
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    windows = ids.numel() // seq_len
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows < 1:
        raise ValueError(f"{source}: {ids.numel()} tokens is less than one window of seq_len={seq_len}")
    ids = ids[: windows * seq_len].view(windows, seq_len)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum, tokens = 0.0, 0
    for start in tqdm(range(0, windows, batch_size), desc="perplexity", disable=not progress, leave=False):
        batch = ids[start : start + batch_size].to(device)
        if bos_token_id is None:
            logits = model(input_ids=batch).logits.float()[:, :-1]  # (B, T - 1, V)
        else:
            with_bos = F.pad(batch, (1, 0), value=bos_token_id)
            logits = model(input_ids=with_bos).logits.float()[:, 1:-1]
        nll = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        nll_sum += nll.item()
        tokens += batch[:, 1:].numel()
    model.train(was_training)
    return PerplexityResult(math.exp(nll_sum / tokens), nll_sum, tokens, windows, seq_len, source)
