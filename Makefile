# nano: `make demo` runs the pipeline on the embedded default; `make test` runs the whole test suite (CI runs it);
# `make check` runs the quick tests only (< 3 min), `make test-slow` the slow ones.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= runs/demo
DISTILL_DIR ?= runs/distill
QUANT_DIR ?= runs/quantize
QUANT_RUNS = rtn-b32 gptq-b32 awq-b32 rtn-b128 gptq-b128 awq-b128
# Text the corpus (the stdlib's .py sources) does not contain: Python's licence (prose) and click's exceptions (code).
OUTSIDE_TEXT = $(shell $(BIN)/python -c "import sysconfig, click, os; \
  print(os.path.join(sysconfig.get_paths()['stdlib'], 'LICENSE.txt'), os.path.join(os.path.dirname(click.__file__), 'exceptions.py'))")
# The student recipe: cut from the teacher (the vocabulary the corpus's train split uses, with merge paths; add
# --layers/--ffn-dim/... for depth and width), healed by distillation from it. docs/prune.md has the frontier these
# settings were chosen from: on a CPU's healing budget, depth and width cost more than healing gives back.
STUDENT_PRUNE ?= --vocab-size 32768
HEAL_STEPS ?= 20
HEAL_LR ?= 1e-5
# KD as Hinton et al. define it: the teacher's distribution and the data's next token, half each. On the vocabulary
# student the teacher alone has little to teach (the student starts as the teacher over its pieces); the data
# alone forgets what the teacher knows beyond the corpus. docs/prune.md measures the three.
HEAL_ALPHA ?= 0.5
HEAL_DATA = --teacher gemma3-270m --data stdlib --steps $(HEAL_STEPS) --batch-size 4 --seq-len 256 --teacher-dtype bfloat16
HEAL_RUN = --lr $(HEAL_LR) --warmup-steps 2 --eval-every 5 --eval-batches 2 $(foreach f,$(OUTSIDE_TEXT),--eval-text $(f))
STUDENT_CONTEXT ?= 1024

