# taskapp: one image for the API (`taskapp serve`, the default command), the Celery worker
# (`taskapp worker`), the scheduler (`taskapp beat`) and the migrations (`taskapp migrate`).
#
#   docker build -t taskapp .
#   docker run --env-file ... -p 8000:8000 taskapp
#
# Configuration comes from TASKAPP_* environment variables only (README, "Configuration");
# the image sets TASKAPP_ENV=production, so missing or placeholder secrets stop it at start.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: a virtualenv with the runtime dependencies and the project --------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# No pip inside the virtualenv: the builder's pip installs into it, so the runtime image
# carries no installer.
RUN python -m venv --without-pip /opt/venv

WORKDIR /app

# Dependencies first (their layer is rebuilt only when pyproject.toml or the lock changes):
# the project's runtime dependencies, at the versions of requirements.lock, from wheels
# only (nothing is compiled, so no compiler is needed). The lock also pins the test and
# lint tools; they are not runtime dependencies and stay out.
COPY pyproject.toml README.md requirements.lock ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > /tmp/runtime-requirements.txt \
 && pip --python /opt/venv/bin/python install --only-binary=:all: \
        --constraint requirements.lock --requirement /tmp/runtime-requirements.txt

# The project, installed in place at /app (the path it keeps in the runtime image):
# `taskapp migrate` finds alembic.ini and migrations/ beside the package
# (taskapp.db.alembic_config).
COPY taskapp ./taskapp
RUN pip --python /opt/venv/bin/python install --no-deps --editable .
COPY alembic.ini ./
COPY migrations ./migrations
# Bytecode now: the runtime user cannot write beside the sources.
RUN /opt/venv/bin/python -m compileall -q /app/taskapp /app/migrations /opt/venv/lib

# --- runtime: the interpreter, the virtualenv and the sources, run as an unprivileged user --
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="taskapp" \
      org.opencontainers.image.description="Multi-user task service: FastAPI over partitioned PostgreSQL with OIDC auth"

# The base image's pip, setuptools and wheel are build tools; nothing at run time needs them.
RUN python -m pip uninstall --yes --quiet pip setuptools wheel \
 && groupadd --system --gid 10001 taskapp \
 && useradd --system --uid 10001 --gid taskapp --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin taskapp \
 && install --directory --owner taskapp --group taskapp --mode 0700 /var/lib/taskapp

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /app /app

# TASKAPP_DATA_DIR: the only place the service writes (the beat schedule of `taskapp beat`).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TASKAPP_ENV=production \
    TASKAPP_DATA_DIR=/var/lib/taskapp

WORKDIR /app
USER 10001:10001
EXPOSE 8000

# Liveness of the API (the slim image has no curl). Containers running the worker, beat or
# the migrations from this image replace or disable it (deploy/compose.yml).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]

CMD ["taskapp", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
