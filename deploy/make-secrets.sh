#!/bin/sh
# Writes what the Compose file needs and keeps out of itself, readable by you alone:
#   .env                       random passwords for MinIO (shared with Milvus) and Grafana's admin
#   secrets/gmv-tls.{crt,key}  a self-signed certificate for GMV's gRPC port (localhost, gmv)
# Compose reads .env beside docker-compose.yml; nothing secret is typed on a command line or
# kept in the Compose file. Existing files are kept. Replace the certificate with your own CA's
# for callers on other machines (they trust it with GMVClient(..., tls_ca=...)).
set -eu
cd "$(dirname "$0")"
umask 077
random() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }
if [ ! -e .env ]; then
  {
    echo "MINIO_ROOT_USER=gmv-$(random | cut -c1-12)"
    echo "MINIO_ROOT_PASSWORD=$(random)"
    echo "GRAFANA_ADMIN_PASSWORD=$(random)"
  } > .env
  echo "wrote deploy/.env (mode 0600): MinIO and Grafana passwords" >&2
fi
mkdir -p secrets
if [ ! -e secrets/gmv-tls.key ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 825 -subj "/CN=gmv" \
    -addext "subjectAltName=DNS:gmv,DNS:localhost,IP:127.0.0.1" \
    -keyout secrets/gmv-tls.key -out secrets/gmv-tls.crt 2>/dev/null
  # The folder is yours alone (0700); the files inside are readable by the container's user
  # (uid 10001), which a bind-mounted secret file keeps its host mode for.
  chmod 0644 secrets/gmv-tls.key secrets/gmv-tls.crt
  echo "wrote deploy/secrets/gmv-tls.crt and .key: clients trust gmv-tls.crt" >&2
fi
