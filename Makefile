# The two set-up commands of the README. Each creates .venv when it is missing.
#   make demo   the main job end to end on a simulated All-of-Us-like cohort
#   make test   the test suite (CPU, a few minutes)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out
DEMO_SUBJECTS ?= 20000

.PHONY: demo test venv clean

venv: $(STAMP)

# torch first, by exact version: that takes the CPU build from disk; anything else
# would let peft/accelerate pull a CUDA build of several GB.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 -q tests

demo: $(STAMP)
	$(VENV)/bin/ehr-prs simulate --out $(DEMO_DIR)/cohort --subjects $(DEMO_SUBJECTS) --seed 0

clean:
	rm -rf $(VENV) $(DEMO_DIR)
