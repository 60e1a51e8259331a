"""The artifact's signature and tensor names, as the LiteRT-LM engine looks for them (its executor finds the KV
caches by these prefixes and the context by an input named `mask`). Free of JAX, so that a runtime of the artifact
(export.runtime, and its child under emulation in export.cpu_emulation) starts without it."""

TOKENS, INPUT_POS, MASK, LOGITS = "tokens", "input_pos", "mask", "logits"
K_CACHE, V_CACHE = "kv_cache_k_", "kv_cache_v_"
DECODE = "decode"


def prefill_name(length: int) -> str:
    return f"prefill_{length}"
