#!/usr/bin/env bash
# Static checkers that tests run: shellcheck and kubectl (for `kubectl kustomize`), from Debian.
# As root: apt-get install. Otherwise: apt-get download + dpkg-deb -x into the user's cache, whose
# usr/bin the tests search too. Skips a tool already on PATH.
set -euo pipefail

readonly user_root="${XDG_CACHE_HOME:-$HOME/.cache}/tckr/debian"
declare -A package_of=([shellcheck]=shellcheck [kubectl]=kubernetes-client)

missing=()
for tool in "${!package_of[@]}"; do
  if ! command -v "$tool" > /dev/null && [[ ! -x "$user_root/usr/bin/$tool" ]]; then
    missing+=("${package_of[$tool]}")
  fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi
if [[ $(id -u) -eq 0 ]]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  workdir=$(mktemp -d)
  trap 'rm -rf "$workdir"' EXIT
  (cd "$workdir" && apt-get download "${missing[@]}")
  mkdir -p "$user_root"
  for deb in "$workdir"/*.deb; do
    dpkg-deb -x "$deb" "$user_root"
  done
fi
echo "installed ${missing[*]}"
