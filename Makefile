# Two entry points (README): `make demo` and `make test`. Both install .venv first (idempotent).
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install model demo test test-unit bench faults clean

install:
	@bash scripts/install.sh

model: install
	@.venv/bin/triage model

demo: model
	.venv/bin/triage demo

test: model
	$(PY) -m pytest -q -p no:cacheprovider

test-unit: install
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

bench: model
	$(PY) bench/throughput.py
	$(PY) bench/latency.py
	$(PY) bench/escalation.py

faults: model
	$(PY) bench/faults.py --json var/bench/faults.json

clean:
	rm -rf var .pytest_cache
