#!/usr/bin/env bash
# Install the packages the dev SLURM cluster (slurm/devcluster.sh: two nodes on one machine) needs.
# Idempotent: packages already present are skipped; runs non-interactively as root (or via sudo).
# slurmdbd + mariadb are not optional: without accounting, submitit cannot read job states (sacct)
# and a job that died without writing its result could not be detected.
set -euo pipefail

PKGS=(slurm-wlm munge slurmdbd mariadb-server)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "slurm/install.sh: all of ${PKGS[*]} already installed"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "slurm/install.sh: needs root (or sudo) for apt-get" >&2; exit 1; }
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# The Debian postinst tries to start the daemons and fails without systemd (policy-rc.d); that is
# harmless: devcluster.sh starts them itself with its own configuration.
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "slurm/install.sh: installed ${missing[*]}"
