#!/usr/bin/env bash
# Install real Fashion-MNIST from Debian's `dataset-fashion-mnist` package.
# As root: apt-get install. Otherwise: apt-get download + dpkg-deb -x into the user's cache, which
# tckr searches too (see tckr.data.ingest.fashion_mnist_dir).
set -euo pipefail

readonly system_dir=/usr/share/datasets/fashion-mnist
readonly user_root="${XDG_CACHE_HOME:-$HOME/.cache}/tckr/debian"

if [[ -f "$system_dir/train-images-idx3-ubyte.gz" || -f "$user_root$system_dir/train-images-idx3-ubyte.gz" ]]; then
  exit 0
fi
if [[ $(id -u) -eq 0 ]]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dataset-fashion-mnist
else
  workdir=$(mktemp -d)
  trap 'rm -rf "$workdir"' EXIT
  (cd "$workdir" && apt-get download dataset-fashion-mnist)
  mkdir -p "$user_root"
  dpkg-deb -x "$workdir"/dataset-fashion-mnist_*.deb "$user_root"
fi
echo "Fashion-MNIST installed"
