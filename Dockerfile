# syntax=docker/dockerfile:1
#
# meshdistill on Apache Airflow 3.3.2, Python 3.11: one image for every Airflow
# component in docker-compose.yaml (api-server, scheduler, dag-processor, triggerer,
# Celery worker).
#
# Base: the official *slim* image, i.e. Airflow core without the ~60 providers of the
# regular image. The project's lock (constraints.txt) then governs every installed
# package, exactly as on a developer's machine, instead of having to agree with the
# pins of providers the project never uses. On top of it:
#   1. requirements.txt resolved against constraints.txt, with apache-airflow pinned to
#      the image's own version: pip sees that version already installed and keeps it
#      (no reinstall, no accidental up- or downgrade of Airflow); the Celery provider
#      of docker-compose.yaml's CeleryExecutor is one of the requirements;
#   2. the meshdistill package from include/ (editable: in development the include/
#      bind mount of docker-compose.yaml replaces the copy and is live);
#   3. dags/ and plugins/ in AIRFLOW_HOME.
# Nothing secret is read or stored at build time: connections, keys and passwords come
# from the environment at run time (see docker-compose.yaml and docs/docker.md).
FROM apache/airflow:slim-3.3.2-python3.11

LABEL org.opencontainers.image.title="meshdistill" \
      org.opencontainers.image.description="MeSH-guided distillation of biomedical QA data from PubMed, on Apache Airflow 3" \
      org.opencontainers.image.licenses="Apache-2.0"

SHELL ["/bin/bash", "-o", "pipefail", "-e", "-u", "-c"]

# The base image's user "airflow" (50000, group 0), numerically. pip installs into the
# base image's Python environment under ~airflow/.local, next to Airflow itself;
# AIRFLOW_VERSION is set by the base image (3.3.2 here).
USER 50000:0
WORKDIR /opt/airflow

COPY --chown=airflow:0 requirements.txt constraints.txt ./
RUN pip install --no-cache-dir \
        "apache-airflow==${AIRFLOW_VERSION}" \
        -r requirements.txt -c constraints.txt \
    && pip check

# README* so that the build does not depend on the README existing (pyproject names it).
COPY --chown=airflow:0 pyproject.toml README* ./
COPY --chown=airflow:0 include/ ./include/
RUN pip install --no-cache-dir --no-deps -e . \
    && python -c "import meshdistill, meshdistill_airflow, airflow.providers.celery"

# Named volumes in docker-compose.yaml are mounted here; created now so that a new volume
# starts out owned by airflow (group 0 writable, as the base image does for any UID).
RUN mkdir -p meshdistill-home auth \
    && chmod g+rwx meshdistill-home auth

ENV MESHDISTILL_HOME=/opt/airflow/meshdistill-home

# The sample data (MeSH, PubMedQA-L) calibration and the offline demo read: data_dir()
# is data/ beside include/, i.e. /opt/airflow/data.
COPY --chown=airflow:0 data/ ./data/
COPY --chown=airflow:0 plugins/ ./plugins/
COPY --chown=airflow:0 dags/ ./dags/
