#!/usr/bin/env bash
# The pipeline on a local Kubernetes cluster: kind (default) or minikube, standalone Kubeflow
# Pipelines (pinned), the MLflow server of mlflow/k8s, the CPU image built and loaded, then
# `tckr submit --profile demo --wait`.
#
#   scripts/run-local.sh [--dry-run] [--minikube [--gpus]] [up|down|mlflow-manifests]
#
# mlflow-manifests prints the MLflow objects `up` applies (the server in this code's image).
# --dry-run prints every command instead of running it. kind has no GPU passthrough; minikube's
# docker driver has `--gpus all` (then submit a profile whose kubernetes section requests GPUs).
set -euo pipefail

readonly kfp_version="${KFP_VERSION:-2.17.3}"  # the backend that matches kfp-server-api in requirements.lock
readonly kind_version="${KIND_VERSION:-v0.29.0}"
readonly cluster=tckr
readonly api_port="${KFP_API_PORT:-8888}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly repo
readonly tools="${XDG_CACHE_HOME:-$HOME/.cache}/tckr/bin"
readonly tckr="${TCKR_BIN:-$repo/.venv/bin/tckr}"
# The tags the compiled pipeline names: this code's content (tckr.components.default_images).
image="$("$tckr" images --target cpu)"
readonly image
cuda_image="$("$tckr" images --target cuda)"
readonly cuda_image

dry_run=""
driver=kind
gpus=""
action=up
for argument in "$@"; do
  case "$argument" in
    --dry-run) dry_run=1 ;;
    --minikube) driver=minikube ;;
    --gpus) gpus=1 ;;
    up | down | mlflow-manifests) action="$argument" ;;
    *) echo "usage: $0 [--dry-run] [--minikube [--gpus]] [up|down|mlflow-manifests]" >&2; exit 2 ;;
  esac
done

run() {
  echo "+ $*"
  if [[ -z "$dry_run" ]]; then "$@"; fi
}

ensure_kind() {  # kind is in no package registry: fetch the pinned release once
  if command -v kind > /dev/null; then return; fi
  run mkdir -p "$tools"
  run curl -fsSLo "$tools/kind" "https://kind.sigs.k8s.io/dl/$kind_version/kind-linux-amd64"
  run chmod +x "$tools/kind"
  export PATH="$tools:$PATH"
}

create_cluster() {
  if [[ "$driver" == kind ]]; then
    ensure_kind
    run kind create cluster --name "$cluster" --config "$repo/deploy/kind-cluster.yaml" --wait 120s
  else
    run minikube start --profile "$cluster" --cpus 4 --memory 8g ${gpus:+--driver docker --gpus all}
  fi
}

install_kfp() {
  local manifests="github.com/kubeflow/pipelines/manifests/kustomize"
  run kubectl apply -k "$manifests/cluster-scoped-resources?ref=$kfp_version"
  run kubectl wait --for condition=established --timeout 120s crd/applications.app.k8s.io
  # platform-agnostic: the env KFP documents for kind/minikube (env/dev crash-loops there, kubeflow/pipelines#9546)
  run kubectl apply -k "$manifests/env/platform-agnostic?ref=$kfp_version"
  run kubectl -n kubeflow wait --for condition=available --timeout 900s deployment --all
}

load_image() {
  run docker build --file "$repo/docker/Dockerfile" --target cpu --build-arg "TCKR_IMAGE=$image" \
    --build-arg "TCKR_CUDA_IMAGE=$cuda_image" --tag "$image" "$repo"
  if [[ "$driver" == kind ]]; then
    run kind load docker-image "$image" --name "$cluster"
  else
    run minikube --profile "$cluster" image load "$image"
  fi
}

# mlflow/k8s names the image's repository only; this overlay gives it the tag built above.
mlflow_overlay() {
  local overlay="$repo/.tckr/mlflow-k8s"
  mkdir -p "$overlay"
  printf '%s\n' "apiVersion: kustomize.config.k8s.io/v1beta1" "kind: Kustomization" "resources: [../../mlflow/k8s]" \
    "images: [{name: ${image%:*}, newTag: \"${image##*:}\"}]" > "$overlay/kustomization.yaml"
  echo "$overlay"
}

install_mlflow() {
  local overlay="$repo/.tckr/mlflow-k8s"
  if [[ -z "$dry_run" ]]; then overlay="$(mlflow_overlay)"; fi
  run kubectl apply -k "$overlay"
  run kubectl -n kubeflow rollout status deployment/mlflow --timeout 300s
}

submit_demo() {
  echo "+ kubectl -n kubeflow port-forward svc/ml-pipeline $api_port:8888 &"
  if [[ -z "$dry_run" ]]; then
    kubectl -n kubeflow port-forward svc/ml-pipeline "$api_port:8888" > /dev/null &
    trap 'kill $!' EXIT
    sleep 3
  fi
  run "$tckr" submit --host "http://127.0.0.1:$api_port" --profile demo --wait
}

if [[ "$action" == mlflow-manifests ]]; then  # what install_mlflow applies
  kubectl kustomize "$(mlflow_overlay)"
  exit 0
fi
if [[ "$action" == down ]]; then
  if [[ "$driver" == kind ]]; then
    ensure_kind
    run kind delete cluster --name "$cluster"
  else
    run minikube delete --profile "$cluster"
  fi
  exit 0
fi
create_cluster
install_kfp
load_image
install_mlflow
submit_demo
