PY ?= python

.PHONY: setup test test-fast run tiny-pretrain bench-merge lint

setup:          ## install fusion_bench and everything it needs (torch 2.14.1 CPU/CUDA wheel from the pin)
	$(PY) -m pip install -e '.[dev]'

test:           ## the whole test suite (< 15 min on 2 cores)
	$(PY) -m pytest -q

test-fast:      ## everything but the end-to-end fine-tuning tests
	$(PY) -m pytest -q -m "not slow"

run:            ## the default offline experiment
	$(PY) run.py

tiny-pretrain:  ## re-create fusion_bench/assets/tiny_clip.safetensors (deterministic)
	$(PY) -m fusion_bench.models.tiny_pretrain

bench-merge:    ## merge time and peak memory, eight ViT-B/32- and ViT-L/14-sized task vectors
	$(PY) benchmarks/bench_merge.py --arch vit_b32
	$(PY) benchmarks/bench_merge.py --arch vit_l14

lint:
	ruff check fusion_bench tests run.py
