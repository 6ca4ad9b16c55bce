# The two commands: `make demo` and `make test`. Each sets up .venv itself on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench eval clean venv node postgres prometheus chromium

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,eval,distributed]"
	$(BIN)/python -c "import torch, torchvision, pymilvus, milvus, pyiqa, lpips, dreamsim, ray.data" 2>/dev/null
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gmv demo

# The Node.js client of tests/test_server.py (built from proto/ alone); skipped without npm.
node:
	@if command -v npm >/dev/null; then cd client/node && npm ci --no-audit --no-fund --silent; \
	else echo "npm not found: the Node.js client test will be skipped"; fi

# The ledger tests start a real PostgreSQL server on loopback: Debian's postgresql package,
# installed here when missing (needs root and apt; otherwise those tests skip, saying why).
postgres:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's postgresql for the ledger tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else echo "PostgreSQL is not installed: the PostgreSQL ledger tests will be skipped"; fi; \
	fi

# promtool and a Prometheus server for tests/test_metrics.py and tests/test_deploy.py (Debian's
# prometheus package). The tests start their own Prometheus on free loopback ports, so the
# package's service (started on :9090 where systemd runs) does not matter. Where the package
# cannot be installed, those tests skip and say why.
prometheus:
	@if command -v promtool >/dev/null && command -v prometheus >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } || \
		echo "could not install Debian's prometheus package: the promtool/Prometheus tests will be skipped"; \
	else echo "promtool/prometheus not found and apt-get not usable (needs root): the promtool/Prometheus tests will be skipped"; fi

# A real headless browser for the statement page test (tests/test_statements.py): Debian's chromium.
chromium:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
		echo "could not install Debian's chromium: the statement page test will be skipped"; \
	else echo "chromium not found and apt-get not usable (needs root): the statement page test will be skipped"; fi

test: $(STAMP) node postgres prometheus chromium
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python bench/bench_engine.py
	$(BIN)/python bench/bench_server.py

# The paper's criteria C1-C4 on real data made here with no download (scikit-learn's digits, a
# conditional VAE's samples, a noise-corrupted copy), through `gmv serve` on the embedded Milvus.
# Writes docs/eval/report.md, its plots and results.json (docs/EVALUATION.md discusses them).
eval: $(STAMP)
	$(BIN)/gmv eval all --demo --out docs/eval

clean:
	rm -rf $(VENV) .gmv .pytest_cache client/node/node_modules
