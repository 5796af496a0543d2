# One command per job; each (re)creates the virtual environment idempotently.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU machines get the CPU torch build and never torchvision (it breaks imports there).
TORCH_SPEC ?= torch==2.13.0
SAM2_SPEC ?= sam2==1.1.0
NNUNET_SPEC ?= nnunetv2==2.8.1 dynamic-network-architectures==0.4.4
NNUNET_STAMP := $(VENV)/.installed-nnunet

.PHONY: install install-nnunet train test test-all lint sweep-loss sweep-freeze report wandb-sync bench

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	SAM2_BUILD_CUDA=0 $(PY) -m pip install -q -e '.[dev]'
	# sam2 metadata requires torchvision (used only by modules we never import), and its
	# isolated build would pull a CUDA torch: install it against the torch above.
	$(PY) -m pip install -q setuptools wheel
	SAM2_BUILD_CUDA=0 $(PY) -m pip install -q --no-deps --no-build-isolation "$(SAM2_SPEC)"
	touch $(STAMP)

install: $(STAMP)

# The nnU-Net v2 row (sa2va.nnunet, ~560 MB more): not part of `install`, `test-all` needs it.
# Its two packages go in without dependencies (see the nnunet extra in pyproject.toml).
$(NNUNET_STAMP): $(STAMP)
	SAM2_BUILD_CUDA=0 $(PY) -m pip install -q -e '.[dev,nnunet-deps]'
	$(PY) -m pip install -q --no-deps $(NNUNET_SPEC)
	touch $(NNUNET_STAMP)

install-nnunet: $(NNUNET_STAMP)

train: $(STAMP)
	$(PY) -m sa2va.train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

test-all: $(STAMP) $(NNUNET_STAMP)
	$(PY) -m pytest -q -m "" $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check sa2va tests scripts
	$(PY) -m ruff format --check sa2va tests scripts

sweep-loss: $(STAMP)
	$(PY) -m sa2va.train -m experiment=ablate_loss $(ARGS)

sweep-freeze: $(STAMP)
	$(PY) -m sa2va.train -m experiment=ablate_freeze $(ARGS)

# make report SWEEP=outputs/train/multiruns/<sweep dir>
report: $(STAMP)
	$(PY) -m sa2va.compare $(SWEEP) $(ARGS)

wandb-sync: $(STAMP)
	bash scripts/wandb_sync.sh $(ARGS)

bench: $(STAMP)
	$(PY) -m sa2va.bench $(ARGS)
