# Every target sets up its own .venv; nothing else needs to be installed first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WSSS := $(VENV)/bin/wsss
# torch is pinned to the release this project is tested with (served from a local mirror here).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

# `make reproduce` runs the synthetic dataset with the cpu preset; for the real data:
#   make reproduce DATASET=luad DATA=datasets/LUAD-HistoSeg
#   make reproduce DATASET=bcss DATA=datasets/BCSS-WSSS
# (paper settings; ImageNet / DeepLab initial weights are used when they are in checkpoints/).
DATASET ?= synthetic
DEVICE ?= auto
ifeq ($(DATASET),synthetic)
DATA ?= datasets/synthetic
# 112-px synthetic patches (the 224-px field drawn at 2 µm/px): the cpu preset trains at the patches'
# own size, so smaller patches, not resizing, keep make reproduce within minutes on 2 cores.
RUN_ARGS = --dataset luad --data $(DATA) --synth --synth-size 112 --preset cpu --run synthetic
else
DATA ?= $(error set DATA to the $(DATASET) dataset folder, e.g. make reproduce DATASET=luad DATA=datasets/LUAD-HistoSeg)
S1_INIT ?= $(wildcard checkpoints/ilsvrc-cls_rna-a1_cls1000_ep-0001.params)
S2_INIT ?= $(wildcard checkpoints/deeplab-resnet.pth.tar)
RUN_ARGS = --dataset $(DATASET) --data $(DATA) --run $(DATASET) \
	$(if $(S1_INIT),--stage1-init-weights $(S1_INIT)) $(if $(S2_INIT),--stage2-init-weights $(S2_INIT))
endif

.PHONY: venv venv-test test docs reproduce ablation quality stain bench dist dist-check clean

# The package and what it needs to run (make reproduce); the test tools are added by venv-test.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

venv-test: $(VENV)/.installed-test

# One pytest process per core (pytest-xdist): the tests run one torch thread each, so a single
# process leaves a core idle (2 cores: 6 instead of 10 minutes). TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= auto

test: venv-test
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n $(TEST_WORKERS)

# The documentation pages (docs/) as a site in build/site; --strict: a broken link or anchor fails.
docs: venv-test
	$(VENV)/bin/mkdocs build --strict

reproduce: venv
	$(WSSS) reproduce $(RUN_ARGS) --device $(DEVICE)

ablation: venv
	$(WSSS) reproduce $(RUN_ARGS) --device $(DEVICE) --ablations

# Quality on tissue no preset was tuned to (README, Beyond the paper; about 8 h on 2 CPU cores):
# random synthetic tasks 1-5 (wsss synth --task-seed: new class appearances each), 112-px patches at
# 1 µm/px, x training seeds 0-2, each with its fully supervised upper bound, one table of mean and
# worst over the 15 runs; then the default look over the same seeds, also tested on the shifted look.
SEEDS ?= 0,1,2
TASKS ?= 1,2,3,4,5
TASK_DATA ?= datasets/synthetic-tasks
SHIFTED ?= datasets/synthetic-shifted
quality: venv
	$(WSSS) reproduce --dataset luad --data $(TASK_DATA) --synth --synth-tasks $(TASKS) --synth-size 112 \
		--synth-mpp 1 --synth-counts 800,60,80 --preset cpu --run synthetic-tasks --seeds $(SEEDS) --upper-bound \
		--no-figures --device $(DEVICE)
	$(WSSS) reproduce --dataset luad --data $(SHIFTED) --synth --synth-size 112 --synth-look shifted --preset cpu \
		--run synthetic-shifted --seeds $(SEEDS) --upper-bound --no-figures --device $(DEVICE)
	$(WSSS) reproduce $(RUN_ARGS) --seeds $(SEEDS) --upper-bound --transfer $(SHIFTED) --device $(DEVICE)

# The stain transfer matrix (docs/stain.md): the cpu preset trained on the default synthetic look
# (make reproduce's 1000/100/100 patches of 112 px) with each configuration, tested on every
# stain/scanner look; about 12 min per configuration and seed on one core; a rerun continues. Then the
# presets' reinhard-set on the none configuration's weights (it trains exactly as none).
STAIN_ROOT ?= runs/stain
STAIN_CONFIGS ?= none,reinhard,reinhard+scanner,reinhard+scanner2,reinhard-mean+scanner
stain: venv
	$(PY) bench/stain_transfer.py --root $(STAIN_ROOT) --seeds $(SEEDS) --configs $(STAIN_CONFIGS) --counts 1000,100,100
	$(PY) bench/colour_alignment.py --root $(STAIN_ROOT) --seeds $(SEEDS)

bench: venv
	@for script in bench/stage1_speed.py bench/pm_speed.py bench/stage2_speed.py bench/predict_speed.py \
		bench/precision.py; do \
		if [ -f $$script ]; then echo "== $$script"; $(PY) $$script || exit 1; fi; \
	done

# The wheel and sdist (`python -m build`), then each installed into a fresh venv (torch pinned as above)
# and run from outside the source tree: wsss --help, wsss --version and a tiny predict
# (scripts/dist_check.py). 3 minutes here, most of them installing torch into the fresh venv.
DIST_VENV := build/dist-check-venv
dist: venv
	rm -rf dist
	$(PY) -m pip install --quiet build
	$(PY) -m build --outdir dist .

dist-check: dist
	rm -rf $(DIST_VENV) build/dist-check
	$(PYTHON) -m venv $(DIST_VENV)
	$(DIST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(DIST_VENV)/bin/python -m pip install --quiet $(TORCH_PINS)
	for dist in dist/wsss-*.whl dist/wsss-*.tar.gz; do \
		echo "== $$dist"; rm -rf build/dist-check; \
		$(DIST_VENV)/bin/python -m pip install --quiet --force-reinstall --no-deps "$$dist" || exit 1; \
		$(DIST_VENV)/bin/python -m pip install --quiet "$$dist" || exit 1; \
		(cd build && PATH="$(CURDIR)/$(DIST_VENV)/bin:$$PATH" && wsss --help >/dev/null && wsss --version \
			&& python $(CURDIR)/scripts/dist_check.py dist-check) || exit 1; \
	done

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info
