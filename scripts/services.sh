#!/usr/bin/env bash
# Installs (apt) and starts the servers the integration tests use, on loopback only. Idempotent.
#   scripts/services.sh postgres   -> PostgreSQL with role/database `diredi` on 127.0.0.1:5432
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

start_postgres() {
    need_apt postgresql
    local version cluster=main
    version=$(ls /usr/lib/postgresql | sort -V | tail -1)
    pg_lsclusters -h | grep -q "^$version $cluster " || pg_createcluster "$version" "$cluster" >/dev/null
    # Loopback only, whatever the cluster's defaults were.
    pg_conftool "$version" "$cluster" remove listen_addresses 2>/dev/null || true
    printf "listen_addresses = '127.0.0.1'\nmax_connections = 200\n" \
        >"/etc/postgresql/$version/$cluster/conf.d/diredi.conf"
    pg_lsclusters -h | grep "^$version $cluster " | grep -q online \
        || pg_ctlcluster "$version" "$cluster" start
    for _ in $(seq 50); do pg_isready -q -h 127.0.0.1 && break; sleep 0.2; done
    runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 <<'SQL'
SELECT 'CREATE ROLE diredi LOGIN CREATEDB PASSWORD ''diredi-test-only'''
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'diredi')\gexec
SELECT 'CREATE DATABASE diredi OWNER diredi'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'diredi')\gexec
SQL
    echo "DIREDI_TEST_POSTGRES_URL=postgresql://diredi:diredi-test-only@127.0.0.1:5432/diredi"
}

for service in "$@"; do
    case "$service" in
        postgres) start_postgres ;;
        *) echo "unknown service: $service" >&2; exit 2 ;;
    esac
done
