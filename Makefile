# Two commands do everything on a fresh machine (Debian/Ubuntu, Python 3.11, root for apt):
#   make demo   the main job: offline multi-domain benchmark, SMAT vs P>M>F vs pre-trained, report
#   make test   the test suite (unit, 2-rank distributed on CPU, real SLURM, end-to-end)
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup apt-lists slurm demo test test-all lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# The offline images come from `apt-get download` (no install), which needs the package lists.
apt-lists:
	@ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1 || apt-get update -q || sudo apt-get update -q

slurm:
	bash slurm/install.sh

demo: setup apt-lists
	$(VENV)/bin/smat-demo

lint: setup
	$(VENV)/bin/ruff check .

test: setup apt-lists slurm
	$(VENV)/bin/python -m pytest -q --durations=20

test-all: setup slurm
	$(VENV)/bin/python -m pytest -q -m ''

clean:
	rm -rf $(VENV) .cache runs
