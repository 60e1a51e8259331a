"""nano: one Gemma-3-family decoder (Flax NNX) with its configs, tokenizer, checkpoints, sampling and evaluation."""
