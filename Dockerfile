# One image for the worker, beat and flower services of docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY onelane ./onelane
# with the outbox extra (SQLAlchemy, psycopg 3: the relay, and beat with ONELANE_OUTBOX_DB) and the
# HTTP intake (the compose file's intake service)
RUN pip install --no-cache-dir ".[outbox,intake]"
# the Celery entry points of the project root (`celery -A tasks ...`), not installed
COPY tasks ./tasks
COPY worker ./worker
COPY beat ./beat
# Celery refuses to run as root without this; run as an unprivileged user instead.
RUN useradd --create-home onelane
# the intake's tokens live here (a volume in compose), owned by the user that reads them
RUN mkdir -p /var/lib/onelane && chown onelane /var/lib/onelane
USER onelane
