# Shell functions shared by the Vagrant provisioning scripts (hv.sh, client.sh, demo.sh); sourced, not run.
# The namespace testbed builds its links itself (srmig.testbed.testbed); these do the same job on the
# Vagrant machines, whose interfaces are found by the MAC addresses the Vagrantfile gives them.

SRMIG_VENV=${SRMIG_VENV:-/opt/srmig/venv}   # outside the rsync'ed /srmig: `vagrant rsync` never touches it

log() { printf '[srmig %s] %s\n' "$(hostname)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# iface_by_mac MAC: the name of the interface with that MAC (guest NIC names vary: eth1, ens6, ...).
iface_by_mac() {
    want=$(echo "$1" | tr 'A-F' 'a-f')
    for d in /sys/class/net/*; do
        if [ "$(cat "$d/address" 2>/dev/null)" = "$want" ]; then
            basename "$d"
            return 0
        fi
    done
    log "no interface with MAC $1"
    return 1
}

# link_setup IFACE ADDR/PLEN: up, one static IPv6 address (no DAD: unique by construction, and a tentative
# address cannot be bound by etcd or libvirt), no autoconfiguration and no ICMPv6 redirects (a host
# forwarding out of the interface it received on must not make the client learn host routes).
link_setup() {
    for k in accept_dad=0 autoconf=0 accept_ra=0 accept_redirects=0; do
        echo "${k#*=}" > "/proc/sys/net/ipv6/conf/$1/${k%=*}"
    done
    ip link set "$1" up
    ip -6 addr replace "$2" dev "$1" nodad
}

# routes_setup IFACE "PREFIX=GATEWAY ...": static routes through next hops on IFACE.
routes_setup() {
    for r in $2; do
        ip -6 route replace "${r%%=*}" via "${r#*=}" dev "$1"
    done
}

# links_setup: the fabric and management NICs named by SRMIG_FABRIC_MAC / SRMIG_MGMT_MAC get
# SRMIG_FABRIC_ADDR / SRMIG_MGMT_ADDR; the fabric also SRMIG_FABRIC_ADDR4 (its IPv4 address/prefix, if any:
# the dual-stack underlay that carries a VM's IPv4 replies), SRMIG_ROUTES and SRMIG_NEIGHBOURS. Sets $fabric,
# $mgmt.
links_setup() {
    : "${SRMIG_FABRIC_MAC:?}" "${SRMIG_FABRIC_ADDR:?}" "${SRMIG_MGMT_MAC:?}" "${SRMIG_MGMT_ADDR:?}"
    fabric=$(iface_by_mac "$SRMIG_FABRIC_MAC")
    mgmt=$(iface_by_mac "$SRMIG_MGMT_MAC")
    link_setup "$fabric" "$SRMIG_FABRIC_ADDR"
    link_setup "$mgmt" "$SRMIG_MGMT_ADDR"
    [ -z "${SRMIG_FABRIC_ADDR4:-}" ] || ip -4 addr replace "$SRMIG_FABRIC_ADDR4" dev "$fabric"
    routes_setup "$fabric" "${SRMIG_ROUTES:-}"
    neighbours_setup "$fabric" "${SRMIG_NEIGHBOURS:-}"
    log "fabric $fabric $SRMIG_FABRIC_ADDR${SRMIG_FABRIC_ADDR4:+ $SRMIG_FABRIC_ADDR4}, management $mgmt $SRMIG_MGMT_ADDR"
}

# neighbours_setup IFACE "ADDR=MAC ...": permanent neighbour entries (IPv6 or IPv4, by the address), as the
# testbed's static_neigh: a first burst towards a peer (a freshly resumed VM's replies) never waits in the
# neighbour resolution queue.
neighbours_setup() {
    for n in $2; do
        ip neigh replace "${n%%=*}" lladdr "${n#*=}" dev "$1" nud permanent
    done
}

# start_agent SRMIG CONFIG SECONDS: restart the srmig-agent unit, wait (bounded) until it answers, show status.
start_agent() {
    systemctl daemon-reload
    systemctl enable srmig-agent.service >/dev/null 2>&1
    systemctl restart srmig-agent.service
    i=0
    until "$1" status --config "$2" >/dev/null 2>&1; do
        i=$((i + 1))
        if [ "$i" -ge "$3" ]; then
            journalctl -u srmig-agent.service -n 30 --no-pager >&2 || true
            die "srmig agent not answering after $3 s"
        fi
        sleep 1
    done
    "$1" status --config "$2"
}

# --- etcd's mutual TLS and authentication (client.sh; tests/test_vagrant.py runs these against its own etcd)
# Layout, the same on every machine: $PKI/<name>/ holds what agent (or operator) <name> needs and nothing
# else: ca.pem (etcd's CA: db.ca_file), cert.pem and key.pem (its client certificate: OU=<name>, no CN, as
# etcd 3.4's gateway refuses a certificate with a CN once authentication is on), password (its etcd user's:
# db.password_file). The client keeps the CA's key ($PKI/ca-key.pem) and etcd's member certificate
# ($PKI/server.pem, server-key.pem); a hypervisor gets only its own directory.

# etcd_pki DIR "ADDR ..." NAME...: with openssl (docs/operations.md, "Certificates for etcd"), the CA (made
# once, kept), etcd's member certificate valid for ADDR... (IP addresses) and a directory per NAME. What
# exists already is kept, so a second run changes no credential.
etcd_pki() {
    _dir=$1 _addrs=$2
    shift 2
    (
        umask 077
        mkdir -p "$_dir"
        chmod 700 "$_dir"
        cd "$_dir"
        # P-256 keys, no passphrase: the agents read them unattended (root's, 0600)
        ec="-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes"
        if [ ! -s ca.pem ] || [ ! -s ca-key.pem ]; then
            # shellcheck disable=SC2086
            openssl req -x509 -new $ec -days 3650 -subj "/CN=srmig Vagrant etcd CA" \
                -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
                -addext "keyUsage=critical,keyCertSign,cRLSign" -keyout ca-key.pem -out ca.pem 2>/dev/null
            chmod 644 ca.pem
        fi
        # sign STEM SUBJECT EXTENSIONS: STEM.pem from STEM-key.pem, by the CA
        sign() {
            # shellcheck disable=SC2086
            openssl req -new $ec -subj "$2" -keyout "$1-key.pem" -out "$1.csr" 2>/dev/null
            printf '%s\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n' "$3" > "$1.ext"
            openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 825 \
                -extfile "$1.ext" -out "$1.pem" 2>/dev/null
            rm -f "$1.csr" "$1.ext"
        }
        if [ ! -s server.pem ] || [ ! -s server-key.pem ]; then
            # the addresses the agents dial (they verify them); serverAuth and clientAuth: etcd 3.4's JSON
            # gateway dials its member's gRPC port with this certificate
            san=""
            for a in $_addrs; do san="$san${san:+,}IP:$a"; done
            sign server "/CN=etcd" "subjectAltName=$san
basicConstraints=critical,CA:FALSE
extendedKeyUsage=serverAuth,clientAuth"
        fi
        for n in "$@"; do
            mkdir -p "$n"
            cp ca.pem "$n/ca.pem"
            if [ ! -s "$n/cert.pem" ] || [ ! -s "$n/key.pem" ]; then
                sign "$n/cert" "/OU=$n" "basicConstraints=critical,CA:FALSE
extendedKeyUsage=clientAuth"
                mv "$n/cert-key.pem" "$n/key.pem"
            fi
            [ -s "$n/password" ] || openssl rand -base64 24 > "$n/password"
        done
    )
}

# etcd_auth PYTHON DIR ENDPOINT "HOST ..." "INGRESS ...": etcd's users and roles, made by srmig's own list
# (srmig.ctl.statedb.etcd_auth.init_auth, what `srmig db-roles` prints for etcdctl): root, the operator's
# (DIR/root), one user per agent with its roles, then authentication on. Connects as root with DIR/root's
# certificate and password, which also works while authentication is still off (first run); idempotent.
etcd_auth() {
    "$1" - "$2" "$3" "$4" "$5" <<'PY'
import logging, sys
from pathlib import Path
from srmig.ctl.statedb import Auth, Tls
from srmig.ctl.statedb.etcd import EtcdKv
from srmig.ctl.statedb.etcd_auth import ROOT, init_auth

pki, endpoint, hosts, ingresses = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(), sys.argv[4].split()
logging.disable(logging.WARNING)    # "authentication is off" on the first run: this turns it on

def password(name: str) -> str:
    return (pki / name / "password").read_text().splitlines()[0]

users = {**{n: (password(n), ("host",)) for n in hosts}, **{n: (password(n), ("ingress",)) for n in ingresses}}
root = pki / ROOT
tls = Tls(str(root / "ca.pem"), str(root / "cert.pem"), str(root / "key.pem"))
with EtcdKv([endpoint], tls=tls, auth=Auth(ROOT, password(ROOT))) as kv:
    init_auth(kv, password(ROOT), users)
print(f"etcd {endpoint}: authentication on; users {ROOT} (operator), {', '.join(users)}")
PY
}

# --- the demo (demo.sh; tests/test_vagrant.py runs these in a network namespace) ----------------------------

# demo_domain_xml PYTHON NAME ADDR [ADDR4/PLEN]: the test guest's libvirt domain, the namespace testbed's
# (srmig.testbed.libvirtd.domain_xml: TCG, direct kernel boot of the image ./run setup built, virtio-net on
# the tap host.sh made), with srmig's metadata listing ADDR (the VM's id) and, for a dual-stack guest,
# ADDR4, which the guest also gets on its kernel command line (its IPv4 gateway: host.sh's SRMIG_GW4).
demo_domain_xml() {
    "$1" - "$2" "$3" "${4:-}" <<'PY'
import sys
from srmig.ctl.agent import metadata_xml
from srmig.testbed.libvirtd import domain_xml
name, vm, addr4 = sys.argv[1:4]
addresses = (vm, addr4.split("/")[0]) if addr4 else (vm,)
print(domain_xml(name, metadata=metadata_xml(*addresses), addr4=addr4 or None))
PY
}

# demo_ready PYTHON SECONDS ADDR...: wait (at most SECONDS) until every ADDR answers echo requests, 10 at a
# time; the ones that never did are named and the status is 1.
demo_ready() {
    _py=$1 _s=$2
    shift 2
    "$_py" - "$_s" "$@" <<'PY'
import ipaddress, sys, time
from srmig.testbed.probe import FAMILY_NAMES, run_probes
deadline, addrs = time.monotonic() + float(sys.argv[1]), sys.argv[2:]
waiting = {str(ipaddress.ip_address(a).version): a for a in addrs}
while waiting:
    answered = {f for f, r in run_probes(list(waiting.values()), 50, 10, timeout_s=1).items() if r.received}
    waiting = {f: a for f, a in waiting.items() if f not in answered}
    if waiting and time.monotonic() > deadline:
        sys.exit("no answer from " + ", ".join(f"{a} ({FAMILY_NAMES[f]})" for f, a in waiting.items()))
PY
}

# demo_report PYTHON PROBE_JSON RATE T0 T1 RC MIGRATE_OUT: what `srmig demo --libvirt` prints, a line per
# family probed, from the probe's --json ({family: report}); the migration's error when RC is not 0.
demo_report() {
    "$1" - "$2" "$3" "$4" "$5" "$6" "$7" <<'PY'
import json, sys
from srmig.testbed.probe import FAMILY_NAMES
reports = json.load(open(sys.argv[1]))
rate, t0, t1, rc = sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
print(f"libvirt live migration hv1 -> hv2 driven by the srmig agents (etcd state database), {rate} probes/s "
      f"per family, migration {t1 - t0:.2f} s")
for family, r in reports.items():
    print(f"  {FAMILY_NAMES[family]}  sent {r['sent']}  lost {r['lost']}  duplicated {r['duplicated']}  "
          f"reordered {r['reordered']}  blackout {r['blackout_ms']:.1f} ms")
if rc:
    print(f"  migration error: {open(sys.argv[6]).read().strip()}")
PY
}
