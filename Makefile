# Every target creates the venv on first use, so a fresh clone needs only `make demo` / `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check-all e2e e2e-netns bench bench-quick clean venv
BENCH_STAMP := $(VENV)/.bench-installed

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@command -v zstd >/dev/null || { echo "zstd is required (apt-get install zstd)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# Two workers: the suite waits on processes, pipes and timeouts as much as it computes, and each
# test has its own hosts (directories, ports, namespaces), so two at a time halve its wall time.
# check-all stays serial: its soak cases print figures that a neighbour would skew.
test: $(STAMP)
	$(BIN)/pytest -q -n 2

check-all: $(STAMP)
	$(BIN)/pytest -q -m ""

demo: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m harness.demo

e2e: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m harness.e2e

# Every method live across two network namespaces, a veth pair shaped to 1 Gbit/s (root; skips otherwise).
e2e-netns: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m harness.e2e_netns

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench,test]'
	touch $(BENCH_STAMP)

# The full run (1 GiB VMs, 5 repetitions); bench-quick is the 256 MiB version.
bench: $(BENCH_STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m bench.run $(BENCH_ARGS)

bench-quick: $(BENCH_STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m bench.run --quick $(BENCH_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
