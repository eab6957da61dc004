# Two entry points (README): `make demo` and `make test`. Both install .venv first (idempotent).
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install model demo test test-unit bench faults soak clean

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

# An hour under load with a nightly distil, a teacher outage, a kill -9 and a rollback (issue 27);
# starts from var/demo/registry (`make demo` first). `SOAK_MINUTES=10 make soak`: the short mode.
SOAK_MINUTES ?= 60
soak: model
	$(PY) bench/soak.py --minutes $(SOAK_MINUTES) --json var/bench/soak.json --png var/bench/soak.png

clean:
	rm -rf var .pytest_cache
