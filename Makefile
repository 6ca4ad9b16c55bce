# The two commands: `make demo` and `make test`. Each sets up .venv itself on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench eval clean venv node

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	$(BIN)/python -c "import torch, torchvision, pymilvus, milvus, pyiqa, lpips, dreamsim" 2>/dev/null
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gmv demo

# The Node.js client of tests/test_server.py (built from proto/ alone); skipped without npm.
node:
	@if command -v npm >/dev/null; then cd client/node && npm ci --no-audit --no-fund --silent; \
	else echo "npm not found: the Node.js client test will be skipped"; fi

test: $(STAMP) node
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
