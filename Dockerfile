# The longhaul worker image. Every durable file lives under the /data volume:
# the embedded SQLite store, the file tools' workspaces and their write journal.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY longhaul ./longhaul
COPY models ./models
COPY worker ./worker
RUN pip install --no-cache-dir . \
    && groupadd --system --gid 10001 longhaul \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home --shell /usr/sbin/nologin longhaul \
    && mkdir -p /data/workspaces \
    && chown -R 10001:10001 /data

# Durable state, also without compose: relative paths resolve under /data too (WORKDIR).
ENV LONGHAUL_DATABASE_URL=sqlite:////data/tasks.db \
    LONGHAUL_WORKSPACE_ROOT=/data/workspaces
# Declared after the chown: a new volume starts with /data's owner, so the unprivileged user can write it.
VOLUME /data
WORKDIR /data
# The unprivileged `longhaul` user, by number (a runtime enforcing non-root users checks the number).
USER 10001:10001

# `longhaul health`: exit 0 when the store and the broker answer, 1 (one line saying which) when not.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 CMD ["longhaul", "health"]
# SIGTERM is a graceful stop: every worker process finishes its current step and releases its lease.
STOPSIGNAL SIGTERM
CMD ["longhaul", "worker", "--processes", "2", "--threads", "4"]
