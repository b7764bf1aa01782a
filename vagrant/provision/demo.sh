#!/bin/sh
# The two-host demo, run on the client as root once `vagrant up` is done:
#     vagrant ssh client -c 'sudo /srmig/vagrant/provision/demo.sh'
# Starts the test guest on hv1 (a transient libvirt domain carrying srmig's metadata, so hv1's agent manages
# it), dual-stack: its IPv6 address (the VM's id) and its IPv4 address in the metadata, both moved by srmig.
# Waits until both answer through the client's ingress, then probes both (ICMPv6 and ICMP echo) while
# libvirt live-migrates it to hv2 (`virsh migrate --live --p2p`), and prints what `srmig demo --libvirt`
# prints, per family: sent, lost, duplicated, reordered. Nothing but libvirt's events and hook drive srmig:
# no step here talks to an agent.
#
# Environment (defaults in brackets; the addresses are the Vagrantfile's):
#   SRMIG_RATE        probes per second per family [2000]
#   SRMIG_COUNT       probes per family [3 x rate]
#   SRMIG_VM_ADDR     the guest's IPv6 address [2001:db8:100::10]
#   SRMIG_VM_ADDR4    the guest's IPv4 address/prefix length, "" for an IPv6-only guest [198.51.100.10/24]
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
VM4=${SRMIG_VM_ADDR4-198.51.100.10/24}
SRC=${SRMIG_SRC_MGMT:-fd00:99::1}
DST=${SRMIG_DST_MGMT:-fd00:99::2}
DOMAIN=${SRMIG_DOMAIN:-srmig-vm}
BOOT_S=${SRMIG_BOOT_S:-180}
PY=$SRMIG_VENV/bin/python
SRC_URI="qemu+tcp://[$SRC]/system"
DST_URI="qemu+tcp://[$DST]/system"
[ "$(id -u)" = 0 ] || die "run as root (the probe uses raw ICMPv6 and ICMP sockets)"
[ -x "$PY" ] || die "$PY not found: provision the client first (vagrant up)"
WORK=$(mktemp -d /tmp/srmig-demo-XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# A previous run leaves the guest on hv2 (or on hv1): start from nothing.
for uri in "$SRC_URI" "$DST_URI"; do
    virsh -q -c "$uri" destroy "$DOMAIN" >/dev/null 2>&1 || true
done

# The guest: the namespace testbed's domain XML with srmig's metadata (lib.sh's demo_domain_xml); its IPv4
# gateway is the anycast one host.sh puts on each hypervisor's tap.
demo_domain_xml "$PY" "$DOMAIN" "$VM" "$VM4" > "$WORK/domain.xml"
log "starting $DOMAIN on hv1 ($SRC_URI)"
virsh -q -c "$SRC_URI" create "$WORK/domain.xml" >/dev/null

# Ready when every address answers through the ingress: hv1's agent has published the VM, the client's
# agent has programmed H.Encaps towards hv1's End.DX6 SID for each, the guest has booted.
# shellcheck disable=SC2086
demo_ready "$PY" "$BOOT_S" "$VM" ${VM4%/*} ||
    die "the guest does not answer through the ingress (see srmig status everywhere)"
log "the guest answers on hv1; probing at $RATE/s per family while it migrates to hv2"

# shellcheck disable=SC2086
"$PY" -m srmig.testbed.probe "$VM" ${VM4%/*} --rate "$RATE" --count "$COUNT" --timeout 2 --json \
    > "$WORK/probe.json" 2> "$WORK/probe.err" &
probe=$!
sleep 0.8  # the probe's steady state before the migration, as srmig demo --libvirt
t0=$(date +%s.%N)
rc=0
virsh -c "$SRC_URI" migrate --live --p2p "$DOMAIN" "$DST_URI" \
    --migrateuri "tcp://[$DST]" --listen-address "$DST" > "$WORK/migrate.out" 2>&1 || rc=$?
t1=$(date +%s.%N)
wait "$probe" || die "probe failed: $(tail -n 3 "$WORK/probe.err")"

demo_report "$PY" "$WORK/probe.json" "$RATE" "$t0" "$t1" "$rc" "$WORK/migrate.out"
[ "$rc" = 0 ] || exit 1
