# The coreason-budget HTTP service, with pricing (token counts priced from litellm's table).
#   docker compose up            (compose.yaml: this service and a persistent, non-evicting Redis)
#   docker build -t coreason-budget .
#   docker run -p 8000:8000 -e COREASON_BUDGET_REDIS_URL=redis://redis:6379 \
#       -e COREASON_BUDGET_API_KEYS=change-me coreason-budget
# Without API keys `serve` refuses to start (exit 2), as it does outside a container.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LITELLM_LOCAL_MODEL_COST_MAP=True

WORKDIR /src
# Only what the build needs (see .dockerignore), then install it and drop the sources.
COPY setup.cfg pyproject.toml README.md ./
COPY coreason_budget ./coreason_budget
# The pricing extra: a commit with token counts is priced, not refused (422).
RUN pip install ".[server,pricing]" && rm -rf /src

RUN useradd --create-home --uid 10001 budget
USER budget
WORKDIR /home/budget
# Containers collect stderr, where the service always logs: no log file in the image
# (set COREASON_BUDGET_LOG_PATH to a mounted path to have one too).
ENV COREASON_BUDGET_LOG_PATH=off

EXPOSE 8000
# The slim image has no curl; urlopen raises on 503 (store down), which fails the check.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
CMD ["coreason-budget", "serve", "--host", "0.0.0.0", "--port", "8000"]
