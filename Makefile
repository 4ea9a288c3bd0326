# onelane: every target runs the same commands as the README and docker-compose.yml.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
# the lane `make worker` / `make up` consume, and where Flower and the Prometheus exporter listen
LANE          ?= $(or $(ONELANE_QUEUE),serial)
FLOWER_PORT   ?= 5555
FLOWER_ADDRESS ?= 127.0.0.1
METRICS_PORT  ?= 9808
METRICS_BIND  ?= 127.0.0.1

.PHONY: help install test test-fast demo worker beat flower flower-auth exporter up bench clean

help:
	@echo "make demo       run the main job: many producers, one worker, a fragile API, a summary"
	@echo "make test       install into $(VENV) and run the whole test suite (make test-fast: unit + redis)"
	@echo "make worker     one worker on lane LANE (default: ONELANE_QUEUE or serial), e.g. make worker LANE=erp"
	@echo "make beat       beat: the reaper of every lane"
	@echo "make flower     Flower on $(FLOWER_ADDRESS):$(FLOWER_PORT) (needs FLOWER_BASIC_AUTH=user:password)"
	@echo "make exporter   Prometheus metrics on $(METRICS_BIND):$(METRICS_PORT)/metrics (onelane exporter)"
	@echo "make up         worker + beat + flower in the foreground; Ctrl-C stops all three"
	@echo "                (worker, beat, flower, exporter, up: against REDIS_URL, default redis://localhost:6379/0)"
	@echo "make bench      onelane beside bare Celery, measured in one run"
	@echo "make install    create $(VENV) and install onelane with its test tools"
	@echo "make clean      remove $(VENV) and build leftovers"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

# two test files at a time (pytest-xdist): most of the suite waits on real processes, not the CPU
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# the inner loop: pure logic and the private Redis, no celery processes (under a minute)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "unit or redis"

demo: $(STAMP)
	$(BIN)/python -m demo.run

worker: $(STAMP)
	$(BIN)/celery -A tasks worker -Q $(LANE) -n $(LANE)@%h -l info

beat: $(STAMP)
	$(BIN)/celery -A tasks beat -l info

# Flower always asks for a login: FLOWER_BASIC_AUTH=user:password (read by Flower itself)
flower: $(STAMP) flower-auth
	$(BIN)/celery -A tasks flower --port=$(FLOWER_PORT) --address=$(FLOWER_ADDRESS)

flower-auth:
	@test -n "$$FLOWER_BASIC_AUTH" || { echo "set FLOWER_BASIC_AUTH=user:password first (Flower shows every callout)"; exit 2; }

exporter: $(STAMP)
	$(BIN)/onelane exporter --port $(METRICS_PORT) --bind $(METRICS_BIND)

# worker + beat + flower in the foreground (the exporter: make exporter). Ctrl-C stops all three:
# the shell (background jobs of a script ignore the terminal's SIGINT) sends each a SIGTERM, waits
# for the worker's warm shutdown, so the prompt comes back only after the callout in flight has
# finished, and gives beat and Flower 10 s before SIGKILL (Flower can miss a SIGTERM that lands
# on one of its threads while its event loop sleeps).
up: $(STAMP) flower-auth
	@pids=""; \
	stop() { trap '' INT TERM; echo "make up: stopping; the callout in flight finishes first"; \
	         kill -TERM $$pids 2>/dev/null; wait $$worker; \
	         for p in $$pids; do n=0; \
	             while kill -0 $$p 2>/dev/null && [ $$n -lt 100 ]; do sleep 0.1; n=$$((n+1)); done; \
	             kill -KILL $$p 2>/dev/null; done; \
	         wait; exit 0; }; \
	trap stop INT TERM; \
	$(BIN)/celery -A tasks worker -Q $(LANE) -n $(LANE)@%h -l info & worker=$$!; pids="$$pids $$!"; \
	$(BIN)/celery -A tasks beat -l info & pids="$$pids $$!"; \
	$(BIN)/celery -A tasks flower --port=$(FLOWER_PORT) --address=$(FLOWER_ADDRESS) & pids="$$pids $$!"; \
	wait

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

# the transactional outbox relay (README: the outbox): publishes committed outbox rows to their lanes
.PHONY: relay
relay: $(STAMP)
	@test -n "$$ONELANE_OUTBOX_DB" || { echo "set ONELANE_OUTBOX_DB=<SQLAlchemy URL of your database> first (e.g. postgresql+psycopg://user:password@host/db)"; exit 2; }
	$(BIN)/onelane relay

# the HTTP intake on loopback, as the README shows (beyond loopback only with ONELANE_INTAKE_TOKENS_FILE)
.PHONY: intake
intake: $(STAMP)
	$(BIN)/onelane intake --host 127.0.0.1 --port 8080