.PHONY: install test check test-slow demo peer distill quantize export nano-sizes clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The tests also load our Hugging Face export in transformers (PyTorch's CPU build): test-only, so not in `install`.
HF_STAMP := $(VENV)/.hf-stamp
$(HF_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,hf]'
	touch $@

test: install $(HF_STAMP)
	$(BIN)/python -m pytest -q

check: install
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: install $(HF_STAMP)
	$(BIN)/python -m pytest -q -m slow

# The whole pipeline on the embedded default, in ~30 min on two cores from a fresh clone: cut a student from the
# teacher (nano prune) and heal it by KD, quantize student and teacher to int4 (GPTQ), export and verify the two
# .litertlm bundles, bench them in the LiteRT-LM engine in alternating rounds (the teacher beside llama.cpp on its
# own Q4_K_M GGUF) and write runs/demo/report/bench.{md,png,json}.
DEMO_TEXT = $(DEMO_DIR)/heldout.txt
demo: install peer
	rm -rf $(DEMO_DIR) && mkdir -p $(DEMO_DIR)
	$(BIN)/nano info gemma3-270m
	$(BIN)/nano corpus --split heldout --max-chars 8000 --out $(DEMO_TEXT)
	$(BIN)/nano prune gemma3-270m --out $(DEMO_DIR)/pruned $(STUDENT_PRUNE)
	$(BIN)/nano distill $(HEAL_DATA) --student $(DEMO_DIR)/pruned --alpha $(HEAL_ALPHA) --lr $(HEAL_LR) --warmup-steps 2 \
	  --eval-every $(HEAL_STEPS) \
	  --eval-batches 2 --out $(DEMO_DIR)/distill
	$(BIN)/nano quantize $(DEMO_DIR)/distill/final --method gptq --samples 32 --no-eval --out $(DEMO_DIR)/student-int4
	$(BIN)/nano quantize gemma3-270m --method gptq --samples 32 --no-eval --out $(DEMO_DIR)/teacher-int4
	$(BIN)/nano-export $(DEMO_DIR)/student-int4 --out $(DEMO_DIR)/student-int4.litertlm
	$(BIN)/nano-export $(DEMO_DIR)/teacher-int4 --out $(DEMO_DIR)/teacher-int4.litertlm
	$(BIN)/nano bench $(DEMO_DIR)/teacher-int4.litertlm $(DEMO_DIR)/student-int4.litertlm --backend litert-lm \
	  --text $(DEMO_TEXT) --vs-gguf gemma3-270m --report $(DEMO_DIR)/report > /dev/null
	cat $(DEMO_DIR)/report/bench.md
	@echo "Try them side by side: $(BIN)/nano serve $(DEMO_DIR)/student-int4.litertlm $(DEMO_DIR)/teacher-int4.litertlm   (then open http://127.0.0.1:8000/)"

# llama.cpp, the peer `nano bench --vs-gguf` runs: llama-cpp-python built from source (~7 min) for this CPU's
# AVX2 / AVX-512 without AMX (code that executed AMX instructions crashed on these machines) and without -march=native.
CPU_HAS = $(shell grep -qw $(1) /proc/cpuinfo && echo ON || echo OFF)
LLAMA_CMAKE_ARGS = -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
  -DGGML_AVX512=$(call CPU_HAS,avx512f) -DGGML_AVX512_VNNI=$(call CPU_HAS,avx512_vnni) \
  -DGGML_AVX512_BF16=$(call CPU_HAS,avx512_bf16) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
  -DGGML_OPENMP=ON
PEER_STAMP := $(VENV)/.peer-stamp
peer: $(PEER_STAMP)

$(PEER_STAMP): $(STAMP)
	@echo "building llama.cpp (llama-cpp-python) from source, ~7 min on two cores"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install --quiet --no-binary llama-cpp-python -e '.[peer]'
	touch $@

# The student recipe on the embedded default, ~20 min on two cores: cut a student from the teacher (nano prune),
# cache the teacher's sparse distribution once (resumable), heal the student with KD from it and a twin with
# cross-entropy alone at equal tokens, export teacher, unhealed, CE and KD students at int4 (RTN on the way: the
# artifacts are for size and speed; quality is measured on the float models) with an on-device context of
# STUDENT_CONTEXT tokens, bench them in the LiteRT-LM engine in alternating rounds, and report them side by side:
# runs/distill/students.{md,png,json}, comparison.{md,png,json}.
STUDENTS = teacher=gemma3-270m unhealed=$(DISTILL_DIR)/student kd=$(DISTILL_DIR)/kd/final ce=$(DISTILL_DIR)/ce/final
distill: install
	rm -rf $(DISTILL_DIR) && mkdir -p $(DISTILL_DIR)/int4
	$(BIN)/nano corpus --split heldout --max-chars 40000 --out $(DISTILL_DIR)/heldout.txt
	$(BIN)/nano prune gemma3-270m --out $(DISTILL_DIR)/student $(STUDENT_PRUNE)
	$(BIN)/nano distill cache-teacher $(HEAL_DATA) --student $(DISTILL_DIR)/student --out $(DISTILL_DIR)/teacher-cache
	$(BIN)/nano distill $(HEAL_DATA) $(HEAL_RUN) --student $(DISTILL_DIR)/student --alpha $(HEAL_ALPHA) \
	  --teacher-cache $(DISTILL_DIR)/teacher-cache --out $(DISTILL_DIR)/kd
	$(BIN)/nano distill $(HEAL_DATA) $(HEAL_RUN) --student $(DISTILL_DIR)/student --loss ce --out $(DISTILL_DIR)/ce
	$(BIN)/nano report distill $(DISTILL_DIR)/kd $(DISTILL_DIR)/ce --out $(DISTILL_DIR)
	$(foreach s,$(STUDENTS),$(BIN)/nano-export $(lastword $(subst =, ,$(s))) --quant int4-b32 --no-verify \
	  --max-tokens $(STUDENT_CONTEXT) --out $(DISTILL_DIR)/int4/$(firstword $(subst =, ,$(s))).litertlm > /dev/null &&) true
	$(BIN)/nano bench $(foreach s,$(STUDENTS),$(DISTILL_DIR)/int4/$(firstword $(subst =, ,$(s))).litertlm) \
	  --backend litert-lm --prefill-tokens 128 --repeats 3 --json > $(DISTILL_DIR)/.bench.json \
	  && mv $(DISTILL_DIR)/.bench.json $(DISTILL_DIR)/bench.json
	$(BIN)/nano report students $(STUDENTS) --text $(DISTILL_DIR)/heldout.txt $(foreach f,$(OUTSIDE_TEXT),--text $(f)) \
	  --bench $(DISTILL_DIR)/bench.json --out $(DISTILL_DIR)

# The embedded teacher at int4, by each method at blocks 32 and 128, measured against the float model on held-out
# text; runs/quantize/comparison.{md,png} (~45 min on two cores).
quantize: install
	$(foreach r,$(QUANT_RUNS),$(BIN)/nano quantize gemma3-270m --method $(firstword $(subst -b, ,$(r))) \
	  --block-size $(lastword $(subst -b, ,$(r))) --out $(QUANT_DIR)/$(r) --force &&) true
	$(BIN)/nano report quantize $(addprefix $(QUANT_DIR)/,$(QUANT_RUNS)) --out $(QUANT_DIR)

# The embedded teacher as LiteRT-LM bundles: float32, and GPTQ int4-b32 (its own codes), each verified against JAX.
EXPORT_DIR ?= runs/export
export: install
	$(BIN)/nano-export gemma3-270m --out $(EXPORT_DIR)/teacher-float32.litertlm --force
	$(BIN)/nano quantize gemma3-270m --method gptq --block-size 32 --no-eval --out $(EXPORT_DIR)/gptq-b32 --force
	$(BIN)/nano-export $(EXPORT_DIR)/gptq-b32 --out $(EXPORT_DIR)/teacher-int4-b32.litertlm --force

# The Nano sizes (random weights: no checkpoint exists) as int4-b32 bundles, verified, within this machine's RAM.
nano-sizes: install
	$(BIN)/nano-export nano-1 --random-init --quant int4-b32 --out $(EXPORT_DIR)/nano-1-int4-b32.litertlm --force
	$(BIN)/nano-export nano-2 --random-init --quant int4-b32 --out $(EXPORT_DIR)/nano-2-int4-b32.litertlm --force

clean:
	rm -rf $(VENV) runs .pytest_cache
