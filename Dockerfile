FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends libpango-1.0-0 libpangoft2-1.0-0 fonts-dejavu-core \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY . .
RUN pip install --no-cache-dir . && python manage.py collectstatic --noinput
ENV PH_VAR_DIR=/data/var
EXPOSE 8000 11112
# Threaded workers: a download or upload may last minutes on a slow line, and a sync
# worker is killed when one request outlasts --timeout.
CMD ["gunicorn", "pockethealth.wsgi", "--bind", "0.0.0.0:8000", "--workers", "4", "--threads", "8"]
