"""Perplexity against a token-by-token reference."""

import math

import pytest
import torch

from conftest import tiny_model
from dlqat.eval import perplexity


@pytest.mark.parametrize("bos", [None, 7])
def test_matches_naive_token_loop(bos):
    """With a BOS (models whose tokenizer adds one) each window is read after it; the same tokens are scored."""
    model = tiny_model("llama")
    ids = torch.randint(0, 300, (70,))
    result = perplexity(model, ids, seq_len=16, progress=False, batch_size=3, bos_token_id=bos)
    nll, count = 0.0, 0
    for w in range(70 // 16):
        window = ids[w * 16 : (w + 1) * 16]
        fed = window if bos is None else torch.cat([torch.tensor([bos]), window])
        shift = 0 if bos is None else 1
        logprobs = torch.log_softmax(model(input_ids=fed[None]).logits[0].double(), -1)
        for t in range(1, 16):
            nll -= logprobs[t - 1 + shift, window[t]].item()
            count += 1
    assert result.windows == 4 and result.tokens == count == 60
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert "stride 16" in result.describe()
    assert perplexity(model, ids, seq_len=16, max_windows=2, progress=False).windows == 2


def test_too_short_text_is_an_error():
    with pytest.raises(ValueError, match="seq_len=64"):
        perplexity(tiny_model("llama"), torch.arange(10), seq_len=64, progress=False)
