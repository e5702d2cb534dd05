# The viewers are fetched and built from the npm registry with Debian's Node.js, in a
# stage of their own: the image that runs has no Node.js.
FROM python:3.11-slim-bookworm AS viewers
RUN apt-get update \
 && apt-get install -y --no-install-recommends nodejs npm \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . .
# The browser viewer (OHIF, version and SHA-512 pinned in viewer/ohif.py) into var/ohif;
# the offline viewer that goes on ZIP and disc media into viewer/offline/dist.
RUN pip install --no-cache-dir . \
 && python manage.py ohif_install \
 && cd viewer/offline && npm ci --no-audit --no-fund --ignore-scripts && node build.js

FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends libpango-1.0-0 libpangoft2-1.0-0 fonts-dejavu-core \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY . .
COPY --from=viewers /app/var/ohif /app/var/ohif
COPY --from=viewers /app/viewer/offline/dist /app/viewer/offline/dist
RUN pip install --no-cache-dir . && python manage.py collectstatic --noinput
ENV PH_VAR_DIR=/data/var
EXPOSE 8000 11112
# Threaded workers: a download or upload may last minutes on a slow line, and a sync
# worker is killed when one request outlasts --timeout.
CMD ["gunicorn", "pockethealth.wsgi", "--bind", "0.0.0.0:8000", "--workers", "4", "--threads", "8"]
