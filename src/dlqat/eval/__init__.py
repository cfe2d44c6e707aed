"""Evaluation: perplexity and reports."""

from dlqat.eval.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
