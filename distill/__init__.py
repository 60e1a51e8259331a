"""Distillation: teacher → student knowledge distillation (KD losses, sparse teacher logits, on-policy batches)."""
