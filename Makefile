# mmgen tasks. `make demo` and `make test` set everything up on a fresh machine first.
# The constraints keep pip on the CPU torch 2.13.0 wheel (see docs/install.md); on a GPU machine
# a plain `pip install -e .` is all you need.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test bench bench-gpu params memory clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[test]"
	# torchvision's registry wheel is a CUDA build that breaks importing peft, lightning, diffusers
	# next to the CPU torch; this start-up hook fixes that in every process of the venv
	$(PY) -c "from mmgen._torchvision_fix import write_pth; print(write_pth())"
	touch $@

demo: setup  ## the main job: GILL on the toy world (CPU, a few minutes), then answers to interleaved prompts as HTML
	OMP_NUM_THREADS=1 $(VENV)/bin/mmgen fit --config configs/gill_toy.yaml
	OMP_NUM_THREADS=1 $(VENV)/bin/mmgen predict --config configs/gill_toy.yaml --config configs/predict_world_toy.yaml \
		--ckpt_path runs/gill_toy/checkpoints/last.ckpt
	@echo "open runs/predict_world_toy/index.html"

test: setup
	$(PY) -m pytest -q

bench: setup  ## training-step benchmarks (by hand; not part of the tests)
	$(PY) benchmarks/bench_fromage_step.py
	$(PY) benchmarks/bench_gill_step.py
	$(PY) benchmarks/bench_minigpt5_step.py

params: setup  ## full-size dry runs of the shipped configs
	for c in configs/fromage.yaml configs/gill.yaml configs/minigpt5_stage1.yaml configs/minigpt5_stage2.yaml; do \
		$(VENV)/bin/mmgen params --config $$c || exit 1; done

memory: setup  ## memory plans (estimates) of the shipped full-size configs at their published batch sizes
	for c in configs/fromage.yaml configs/gill.yaml configs/minigpt5_stage1.yaml configs/minigpt5_stage2.yaml; do \
		$(VENV)/bin/mmgen params --config $$c --memory || exit 1; done

bench-gpu:  ## full-size training steps on a GPU, all methods, under 8 minutes on an H100/H200 (docs/performance.md)
	mkdir -p runs
	$(PY) benchmarks/bench_gpu.py --json runs/bench_gpu.json

clean:
	rm -rf runs .cache lightning_logs
