PY ?= python

.PHONY: setup data test test-fast run tiny-pretrain paper-tiny bench-quick bench-merge bench-finetune bench-calibrate bench-tiny bench-tiny-t5 bench-tiny-2024 bench-tiny-data bench-data bench-memory bench-vit-b32 bench-vit-b32-imported bench-vit-l14 bench-flan-t5 lint \
	gpu-wheels gpu-check

setup:          ## install fusion_bench and everything it needs (torch 2.14.1 CPU/CUDA wheel from the pin)
	$(PY) -m pip install -e '.[dev]'

ROOT ?= ~/data
DATA ?= eight_tasks glue

data:           ## fetch the eight image tasks and GLUE into ROOT (paths.data_root) in the layouts the loaders read; resumable
	for b in $(DATA); do $(PY) -m fusion_bench.data.prepare $$b --root $(ROOT) || exit $$?; done

test:           ## the whole test suite on every core (pytest-xdist; < 15 min on 2 cores)
	$(PY) -m pytest -q -n auto

test-fast:      ## everything but the end-to-end fine-tuning tests
	$(PY) -m pytest -q -m "not slow"

run:            ## the default offline experiment
	$(PY) run.py

tiny-pretrain:  ## re-create fusion_bench/assets/tiny_clip.safetensors (deterministic)
	$(PY) -m fusion_bench.clip.tiny_pretrain

.PHONY: tiny-t5-pretrain
tiny-t5-pretrain: ## re-create fusion_bench/assets/tiny_t5.safetensors + tiny_t5.json (deterministic, ~2.5 min on one core)
	$(PY) -m fusion_bench.t5.tiny_pretrain

bench-quick:    ## the headline figures in < 2 min: s/step, cached rerun, search cost, TIES ViT-B/32, eval images/s
	$(PY) -m fusion_bench.benchmarks.quick

bench-merge:    ## merge time and peak memory, eight ViT-B/32- and ViT-L/14-sized task vectors (WUDI: 30 of 300 steps on L/14)
	$(PY) -m fusion_bench.benchmarks.merge --arch vit_b32
	$(PY) -m fusion_bench.benchmarks.merge --arch vit_l14 --methods task_arithmetic ties awd_ta awd_ties tsv_merging \
	    iso_c iso_cts wudi_30_steps consensus_ta consensus_ties tall_masks emr breadcrumbs magmax model_stock

bench-finetune: ## fine-tuning and evaluation images/s, memory and FLOPs per mode of ViT-B/32 (bf16 on a GPU; fp32 on a CPU)
	$(PY) -m fusion_bench.benchmarks.finetune --arch vit_b32 --json outputs/bench_finetune/vit_b32.json

MODES ?= standard,linear,attention,linear_layers,lora,l_lora
# method lists: names of conf/method/*.yaml, the keys of the table fusion_bench.merging.METHODS
# (tests/test_method_table.py checks every name here, and that bench-tiny runs every method of the table)
METHODS ?= task_arithmetic,ties,dare,dare_ties,awd_ta,awd_ties
SWEEP = -m finetune=$(MODES) method=$(METHODS) method.scaling_coef=search

METHODS_2024 ?= tsv_merging,iso_c,iso_cts,wudi,consensus_ta,consensus_ties,tall_masks,emr,breadcrumbs,magmax,model_stock,cart,pcb_merging,ace_merging
MODES_2024 ?= standard,attention

bench-calibrate: ## the tiny benchmark's calibration probe: zero-shot, individual, WA / TA / TIES for one recipe (CAL_ARGS="--lr 1e-3"; default: the tiny_clip recipe)
	$(PY) -m fusion_bench.benchmarks.calibrate $(CAL_ARGS)

bench-tiny:     ## every method of the table on tiny_eight: every mode x METHODS and weight averaging, partial linearization (l_lora), then the 2024-2026 methods and those that look at data (CPU)
	$(PY) run.py $(SWEEP)
	$(PY) run.py -m finetune=$(MODES) method=weight_average
	$(PY) run.py -m finetune=l_lora method=partial_linearization
	$(MAKE) bench-tiny-2024
	$(MAKE) bench-tiny-data

bench-tiny-2024: ## the data-free methods of 2024-2026 on tiny_eight, each with its paper's defaults (CPU)
	$(PY) run.py -m finetune=$(MODES_2024) method=$(METHODS_2024)

METHODS_DATA ?= regmean,regmean_plusplus,lot_merging,fisher_merging,adamerging,adamerging_pp
MODES_DATA ?= standard,attention

