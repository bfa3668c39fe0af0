"""Bridges to Hugging Face causal LMs: module replacement by type, model-side log-probs,
the reward model."""
