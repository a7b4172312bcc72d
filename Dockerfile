# lorabot: the Discord bot (`python -m bot`). Build: docker build -t lorabot .  (or: docker compose, compose.yaml)
# Run:   docker run --env-file .env -v lorabot-data:/data -v ./keys:/keys:ro -e VASTAI_SSH_KEY_PATH=/keys/lorabot lorabot
# Try:   docker run --rm lorabot lorabot demo   (the simulator: no account, no sshd needed)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    LORABOT_DB_PATH=/data/lorabot.sqlite3 \
    LORABOT_WORK_DIR=/data/work \
    VASTAI_SSH_KEY_PATH=/keys/id_ed25519

# openssh-client: `lorabot ssh` / `lorabot launch` open shells on the rented box with it, and datasets
# stream through it (services/openssh.py; without it they go through asyncssh, slower)
RUN apt-get update \
 && apt-get install -y --no-install-recommends openssh-client ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 lorabot \
 && mkdir -p /data /keys && chown lorabot:lorabot /data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY cogs ./cogs
COPY services ./services
COPY tests/__init__.py ./tests/__init__.py
COPY tests/sim ./tests/sim
# [demo]: moto's S3 server, so that `lorabot demo` runs in the image (its box is asyncssh in-process)
RUN pip install ".[demo]" && pip check

USER lorabot
VOLUME ["/data"]
CMD ["python", "-m", "bot"]
