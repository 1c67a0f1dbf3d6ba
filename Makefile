# `make demo` and `make test` work on a fresh machine: they create .venv when it is missing and
# install torch first from TORCH_SPEC, so pip never resolves a multi-GB CUDA build by itself.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.mmlens-installed

.PHONY: install demo test docs bench zoo zoo-v1 zoo-v2 clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mmlens demo
	@echo "mmlens is installed in $(VENV)/: run $(BIN)/mmlens (e.g. $(BIN)/mmlens --version), or 'source $(BIN)/activate' to type mmlens"

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# The suite again beside sae-lens, which caps transformer-lens below 4: .venv-sae resolves the low
# end of mmlens's ranges (TL 3.9) where .venv resolves the high end. Torch comes first and stays
# pinned by a constraints file, so neither sae-lens nor mmlens pulls a CUDA build.
SAE_VENV ?= .venv-sae
SAE_BIN := $(SAE_VENV)/bin
SAE_STAMP := $(SAE_VENV)/.mmlens-installed
SAE_CONSTRAINTS := $(SAE_VENV)/constraints.txt

.PHONY: test-sae

$(SAE_BIN)/python:
	$(PYTHON) -m venv $(SAE_VENV)
	$(SAE_BIN)/python -m pip install --quiet --upgrade pip

$(SAE_STAMP): $(SAE_BIN)/python pyproject.toml
	echo "$(TORCH_SPEC)" > $(SAE_CONSTRAINTS)
	$(SAE_BIN)/python -c "import torch" 2>/dev/null || $(SAE_BIN)/python -m pip install --quiet -c $(SAE_CONSTRAINTS) "$(TORCH_SPEC)"
	$(SAE_BIN)/python -m pip install --quiet -c $(SAE_CONSTRAINTS) -e ".[dev,sae]"
	touch $(SAE_STAMP)

test-sae: $(SAE_STAMP)
	$(SAE_BIN)/python -c "from importlib.metadata import version as v; print(*(f'{p} {v(p)}' for p in ('sae-lens', 'transformer-lens', 'transformers', 'torch')), sep=' | ')"
	$(SAE_BIN)/python -m pytest -q -p no:cacheprovider tests

# The documentation site (API pages from docstrings); --strict turns every warning into an error.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir build/site

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

# The embedded models (docs/zoo.md); the v2 twins share stages a and b through one file.
zoo: zoo-v1 zoo-v2

zoo-v1: $(STAMP)
	$(BIN)/python -m mmlens.zoo.train --out runs/zoo/tiny-shapes-llava
	$(BIN)/python -m mmlens.zoo.train --out runs/zoo/tiny-shapes-llava-bidir --image-attention bidirectional
	@echo "retrained models in runs/zoo/; copy them to src/mmlens/zoo/weights/ to ship them"

zoo-v2: $(STAMP)
	$(BIN)/python -m mmlens.zoo.train --recipe v2 --out runs/zoo/tiny-shapes-llava-v2 --shared-stages runs/zoo/v2_stages_ab.pt
	$(BIN)/python -m mmlens.zoo.train --recipe v2 --out runs/zoo/tiny-shapes-llava-v2-bidir --image-attention bidirectional --shared-stages runs/zoo/v2_stages_ab.pt
	@echo "retrained models in runs/zoo/; copy them to src/mmlens/zoo/weights/ to ship them"

clean:
	rm -rf $(VENV) $(SAE_VENV) build src/*.egg-info
