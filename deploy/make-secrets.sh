#!/bin/sh
# Writes deploy/.env with random passwords for MinIO (shared with Milvus) and Grafana's admin,
# readable by you alone. Compose reads .env beside docker-compose.yml; nothing secret is typed
# on a command line or kept in the Compose file. An existing .env is kept.
set -eu
cd "$(dirname "$0")"
if [ -e .env ]; then
  echo "deploy/.env exists; keeping it" >&2
  exit 0
fi
umask 077
random() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }
{
  echo "MINIO_ROOT_USER=gmv-$(random | cut -c1-12)"
  echo "MINIO_ROOT_PASSWORD=$(random)"
  echo "GRAFANA_ADMIN_PASSWORD=$(random)"
} > .env
echo "wrote deploy/.env (mode 0600): MinIO and Grafana passwords" >&2
