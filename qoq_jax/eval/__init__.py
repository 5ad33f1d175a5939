"""Evaluation: perplexity on real text (python -m qoq_jax.eval.perplexity)."""
