#!/usr/bin/env bash
# Installs (apt) and starts the servers the integration tests use, on loopback only. Idempotent.
#   scripts/services.sh postgres   -> PostgreSQL with role/database `diredi` on 127.0.0.1:5432
#   scripts/services.sh wrk        -> the HTTP load generator the API benchmark uses
#   scripts/services.sh mosquitto  -> mosquitto 2, its clients (mosquitto_ctrl) and openssl; nothing is
#                                     started: the tests run their own brokers (tests/brokers.py)
#   scripts/services.sh systemd    -> systemd-analyze, which verifies the device's unit in a test
#   scripts/services.sh redis      -> redis-server; nothing is started: the tests run their own on free
#                                     ports (tests/redis_server.py), and the system service the package
#                                     starts on 6379 is stopped and disabled when this installs it
#   scripts/services.sh nginx      -> nginx, the API's front (deploy/nginx/nginx.conf); nothing is started:
#                                     the tests run their own on free ports (tests/front/), and the system
#                                     service the package starts on port 80 is stopped and disabled
#   scripts/services.sh prometheus -> prometheus and promtool (tests/deploy/); nothing is started, not even
#                                     while installing: the tests run their own on free ports
# Prints the environment the tests read (DIREDI_TEST_POSTGRES_URL=...).
set -euo pipefail

need_apt() {
    local missing=()
    for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
    if ((${#missing[@]})); then
        [[ $(id -u) == 0 ]] || { echo "install as root: apt-get install ${missing[*]}" >&2; exit 1; }
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

URL=postgresql://diredi:diredi-test-only@127.0.0.1:5432/diredi

start_postgres() {
    # Already serving (a developer's own server, or a second run)? Then nothing needs root.
    if command -v psql >/dev/null && psql "$URL" -qAtc 'SELECT 1' >/dev/null 2>&1; then
        echo "DIREDI_TEST_POSTGRES_URL=$URL"
        return
    fi
    need_apt postgresql
    local version cluster=main conf changed=0
    version=$(ls /usr/lib/postgresql | sort -V | tail -1)
    pg_lsclusters -h | grep -q "^$version $cluster " || pg_createcluster "$version" "$cluster" >/dev/null
    # Loopback only, whatever the cluster's defaults were.
    pg_conftool "$version" "$cluster" remove listen_addresses 2>/dev/null || true
    conf="/etc/postgresql/$version/$cluster/conf.d/diredi.conf"
    if [[ "$(cat "$conf" 2>/dev/null)" != "$(printf "listen_addresses = '127.0.0.1'\nmax_connections = 200")" ]]; then
        printf "listen_addresses = '127.0.0.1'\nmax_connections = 200\n" >"$conf"
        changed=1
    fi
    if pg_lsclusters -h | grep "^$version $cluster " | grep -q online; then
        ((changed)) && pg_ctlcluster "$version" "$cluster" restart
    else
        pg_ctlcluster "$version" "$cluster" start
    fi
    local ready=0
    for _ in $(seq 100); do pg_isready -q -h 127.0.0.1 && { ready=1; break; }; sleep 0.2; done
    ((ready)) || { echo "PostgreSQL $version did not become ready on 127.0.0.1:5432" >&2; exit 1; }
    runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 <<'SQL'
SELECT 'CREATE ROLE diredi LOGIN CREATEDB'
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'diredi')\gexec
ALTER ROLE diredi WITH LOGIN CREATEDB PASSWORD 'diredi-test-only';
SELECT 'CREATE DATABASE diredi OWNER diredi'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'diredi')\gexec
SQL
    echo "DIREDI_TEST_POSTGRES_URL=$URL"
}

install_redis() {
    # A redis-server already installed is left as its owner set it up (the tests never use 6379).
    dpkg -s redis-server >/dev/null 2>&1 && return
    need_apt redis-server
    if [[ -d /run/systemd/system ]]; then
        systemctl disable --now redis-server >/dev/null 2>&1 || true
    else  # sysvinit, or a container where the package's init script started it
        service redis-server stop >/dev/null 2>&1 || true
        command -v update-rc.d >/dev/null && update-rc.d redis-server disable >/dev/null 2>&1 || true
    fi
}

install_nginx() {
    # Any nginx already installed (nginx, nginx-light, a developer's own build) is left as it is.
    if command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]]; then return; fi
    need_apt nginx
    if [[ -d /run/systemd/system ]]; then
        systemctl disable --now nginx >/dev/null 2>&1 || true
    else  # sysvinit, or a container where the package's init script started it
        service nginx stop >/dev/null 2>&1 || true
        command -v update-rc.d >/dev/null && update-rc.d nginx disable >/dev/null 2>&1 || true
    fi
}

install_prometheus() {
    # A prometheus already installed is left as its owner set it up (the tests use their own port).
    command -v promtool >/dev/null && command -v prometheus >/dev/null && return
    [[ $(id -u) == 0 ]] || { echo "install as root: apt-get install prometheus" >&2; exit 1; }
    # policy-rc.d exiting 101 keeps the package's maintainer scripts from starting the service at all
    # (invoke-rc.d and deb-systemd-invoke both obey it); a policy already there is put back afterwards.
    local policy=/usr/sbin/policy-rc.d
    [[ -e $policy ]] && mv "$policy" "$policy.diredi-saved"
    trap 'rm -f /usr/sbin/policy-rc.d; [[ -e /usr/sbin/policy-rc.d.diredi-saved ]] && mv /usr/sbin/policy-rc.d.diredi-saved /usr/sbin/policy-rc.d; trap - EXIT' EXIT
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    need_apt prometheus
    if [[ -d /run/systemd/system ]]; then
        systemctl disable --now prometheus >/dev/null 2>&1 || true
    else  # sysvinit, or a container
        service prometheus stop >/dev/null 2>&1 || true
        command -v update-rc.d >/dev/null && update-rc.d prometheus disable >/dev/null 2>&1 || true
    fi
}

for service in "$@"; do
    case "$service" in
        postgres) start_postgres ;;
        wrk) need_apt wrk ;;  # the load generator of bench/api_listing.py
        mosquitto) need_apt mosquitto mosquitto-clients openssl ;;
        systemd) command -v systemd-analyze >/dev/null || need_apt systemd ;;
        redis) install_redis ;;
        nginx) install_nginx ;;
        prometheus) install_prometheus ;;
        *) echo "unknown service: $service" >&2; exit 2 ;;
    esac
done
