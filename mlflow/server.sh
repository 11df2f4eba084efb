#!/usr/bin/env bash
# Serve a tckr tracking store with the MLflow UI and registry on loopback.
#   MLFLOW_BACKEND_STORE_URI  default sqlite:///$PWD/mlruns.db (what `tckr run` writes without a server);
#                             a postgresql:// URL works the same way.
#   MLFLOW_PORT               default 5000
# Runs logged through this server (MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT) keep their
# artifacts in ./mlartifacts; runs logged straight to sqlite keep theirs beside the database.
set -euo pipefail
backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$PWD/mlruns.db}"
port="${MLFLOW_PORT:-5000}"
mlflow_bin="${MLFLOW_BIN:-mlflow}"
echo "MLflow UI: http://127.0.0.1:${port}  (store: ${backend})"
exec "$mlflow_bin" server --backend-store-uri "$backend" --artifacts-destination "$PWD/mlartifacts" \
  --host 127.0.0.1 --port "$port" --workers 1
