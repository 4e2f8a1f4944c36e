#!/usr/bin/env bash
# Installs what `--features mpi` needs on Debian/Ubuntu: OpenMPI (libopenmpi-dev: headers and
# libmpi; openmpi-bin: mpirun) and libclang-dev (the mpi crate generates its bindings with
# bindgen). Idempotent: does nothing when the packages are already installed. Needs root or sudo.
set -euo pipefail
pkgs=(libopenmpi-dev openmpi-bin libclang-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "MPI packages present: ${pkgs[*]}"
  exit 0
fi
sudo=()
[ "$(id -u)" = 0 ] || sudo=(sudo)
echo "installing ${missing[*]}"
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
