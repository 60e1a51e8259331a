#!/usr/bin/env python3
"""Make `hf_tiny_logits.npz`: Hugging Face transformers' logits for the tiny checkpoint of `tests/hf_tiny.py`.

This is a reference tool, not part of the pipeline or its tests: it needs PyTorch and transformers, which the
project does not depend on. The real `Gemma3ForCausalLM` is the independent reference that
`tests/test_safetensors_import.py` holds `nano.safetensors_import` and our decoder to.

Set up its venv outside the repository (CPU torch; do not let pip pull a CUDA build)::

    python3 -m venv /work/hf-venv
    /work/hf-venv/bin/pip install torch==2.13.0 transformers safetensors numpy sentencepiece

and run from the repository root::

    /work/hf-venv/bin/python tests/golden/make_hf_golden.py [--out tests/golden/hf_tiny_logits.npz]

It writes the checkpoint with `write_tiny_hf_checkpoint` (the same function the test calls, seeded, so both see
the same weights), loads it with `Gemma3ForCausalLM.from_pretrained(..., torch_dtype=float32,
attn_implementation="eager")`, checks that every weight was loaded from the files (none initialised at random,
none left over) and that transformers read the layer pattern as written, then runs `hf_tiny.TOKENS` (24 ids,
three times the sliding window) and stores:

    logits        float32 [1, 24, 512]
    tokens        int32 [1, 24]
    transformers  str, the version used;  torch  str
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))

import hf_tiny  # noqa: E402  (tests/hf_tiny.py: numpy, sentencepiece and safetensors only)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "hf_tiny_logits.npz")
    args = parser.parse_args()

    import torch
    import transformers
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(0)  # nothing should be random; this only makes a stray random init repeatable
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = hf_tiny.write_tiny_hf_checkpoint(Path(tmp) / "tiny")
        model, info = Gemma3ForCausalLM.from_pretrained(
            ckpt, torch_dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        sys.exit(f"transformers did not load the checkpoint exactly: {problems}")
    model.eval()

    # The weights transformers holds are the ones written (tied head included), and its layer pattern is ours.
    written = hf_tiny.tiny_hf_tensors()
    state = model.state_dict()
    for name, value in written.items():
        np.testing.assert_array_equal(state[name].numpy(), value, err_msg=name)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "head not tied"
    expected_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(hf_tiny.LAYERS)]
    assert list(model.config.layer_types) == expected_types, model.config.layer_types
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [hf_tiny.WINDOW, None] * 2

    tokens = torch.tensor([hf_tiny.TOKENS], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=tokens, use_cache=False).logits.float().numpy()
    assert logits.shape == (1, len(hf_tiny.TOKENS), hf_tiny.VOCAB), logits.shape

    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, logits=logits.astype(np.float32), tokens=tokens.numpy().astype(np.int32),
             transformers=np.array(transformers.__version__), torch=np.array(torch.__version__))
    print(f"wrote {args.out}: logits {logits.shape}, |logit| max {np.abs(logits).max():.3f}, "
          f"transformers {transformers.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