ADARANK_STEPS ?= 500   # AdaMerging's step count: the official 10000 (ViT-B/32) take hours on a CPU

bench-tiny-data: ## RegMean (++), LOT, Fisher merging, AdaMerging (++), AdaRank on tiny_eight; LoraHub on the l_lora and lora fine-tunes
	$(PY) run.py -m finetune=$(MODES_DATA) method=$(METHODS_DATA)
	$(PY) run.py -m finetune=$(MODES_DATA) method=adarank,adarank_cart ++method.coefficients.steps=$(ADARANK_STEPS)
	$(PY) run.py -m finetune=l_lora,lora ++finetune.task_vector=adapters method=lorahub

# ---- the partial-linearization paper's table on tiny_glue (docs/tiny-t5.md), then one report. L-LoRA is evaluated
# through its linearized model, as in the paper; RegMean and Fisher need a plain model (not l_lora), WUDI's official
# key set has no LoRA adapter (keys=all_2d there).
T5_DIR ?= outputs/bench_tiny_t5/$(PAPER_STAMP)
T5_ARGS ?=      # overrides for every run, e.g. "paths.root=/tmp/store" or a smoke test "model.train.steps=4"
T5 = $(PY) run.py -m model=tiny_t5 taskpool=tiny_glue $(T5_ARGS)
METHODS_T5 ?= task_arithmetic,ties,dare_ties
METHODS_T5_DEFAULTS ?= weight_average,tsv_merging,iso_cts
L_LORA = finetune=l_lora finetune.evaluate=linearized

bench-tiny-t5:  ## the tiny T5 on tiny_glue: full / LoRA / L-LoRA fine-tunes x WA, TA, TIES, ..., LoraHub; cosine -> t5_report.md (CPU)
	$(T5) finetune=standard,lora method=$(METHODS_T5) method.scaling_coef=search hydra.sweep.dir=$(T5_DIR)/search
	$(T5) $(L_LORA) method=$(METHODS_T5) method.scaling_coef=search hydra.sweep.dir=$(T5_DIR)/search_l_lora
	$(T5) finetune=standard,lora method=$(METHODS_T5_DEFAULTS),wudi,regmean,regmean_plusplus,lot_merging hydra.sweep.dir=$(T5_DIR)/defaults
	$(T5) finetune=standard,lora method=fisher_merging method.statistics.target=label hydra.sweep.dir=$(T5_DIR)/fisher
	$(T5) $(L_LORA) method=$(METHODS_T5_DEFAULTS) hydra.sweep.dir=$(T5_DIR)/defaults_l_lora
	$(T5) $(L_LORA) method=wudi method.keys=all_2d hydra.sweep.dir=$(T5_DIR)/wudi_l_lora
	$(T5) finetune=lora ++finetune.task_vector=adapters method=lorahub hydra.sweep.dir=$(T5_DIR)/lorahub
	$(T5) $(L_LORA) method=lorahub hydra.sweep.dir=$(T5_DIR)/lorahub_l_lora
	$(T5) stage=analyze analysis=cosine finetune=standard hydra.sweep.dir=$(T5_DIR)/cosine
	$(T5) stage=analyze analysis=cosine finetune=lora,l_lora ++finetune.task_vector=adapters \
	    hydra.sweep.dir=$(T5_DIR)/cosine_adapters
	$(PY) -m fusion_bench.reporting.t5_report $(T5_DIR)

# ---- every experiment of the seed papers on tiny_eight, then one report (README "The seed papers' experiments")
PAPER_STAMP := $(shell date +%Y-%m-%d_%H-%M-%S)
PAPER_DIR ?= outputs/paper_tiny/$(PAPER_STAMP)
PAPER_PAIR ?= [textures,orientation]
PAPER_FT_MODES ?= standard,linear,attention,linear_layers,lora
PAPER_ARGS ?=   # overrides for every run, e.g. a smoke test: "taskpool.tasks=[colors,position] model.train.steps=4"
ANALYZE = $(PY) run.py -m stage=analyze $(PAPER_ARGS)

