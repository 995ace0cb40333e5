# wsss: `make demo` runs the whole pipeline on the embedded dataset; `make test` runs the tests.
# Variables: DATA (dataset root, VOC layout), RUN (outputs/RUN), METHOD (psl|stc), DEVICE (auto|cpu|cuda),
# ARGS (extra flags for the stage scripts), e.g. `make stage1 DATA=data/VOC2012 RUN=voc ARGS="--backbone resnet50"`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= data/synthetic
RUN    ?= demo
METHOD ?= psl
DEVICE ?= auto
ARGS   ?=
# OpenMP threads that spin while waiting make torch 10x slower on a small shared CPU; passive waiting costs little.
export OMP_WAIT_POLICY ?= PASSIVE
STAGE_FLAGS = --data $(DATA) --run $(RUN) --device $(DEVICE) $(ARGS)

.PHONY: setup data demo stage1 stage2 stage3 eval report check-report test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

data/synthetic/dataset.json: | setup
	$(PY) -m wsss.data.synthetic --out data/synthetic

data: data/synthetic/dataset.json

stage1: setup $(if $(filter data/synthetic,$(DATA)),data)
	$(PY) stages/stage1.py $(STAGE_FLAGS)

stage2: setup
	$(PY) stages/stage2.py $(STAGE_FLAGS)

stage3: setup
	$(PY) stages/stage3.py $(STAGE_FLAGS) --method $(METHOD)

eval: setup
	$(PY) -m wsss.eval --run $(RUN)

demo: setup data stage1 stage2 stage3 eval
	@echo "outputs: outputs/$(RUN)/ (stage1/ stage2/ stage3/; pseudo-masks in outputs/$(RUN)/stage2/pseudo/)"

report: setup
	$(PY) -m wsss.report --run $(RUN)

check-report: report
	$(PY) -m bench.check_report --run $(RUN)

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check wsss stages tests bench

# OpenCV's spectral-residual saliency (the saliency baseline) lives in opencv-contrib, which would clash
# with opencv-python-headless inside the venv: it goes into its own folder, used by the bench only.
.opencv-contrib/cv2: | setup
	$(PY) -m pip install -q --no-deps --target .opencv-contrib \
	  opencv-contrib-python-headless==$$($(PY) -m pip show opencv-python-headless | sed -n 's/^Version: //p')

bench: setup .opencv-contrib/cv2
	@export WSSS_OPENCV_CONTRIB=.opencv-contrib; \
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) -m bench.$$(basename $$b .py) || exit 1; done

clean:
	rm -rf outputs/* data/synthetic
