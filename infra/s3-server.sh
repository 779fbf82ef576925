#!/usr/bin/env bash
# An S3-API object store on 127.0.0.1 for the local stack: s3rver (npm, pinned in infra/s3/).
# Usage: infra/s3-server.sh [PORT]      (what `make up` runs; foreground)
#
# It speaks the S3 HTTP API that DVC (dvc-s3) and MLflow (boto3) use against AWS or MinIO,
# and keeps every object as a plain file under $PEFTFLOW_STATE_DIR/s3 (default .stack/s3),
# so buckets survive `make down` / `make up` (moto's server mode keeps them in memory).
# Buckets "mlflow" (artifacts) and "dvc" (data versions) are created when missing.
# Credentials: s3rver accepts the access key S3RVER with secret S3RVER; it is a local,
# loopback-only store, not a place for real credentials.
set -euo pipefail
cd "$(dirname "$0")/.."
port="${1:-9000}"
state="$(realpath -m "${PEFTFLOW_STATE_DIR:-.stack}")"
mkdir -p "$state/s3"
s3rver=infra/s3/node_modules/.bin/s3rver
if [[ ! -x "$s3rver" ]]; then
  command -v npm >/dev/null || { echo "the S3 store needs Node.js and npm (apt-get install npm)" >&2; exit 1; }
  npm ci --prefix infra/s3 --no-audit --no-fund --silent
fi
exec "$s3rver" --address 127.0.0.1 --port "$port" --directory "$state/s3" \
  --configure-bucket mlflow --configure-bucket dvc
