# onelane: every target runs the same commands as the README and docker-compose.yml.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: help install test test-fast demo worker beat flower flower-auth up bench clean

help:
	@echo "make demo    run the main job: many producers, one worker, a fragile API, a summary"
	@echo "make test    install into $(VENV) and run the whole test suite"
	@echo "make worker | beat | flower | up    run against REDIS_URL (default redis://localhost:6379/0)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# the inner loop: pure logic and the private Redis, no celery processes (under a minute)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "unit or redis"

demo: $(STAMP)
	$(BIN)/python -m demo.run

worker: $(STAMP)
	$(BIN)/celery -A tasks worker -Q $${ONELANE_QUEUE:-serial} -l info

beat: $(STAMP)
	$(BIN)/celery -A tasks beat -l info

# Flower always asks for a login: FLOWER_BASIC_AUTH=user:password (read by Flower itself)
flower: $(STAMP) flower-auth
	$(BIN)/celery -A tasks flower --port=5555

flower-auth:
	@test -n "$$FLOWER_BASIC_AUTH" || { echo "set FLOWER_BASIC_AUTH=user:password first (Flower shows every callout)"; exit 2; }

# worker + beat + flower in the foreground; Ctrl-C stops all three
up: $(STAMP) flower-auth
	@trap 'kill 0' INT TERM EXIT; \
	$(BIN)/celery -A tasks worker -Q $${ONELANE_QUEUE:-serial} -l info & \
	$(BIN)/celery -A tasks beat -l info & \
	$(BIN)/celery -A tasks flower --port=5555 & \
	wait

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

# the HTTP intake on loopback, as the README shows (beyond loopback only with ONELANE_INTAKE_TOKENS_FILE)
.PHONY: intake
intake: $(STAMP)
	$(BIN)/onelane intake --host 127.0.0.1 --port 8080
