#!/bin/sh
# The Vagrant client: its fabric and management links, etcd (the VM state database every agent shares)
# listening on the fabric address, ingress.sh (the same script the namespace testbed's `srmig demo --libvirt`
# runs) and the ingress agent as a systemd unit. The probe runs here too (demo.sh). Idempotent; the
# Vagrantfile runs it at every `vagrant up`.
#
# Environment (set by the Vagrantfile), besides ingress.sh's own (SRMIG_NAME, SRMIG_GATEWAY, SRMIG_DB,
# SRMIG_ETCD, ...), which pass through:
#   SRMIG_FABRIC_MAC, SRMIG_FABRIC_ADDR   the fabric NIC (ingress.sh's SRMIG_INTERFACE) and its address
#   SRMIG_MGMT_MAC, SRMIG_MGMT_ADDR       the management NIC (demo.sh drives the hypervisors' libvirtd on it)
#   SRMIG_ROUTES      "PREFIX=GATEWAY ..." on the fabric: each host's locator [none]
#   SRMIG_NEIGHBOURS  "ADDR=MAC ..." permanent neighbours on the fabric [none]
#   SRMIG_CONFIG      the agent's config [/etc/srmig/agent.toml]
#   SRMIG_SERVICES    0: stop after the links and the config, touching no system service (etcd, systemd
#                     units): what tests/test_vagrant.py runs in a network namespace [1]
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
CONFIG=${SRMIG_CONFIG:-/etc/srmig/agent.toml}
UNIT=/etc/systemd/system/srmig-agent.service
SRMIG=$SRMIG_VENV/bin/srmig
[ -x "$SRMIG" ] || die "$SRMIG not found: run common.sh (./run setup) first"

# --- links ----------------------------------------------------------------------------------------------
links_setup

# --- srmig ingress: config (one source of truth with the namespace testbed) -------------------------------
SRMIG_INTERFACE=$fabric SRMIG_CONFIG=$CONFIG sh "$HERE/ingress.sh"
"$SRMIG" agent --config "$CONFIG" --check
[ "${SRMIG_SERVICES:-1}" = 1 ] || exit 0

# --- etcd: Debian's etcd-server (installed by ./run setup), one member ------------------------------------
addr=${SRMIG_FABRIC_ADDR%/*}
cat > /etc/default/etcd <<EOF
# written by vagrant/provision/client.sh: the srmig VM state database, reachable from the hypervisors
ETCD_LISTEN_CLIENT_URLS="http://127.0.0.1:2379,http://[$addr]:2379"
ETCD_ADVERTISE_CLIENT_URLS="http://[$addr]:2379"
EOF
systemctl enable etcd.service >/dev/null 2>&1
systemctl restart etcd.service
i=0
until ETCDCTL_API=3 etcdctl --endpoints "http://[$addr]:2379" endpoint health >/dev/null 2>&1; do
    i=$((i + 1))
    [ "$i" -lt 60 ] || die "etcd not healthy on http://[$addr]:2379 after 60 s"
    sleep 1
done
log "etcd healthy on http://[$addr]:2379"

# --- the ingress agent's unit --------------------------------------------------------------------------
# The unit `srmig install-hook --unit` writes on the hypervisors, from the same template (no libvirt hook
# here: the ingress takes no part in libvirt's migration).
"$SRMIG_VENV/bin/python" - "$CONFIG" "$UNIT" <<'EOF'
import shutil, sys
from pathlib import Path
from srmig.ctl.cli_agent import UNIT
exe = shutil.which("srmig") or f"{sys.executable} -m srmig"
Path(sys.argv[2]).write_text(UNIT.format(exe=exe, config=sys.argv[1]))
EOF
start_agent "$SRMIG" "$CONFIG" 60
log "client ready: run the demo with sudo $HERE/demo.sh"
