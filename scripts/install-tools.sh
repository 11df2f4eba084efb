#!/usr/bin/env bash
# Tools that tests run, from Debian: shellcheck, kubectl (for `kubectl kustomize`), and Chromium with its
# chromedriver (the browser test of the MLflow UI). As root: apt-get install. Otherwise: apt-get download +
# dpkg-deb -x into the user's cache, which the tests search too (Chromium unpacked this way still needs the
# system's shared libraries; without them the browser test skips and says so). Skips a tool already there.
set -euo pipefail

readonly user_root="${XDG_CACHE_HOME:-$HOME/.cache}/tckr/debian"
# tool -> the packages that provide it, and where it lands in the user's cache
declare -A packages_of=([shellcheck]=shellcheck [kubectl]=kubernetes-client
                        [chromium]="chromium chromium-common" [chromedriver]=chromium-driver)
declare -A unpacked_at=([shellcheck]=usr/bin [kubectl]=usr/bin [chromium]=usr/lib/chromium [chromedriver]=usr/bin)

missing=()
for tool in "${!packages_of[@]}"; do
  if ! command -v "$tool" > /dev/null && [[ ! -x "$user_root/${unpacked_at[$tool]}/$tool" ]]; then
    read -r -a packages <<< "${packages_of[$tool]}"
    missing+=("${packages[@]}")
  fi
done
# PostgreSQL, for the test of the MLflow server's PostgreSQL backend, is installed as root only (without
# root that test skips and says so).
if [[ $(id -u) -eq 0 ]] && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null; then
  missing+=(postgresql)
fi
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
