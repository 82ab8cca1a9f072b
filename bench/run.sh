#!/usr/bin/env bash
# The benchmark in one command, on Debian: installs what it needs when missing, then runs it.
#   bench/run.sh [options of python -m bench.run]    e.g. bench/run.sh --scenarios publish,rooms --runs 3
#   bench/run.sh test [pytest options]               bench's own tests (bench/tests), not the service's suite
# System packages (redis-server, nginx + libnginx-mod-nchan, taskset) are installed with apt-get when missing
# (needs root); Python packages go into the project's .venv with the `[bench]` extra.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
# Nchan, the peer the service is measured against
ls /usr/lib/nginx/modules/ngx_nchan_module.so >/dev/null 2>&1 || missing+=(libnginx-mod-nchan)
command -v taskset >/dev/null || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian may start a system nginx/redis on install; the benchmark runs its own on free ports.
source scripts/_venv.sh bench "[bench]"
if [ "${1:-}" = "test" ]; then
  shift
  exec .venv/bin/python -m pytest bench/tests "$@"
fi
exec .venv/bin/python -m bench.run "$@"
