#!/usr/bin/env bash
# LAB CERTIFICATES ONLY: never use these in production.
#
# Makes a throw-away certificate authority and a server certificate for mosquitto's TLS listener, so
# the tests, the demo and a developer can run the broker's production configuration (broker/mosquitto.conf)
# on one machine. The CA key lies unencrypted next to the certificates and nothing here can revoke or
# rotate anything. In production the server certificate comes from your own PKI (or an ACME CA) and
# devices are given that CA's certificate; see docs/broker.md.
#
#   broker/certs.sh DIR [HOSTNAME]
#
# Writes into DIR (created owner-only if missing):
#   ca.crt ca.key          the lab CA (10 years); devices and the cloud trust ca.crt (DIREDI_MQTT_CA_FILE)
#   server.crt server.key  the broker's certificate (825 days), SAN: localhost, 127.0.0.1 and HOSTNAME
# Idempotent: files that exist are kept, so the broker's identity is stable across runs. Delete DIR
# to start over; a server certificate whose SAN lacks HOSTNAME is made again (signed by the same CA).
set -euo pipefail

usage() { echo "usage: $0 DIR [HOSTNAME]" >&2; exit 2; }
(($# >= 1 && $# <= 2)) || usage
dir=$1
host=${2:-}
if [[ -n $host && ! $host =~ ^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$ ]]; then
    echo "not a hostname: $host" >&2
    exit 2
fi
command -v openssl >/dev/null || { echo "openssl is missing (scripts/services.sh mosquitto installs it)" >&2; exit 1; }

umask 077
mkdir -p "$dir"
cd "$dir"

if [[ ! -s ca.key || ! -s ca.crt ]]; then
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 -days 3650 \
        -subj "/O=DiReDi lab/CN=DiReDi lab CA (not for production)" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout ca.key -out ca.crt 2>/dev/null
    rm -f server.crt  # a new CA: the old server certificate no longer chains to it
fi

san="DNS:localhost,IP:127.0.0.1"
wanted=""  # how `openssl x509 -ext subjectAltName` prints the extra name
if [[ -n $host ]]; then
    if [[ $host =~ ^[0-9.]+$ ]]; then
        san+=",IP:$host" wanted="IP Address:$host"
    else
        san+=",DNS:$host" wanted="DNS:$host"
    fi
fi

# Keep a server certificate that chains to the CA and names every host asked for.
if [[ -s server.key && -s server.crt ]] \
    && openssl verify -CAfile ca.crt server.crt >/dev/null 2>&1 \
    && { [[ -z $host ]] || openssl x509 -in server.crt -noout -ext subjectAltName 2>/dev/null \
        | sed 's/^ *//; s/, /\n/g' | grep -qxF "$wanted"; }; then
    exit 0
fi

[[ -s server.key ]] || openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out server.key 2>/dev/null
openssl req -new -key server.key -subj "/O=DiReDi lab/CN=${host:-localhost}" -out server.csr 2>/dev/null
extensions=$(mktemp)
trap 'rm -f "$extensions" server.csr' EXIT
printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    "$san" >"$extensions"
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days 825 \
    -extfile "$extensions" -out server.crt 2>/dev/null
chmod 644 ca.crt server.crt  # public; the keys stay owner-only
