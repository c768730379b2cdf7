# The flows' image: this repository on Python 3.11 (Debian 12), run by a Prefect
# process worker (deploy/compose.yaml). Debian's redis-tools gives redis-check-rdb
# and redis-cli; docker-compose runs compose files for recover-gateway/recover-host
# (the Docker socket is mounted by the compose file; the Docker SDK talks to it).
FROM python:3.11-slim-bookworm

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PROXILION_DR_HOME=/app

RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-tools docker-compose ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY flows/ flows/
COPY tasks/ tasks/
COPY deployments/ deployments/
COPY sandbox/ sandbox/
COPY prefect.yaml ./
RUN pip install --no-cache-dir .

# The worker runs each flow run as a process from /app (prefect.yaml's pull step
# sets the working directory to $PROXILION_DR_HOME).
CMD ["sh", "-c", "prefect worker start --pool proxilion-dr --type process --work-queue \"$PROXILION_DR_HOST\""]
