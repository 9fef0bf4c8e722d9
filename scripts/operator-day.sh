#!/usr/bin/env bash
# An operator's day with the CLI alone, against `diredi up` on this machine: train a line, provision
# three labelled devices (each its own daemon), roll v1 out to the cohort; a user labels photos on one
# device, whose knowledge becomes v2 (RD, the worker's cycle, the gate); roll v2 out to a label
# selector with a canary; watch, pause, label a device into the group, resume; send a command and
# read its result; roll back; read the lineage. Prints the transcript (commands and what they
# printed); docs/operator-day.md is one such run. Only the user's labelling (a loop of
# `diredi-device feedback add`, as an app on the device would) is not the operator's CLI.
#
#   scripts/operator-day.sh [WORKDIR]        (after `make setup`; about 10 minutes, most of it training)
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
export ROOT
WORK=${1:-$(mktemp -d /tmp/operator-day.XXXXXX)}
API_PORT=${API_PORT:-18000}
MQTT_PORT=${MQTT_PORT:-18830}
export PATH="$ROOT/.venv/bin:$PATH" DIREDI_DATA_DIR="$WORK/.diredi" COLUMNS=100
export DIREDI_API_URL="http://127.0.0.1:$API_PORT"
export DIREDI_PIPELINE_AUTO_ROLLOUT=false  # this operator approves and rolls out each model by hand
mkdir -p "$WORK" && cd "$WORK" || exit 2

shown() {  # the command as one would type it
    local arg line="\$"
    for arg in "$@"; do
        case $arg in *[[:space:]?*]*) line+=" '$arg'" ;; *) line+=" $arg" ;; esac
    done
    echo "$line"
}
run() {  # print the command, run it, show a non-zero exit
    shown "$@"
    "$@"
    local status=$?
    [ "$status" -eq 0 ] || echo "[exit $status]"
    echo
    return 0
}
say() { printf '# %s\n' "$*"; }

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
    wait 2>/dev/null
}
trap cleanup EXIT

say "the whole system on this machine: SQLite, the embedded broker, ingest, worker and API"
run diredi db upgrade
diredi up --api-port "$API_PORT" --mqtt-port "$MQTT_PORT" > up.out 2>&1 &
pids+=($!)
for _ in $(seq 120); do
    curl -fs "$DIREDI_API_URL/healthz" > /dev/null && break
    sleep 1
done
cat up.out
BROKER="mqtt://127.0.0.1:$MQTT_PORT?protocol=3.1.1"  # the embedded broker speaks MQTT 3.1.1, as `up` says
echo
echo "\$ export DIREDI_API_KEY=\$(diredi apikey create --role admin --name day)"
DIREDI_API_KEY=$(diredi apikey create --role admin --name day) || exit 1
export DIREDI_API_KEY
echo

say "the manufacturer's first line for the porch cameras, on the presumed data of a line file"
run diredi line create --cohort porch --scenario "$ROOT/scenarios/digits-two-users.json"
run diredi models approve porch.v1 --reason "first line"

say "three devices, labelled; each gets a kit (device.toml, secret, inbox/) and runs its daemon"
run diredi devices provision porch-1 --cohort porch --label site=lab --label tier=beta \
    --device-dir devices/porch-1 --broker-url "$BROKER"
run diredi devices provision porch-2 --cohort porch --label site=lab \
    --device-dir devices/porch-2 --broker-url "$BROKER"
run diredi devices provision porch-3 --cohort porch --label site=roof \
    --device-dir devices/porch-3 --broker-url "$BROKER"
for device in porch-1 porch-2 porch-3; do
    echo "\$ diredi-device run --config devices/$device/device.toml &"
    diredi-device run --config "devices/$device/device.toml" > "devices/$device/daemon.log" 2>&1 &
    pids+=($!)
done
sleep 5
echo
run diredi devices list --cohort porch

say "v1 to the whole cohort: a canary, then the rest"
echo '{"canary": 1, "waves": 1, "observe_s": 0}' > quick.json
rollout=$(diredi rollouts create porch.v1 --plan quick.json --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
echo "\$ diredi rollouts create porch.v1 --plan quick.json   # -> $rollout"
echo
run diredi rollouts watch "$rollout" --interval 1 --timeout 300

say "porch-1's user says their 3s are 8s, on 60 photos; the labels never leave the device"
python3 - <<'PY'
from pathlib import Path
import numpy as np
from cloud.ml.data import build_scenario_data
from cloud.ml.scenario import load_scenario
import os
data = build_scenario_data(load_scenario(Path(os.environ["ROOT"]) / "scenarios/digits-two-users.json"))
photos = data.users[0].device_train[0]  # alice's private samples, her labels (3 -> 8)
out = Path("photos"); out.mkdir(exist_ok=True)
for i in range(60):
    np.save(out / f"{i:03d}-label-{int(photos.y[i])}.npy", photos.x[i])
PY
echo "\$ for photo in photos/*.npy; do diredi-device feedback add --config devices/porch-1/device.toml --label \$label \$photo; done"
for photo in photos/*.npy; do
    label=${photo##*-label-}; label=${label%.npy}
    stored=$(diredi-device feedback add --config devices/porch-1/device.toml --label "$label" "$photo" 2>&1)
done
echo "$stored"   # what the last one printed
echo
say "after 50 new labels the device runs reverse distillation and reports only the difference;"
say "the worker's cycle updates the cloud model, distills v2 and gates it"
for _ in $(seq 90); do
    diredi models show porch.v2 > /dev/null 2>&1 && break
    sleep 2
done
run diredi jobs list
run diredi models show porch.v2
echo '{"canary": 1, "waves": 1, "observe_s": 30}' > canary.json
rollout=$(diredi rollouts create porch.v2 --selector site=lab --plan canary.json --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
echo "\$ diredi rollouts create porch.v2 --selector site=lab --plan canary.json   # -> $rollout"
echo
sleep 8
run diredi rollouts show "$rollout"
run diredi rollouts pause "$rollout" --reason "checking the canary"
say "porch-3 moves to the lab while the rollout is paused: the next wave takes it too"
run diredi devices label porch-3 site=lab
run diredi rollouts resume "$rollout"
run diredi rollouts watch "$rollout" --interval 2 --timeout 300
run diredi devices list --cohort porch

say "ask one device for a status report now, and read its answer"
run diredi devices command porch-2 report_now --timeout 60
run diredi devices commands porch-2

say "changed our mind: roll v2 back; the devices return to v1"
run diredi rollouts rollback "$rollout" --reason "the lab prefers v1"
run diredi rollouts watch "$rollout" --interval 1 --timeout 120
sleep 5
run diredi devices list --cohort porch
run diredi models lineage porch.v2
run diredi jobs list
