#!/bin/sh
# The two-host demo, run on the client as root once `vagrant up` is done:
#     vagrant ssh client -c 'sudo /srmig/vagrant/provision/demo.sh'
# Starts the test guest on hv1 (a transient libvirt domain carrying srmig's metadata, so hv1's agent manages
# it), waits until it answers through the client's ingress, then probes it while libvirt live-migrates it
# to hv2 (`virsh migrate --live --p2p`), and prints what `srmig demo --libvirt` prints: sent, lost,
# duplicated, reordered. Nothing but libvirt's events and hook drive srmig: no step here talks to an agent.
#
# Environment (defaults in brackets; the addresses are the Vagrantfile's):
#   SRMIG_RATE        probes per second [2000]
#   SRMIG_COUNT       probes [3 x rate]
#   SRMIG_VM_ADDR     the guest's address [2001:db8:100::10]
#   SRMIG_SRC_MGMT    hv1's management address [fd00:99::1]
#   SRMIG_DST_MGMT    hv2's management address [fd00:99::2]
#   SRMIG_DOMAIN      the libvirt domain's name [srmig-vm]
#   SRMIG_BOOT_S      how long the guest may take to answer after it starts [180]
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
RATE=${SRMIG_RATE:-2000}
COUNT=${SRMIG_COUNT:-$((RATE * 3))}
VM=${SRMIG_VM_ADDR:-2001:db8:100::10}
SRC=${SRMIG_SRC_MGMT:-fd00:99::1}
DST=${SRMIG_DST_MGMT:-fd00:99::2}
DOMAIN=${SRMIG_DOMAIN:-srmig-vm}
BOOT_S=${SRMIG_BOOT_S:-180}
PY=$SRMIG_VENV/bin/python
SRC_URI="qemu+tcp://[$SRC]/system"
DST_URI="qemu+tcp://[$DST]/system"
[ "$(id -u)" = 0 ] || die "run as root (the probe uses raw ICMPv6 sockets)"
[ -x "$PY" ] || die "$PY not found: provision the client first (vagrant up)"
WORK=$(mktemp -d /tmp/srmig-demo-XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# A previous run leaves the guest on hv2 (or on hv1): start from nothing.
for uri in "$SRC_URI" "$DST_URI"; do
    virsh -q -c "$uri" destroy "$DOMAIN" >/dev/null 2>&1 || true
done

# The guest: the domain XML of the namespace testbed (srmig.testbed.libvirtd.domain_xml: TCG, direct kernel
# boot of the image ./run setup built under /var/lib/srmig/guest on every machine, virtio-net on the tap
# host.sh created) plus the metadata that makes srmig manage it.
"$PY" - "$DOMAIN" "$VM" > "$WORK/domain.xml" <<'EOF'
import sys
from srmig.ctl.agent import metadata_xml
from srmig.testbed.libvirtd import domain_xml
print(domain_xml(sys.argv[1], metadata=metadata_xml(sys.argv[2])))
EOF
log "starting $DOMAIN on hv1 ($SRC_URI)"
virsh -q -c "$SRC_URI" create "$WORK/domain.xml" >/dev/null

# Ready when it answers through the ingress: hv1's agent has published the VM, the client's agent has
# programmed H.Encaps towards hv1's End.DX6 SID, the guest has booted.
"$PY" - "$VM" "$BOOT_S" <<'EOF' || die "the guest does not answer through the ingress (see srmig status everywhere)"
import sys, time
from srmig.testbed.probe import run_probe
vm, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
while run_probe(vm, 50, 10, timeout_s=1).received == 0:
    if time.monotonic() > deadline:
        sys.exit(1)
EOF
log "the guest answers on hv1; probing at $RATE/s while it migrates to hv2"

"$PY" -m srmig.testbed.probe "$VM" --rate "$RATE" --count "$COUNT" --timeout 2 --json \
    > "$WORK/probe.json" 2> "$WORK/probe.err" &
probe=$!
sleep 0.8  # the probe's steady state before the migration, as srmig demo --libvirt
t0=$(date +%s.%N)
rc=0
virsh -c "$SRC_URI" migrate --live --p2p "$DOMAIN" "$DST_URI" \
    --migrateuri "tcp://[$DST]" --listen-address "$DST" > "$WORK/migrate.out" 2>&1 || rc=$?
t1=$(date +%s.%N)
wait "$probe" || die "probe failed: $(tail -n 3 "$WORK/probe.err")"

"$PY" - "$WORK/probe.json" "$RATE" "$t0" "$t1" "$rc" "$WORK/migrate.out" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
rate, t0, t1, rc = sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
print(f"libvirt live migration hv1 -> hv2 driven by the srmig agents (etcd state database), {rate} probes/s")
print(f"  sent {r['sent']}  lost {r['lost']}  duplicated {r['duplicated']}  reordered {r['reordered']}  "
      f"blackout {r['blackout_ms']:.1f} ms  migration {t1 - t0:.2f} s")
if rc:
    print(f"  migration error: {open(sys.argv[6]).read().strip()}")
EOF
[ "$rc" = 0 ] || exit 1
