# prunelab: two commands from a fresh clone — `make demo` and `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
EXTRAS  ?= notebooks,test,hf
STAMP   := $(VENV)/.prunelab-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lab figures bench sysdeps present

$(STAMP): pyproject.toml constraints-cpu.txt tools/install.sh
	bash tools/install.sh $(VENV) $(EXTRAS)
	@touch $(STAMP)

install: $(STAMP)

# Debian packages the full test suite uses (real Fashion-MNIST files, Chromium for browser tests).
# Needs root and apt; skipped quietly elsewhere (those tests then skip with a message).
sysdeps:
	@bash tools/sysdeps.sh

demo: install
	$(PY) -m prunelab.zoo ensure mlp mnist1d --seed 0
	@mkdir -p build/notebooks
	$(VENV)/bin/papermill --cwd notebooks notebooks/00_tour.ipynb build/notebooks/00_tour.ipynb
	@echo
	@echo "Figures written to figures/:"; ls figures | grep -v '^\.' | sed 's/^/  /'
	@echo "Open the notebooks in JupyterLab with:  make lab"

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow and not e2e" $(PYTEST_ARGS)

lab: install
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

figures: install
	@mkdir -p build/notebooks
	for nb in notebooks/*.ipynb; do \
	  $(VENV)/bin/papermill --cwd notebooks -p FAST 0 "$$nb" "build/notebooks/$$(basename $$nb)" || exit 1; \
	done

NB   ?= notebooks/01_loss_modelling.ipynb
PORT ?= 8866
FAST ?= 0
# Lecture mode: NB as a Voilà dashboard on 127.0.0.1 only (code hidden, widgets live). Voilà runs
# the whole notebook before the first page appears: use FAST=1 unless the sweep store is filled.
present: install
	PRUNELAB_FAST=$(FAST) $(VENV)/bin/voila $(NB) --Voila.ip=127.0.0.1 --port=$(PORT) --token

bench: install
	@# the BackPACK peer: its package declares torchvision (a CUDA torch here), it runs without
	-$(PY) -m pip install -q --no-deps backpack-for-pytorch einops unfoldNd
	$(PY) -m benchmarks
