"""Export: the one JAX model → StableHLO → LiteRT .tflite (prefill/decode signatures, KV cache) → .litertlm."""