paper-tiny:     ## negation, kernel, heads, loss landscape, pairwise, cosine, disentanglement, num_tasks on tiny_eight + paper_report.md (CPU, hours)
	$(PY) run.py -m stage=finetune finetune=$(PAPER_FT_MODES) $(PAPER_ARGS)
	$(PY) run.py -m stage=finetune finetune=standard finetune.train_head=true $(PAPER_ARGS)
	$(ANALYZE) analysis=negation finetune=$(PAPER_FT_MODES) hydra.sweep.dir=$(PAPER_DIR)/negation
	$(ANALYZE) analysis=kernel finetune=standard,attention,linear_layers,lora hydra.sweep.dir=$(PAPER_DIR)/kernel
	$(ANALYZE) analysis=heads finetune=standard "analysis.tasks=$(PAPER_PAIR)" hydra.sweep.dir=$(PAPER_DIR)/heads
	$(ANALYZE) analysis=loss_landscape finetune=standard,linear,attention "analysis.tasks=$(PAPER_PAIR)" \
	    hydra.sweep.dir=$(PAPER_DIR)/loss_landscape
	$(ANALYZE) analysis=pairwise finetune=standard method=task_arithmetic,ties hydra.sweep.dir=$(PAPER_DIR)/pairwise
	$(ANALYZE) analysis=cosine finetune=standard,linear,attention hydra.sweep.dir=$(PAPER_DIR)/cosine
	$(ANALYZE) analysis=disentanglement finetune=standard,linear,attention "analysis.tasks=$(PAPER_PAIR)" \
	    hydra.sweep.dir=$(PAPER_DIR)/disentanglement
	$(ANALYZE) analysis=num_tasks finetune=standard,linear,attention method=task_arithmetic \
	    hydra.sweep.dir=$(PAPER_DIR)/num_tasks
	$(PY) -m fusion_bench.reporting.paper_report $(PAPER_DIR)

bench-data:     ## statistics and AdaMerging step cost on ViT-B/32 (random weights, 224 px images; CPU or GPU)
	$(PY) -m fusion_bench.benchmarks.data_methods

bench-memory:   ## peak host memory of stage=all / stage=evaluate, eight tasks, ViT-B/32 and ViT-L/14 (random weights, fixture data)
	$(PY) -m fusion_bench.benchmarks.memory --arch vit_b32 --methods task_arithmetic adamerging fisher_merging regmean \
		--json outputs/bench/memory_vit_b32.json
	$(PY) -m fusion_bench.benchmarks.memory --arch vit_l14 --json outputs/bench/memory_vit_l14.json

# ---- one prepared GPU check (README "The GPU check"): wheels here, the check on the GPU machine (no network there)
WHEEL_DIR ?= .whl
GPU_CHECK_ARGS ?=   # e.g. "--out $$OUT/gpu_check.json", "--only 'finetune/vit_b32/*'", "--deadline-s 240"

gpu-wheels:     ## wheels (Python 3.12, manylinux x86_64) of what the GPU machine lacks: open_clip_torch, ftfy, hydra-core, omegaconf, ...
	$(PY) -m fusion_bench.benchmarks.gpu --download-wheels --wheel-dir $(WHEEL_DIR)

gpu-check:      ## < 5 min on one GPU, from the source tree: fine-tune / eval images/s, merge times, bf16 logits -> outputs/gpu_check/*.json
	PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH} $(PY) -m fusion_bench.benchmarks.gpu --wheel-dir $(WHEEL_DIR) $(GPU_CHECK_ARGS)

bench-vit-b32:  ## the papers' protocol on ViT-B/32 (needs weights in paths.cache_dir and data in paths.data_root)
	$(PY) run.py $(SWEEP) model=vit_b32 taskpool=eight_tasks trainer=gpu

bench-vit-b32-imported: ## every method on the eight ViT-B/32 fine-tunes you already have (FINETUNED_FROM=/ckpts/clip-vit-base-patch32_{task})
	@test -n "$(FINETUNED_FROM)" || { echo "make bench-vit-b32-imported: set FINETUNED_FROM, e.g. FINETUNED_FROM=/ckpts/clip-vit-base-patch32_{task}" >&2; exit 2; }
	$(PY) run.py -m method=$(METHODS) method.scaling_coef=search model=vit_b32 taskpool=eight_tasks trainer=gpu \
	    "finetuned_from='$(FINETUNED_FROM)'"

bench-vit-l14:
	$(PY) run.py $(SWEEP) model=vit_l14 taskpool=eight_tasks trainer=gpu model.train.batch_size=64

bench-flan-t5:  ## Flan-T5-base on GLUE: standard, LoRA and L-LoRA fine-tunes
	$(PY) run.py -m model=flan_t5_base taskpool=glue finetune=standard,lora,l_lora method=$(METHODS) \
	    method.scaling_coef=search trainer=gpu

lint:
	ruff check fusion_bench tests run.py
