# Image of every consent-ledger service; the command picks the role:
#   docker run IMAGE ledger-writer | stream-processor | audit-api | migrate | verify | replay ...
#
# Layout, and why it is not a plain `pip install .`: the code reads the Avro schemas and the policy
# timeline from `schemas/` next to `services/` (catalogue.default_schema_dir() climbs from the source file
# to the repository root). A wheel installed into site-packages would separate the two, so the image keeps
# the repository layout instead:
#   /opt/venv       third-party dependencies only (built in the first stage, copied as a whole)
#   /app/services   the package source, on PYTHONPATH
#   /app/schemas    Avro schemas and the default policy timeline, found at /app/services/../schemas
# The `consent-ledger` launcher is written by hand with the same target as [project.scripts] in
# pyproject.toml (a test keeps the two equal).
#
# The base is pinned by tag; production builds should pin it by digest too (deploy/OPERATIONS.md).

FROM python:3.11-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# A compiler only here, for any dependency without a wheel on the build platform (e.g. arm64);
# the runtime stage never gets it. Not version-pinned: Debian replaces point releases, so a pin would
# break the build without making the discarded builder any more reproducible.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv

# Dependencies come from pyproject.toml alone, so this layer is rebuilt only when they change,
# not on every source edit.
COPY pyproject.toml /src/pyproject.toml
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /src/requirements.txt \
 && pip install --requirement /src/requirements.txt \
 && printf '%s\n' '#!/opt/venv/bin/python' 'import sys' 'from consent_ledger.cli import main' 'sys.exit(main())' \
      > /opt/venv/bin/consent-ledger \
 && chmod 0755 /opt/venv/bin/consent-ledger


FROM python:3.11-slim-bookworm AS runtime

# CONSENT_LEDGER_DATA_DIR: faust keeps its worker state under data_dir, so it must be writable by the
# non-root user (mount a volume or an emptyDir there when the root filesystem is read-only).
# CONSENT_LEDGER_API_HOST: inside a container the API and metrics must listen beyond loopback.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app/services \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CONSENT_LEDGER_DATA_DIR=/var/lib/consent-ledger \
    CONSENT_LEDGER_API_HOST=0.0.0.0

# A fixed numeric uid, so Kubernetes' runAsNonRoot can check it without resolving names.
RUN groupadd --system --gid 10001 consent \
 && useradd --system --uid 10001 --gid consent --home-dir /var/lib/consent-ledger --shell /usr/sbin/nologin consent \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/consent-ledger

COPY --from=builder /opt/venv /opt/venv
COPY services/ /app/services/
COPY schemas/ /app/schemas/

# Byte-compile as root at build time: the running user cannot (and should not) write under /app.
RUN python -m compileall -q /app/services \
 && consent-ledger --help > /dev/null

WORKDIR /var/lib/consent-ledger
USER 10001:10001

# 8080: audit API (also serves /metrics, /healthz, /readyz); 9100: CONSENT_LEDGER_METRICS_PORT of the
# ledger writer and stream processors.
EXPOSE 8080 9100

# No HEALTHCHECK here: what "healthy" means depends on the command (see docker-compose.yml).
ENTRYPOINT ["consent-ledger"]
CMD ["--help"]
