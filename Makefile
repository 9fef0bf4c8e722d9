# DiReDi fleet: every target does its own set-up, so `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SCENARIO ?= scenarios/digits-two-users.json
RESULTS ?= results

# The integration tests use a real PostgreSQL on loopback and start their own mosquitto, redis-server,
# nginx and prometheus processes; scripts/services.sh installs (apt) them all and starts PostgreSQL.
TEST_POSTGRES_URL := postgresql://diredi:diredi-test-only@127.0.0.1:5432/diredi
export DIREDI_TEST_POSTGRES_URL ?= $(TEST_POSTGRES_URL)

.PHONY: setup services demo sim test test-fast test-matrix bench lint format clean

# The project's own modules compiled to bytecode (skipped when up to date): an editable install leaves
# them as sources, and where PYTHONDONTWRITEBYTECODE is set every process would compile them afresh (the
# suite starts a few hundred: `diredi` commands, services, device daemons).
setup: $(STAMP)
	@$(BIN)/python -m compileall -q -j 0 cloud wire broker device_firmware_py testsupport examples >/dev/null

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "DiReDi needs Python 3.11 or newer (set PYTHON=...)"; exit 1; }
	$(PYTHON) scripts/make_venv.py $(VENV) cloud,device,dev
	touch $(STAMP)

# The main job: the whole system (embedded: SQLite, the embedded broker, an ingest, a Celery worker, the
# API) and one device daemon per scenario user, running the DiReDi loop end to end.
demo: setup
	mkdir -p $(RESULTS)
	$(BIN)/diredi demo --scenario $(SCENARIO) --out $(RESULTS)/demo.json

# The learning loop simulated in-process, with every baseline of DESIGN §3 (oracle, raw upload, DP).
sim: setup
	mkdir -p $(RESULTS)
	$(BIN)/diredi sim --scenario $(SCENARIO) --out $(RESULTS)/sim.json --plot $(RESULTS)/sim.png

services:
	scripts/services.sh postgres >/dev/null
	scripts/services.sh mosquitto systemd redis nginx prometheus

test: setup services
	$(BIN)/python -m pytest -q

test-fast: setup services
	$(BIN)/python -m pytest -q -m "not slow"

# The learning loop's tests under several CPU kernels and fixture seeds (CELLS="avx2:3 default:5 ...").
test-matrix: setup services
	scripts/loop_matrix.sh $(CELLS)

bench: setup services
	scripts/services.sh wrk
	$(BIN)/python -m bench.run_all

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache $(RESULTS)
