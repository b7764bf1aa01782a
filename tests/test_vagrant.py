"""The Vagrant two-host demo (vagrant/), as far as it runs without booting three VMs.

- `vagrant validate -p` with every plugin disabled (no box, no provider), and the full `vagrant validate`
  with Debian's vagrant-libvirt, for the KVM and the TCG branch of the provider block.
- `sh -n` on every provisioning script; the Vagrantfile's provisioners name scripts that exist, and the
  addresses demo.sh defaults to are the Vagrantfile's.
- hv.sh and client.sh (hence host.sh and ingress.sh, the scripts the namespace testbed runs too) with the
  exact environment the Vagrantfile gives each machine, in a throwaway network namespace with veth NICs
  carrying the Vagrantfile's MACs, up to the point where they would touch system services
  (SRMIG_SERVICES=0): links, routes, neighbours, the VM's tap and the agent configs, which
  `srmig agent --check` must accept, with the etcd credentials client.sh makes (openssl) in their place.
- etcd as client.sh runs it: the credentials (lib.sh's etcd_pki) for the Vagrantfile's agents, a real etcd
  started here with TLS and --client-cert-auth, the users and roles (etcd_auth, twice: idempotent); then a
  hypervisor's identity writes its own keys and not the other's, the ingress's no segment list, and no
  certificate, no connection.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from srmig.ctl import config as config_mod

REPO = Path(__file__).resolve().parent.parent
VAGRANT = REPO / "vagrant"
PROVISION = VAGRANT / "provision"

pytestmark = pytest.mark.vagrant

# Loads the Vagrantfile with a stand-in for Vagrant that records every `vm.network` and `vm.provision` call
# per machine, so the tests use exactly what `vagrant up` would pass (MACs, environment), never a copy.
RECORDER = r"""
require "json"
LOG = []
TRIGGERS = []
class Recorder
  def initialize(machine) @machine = machine end
  def respond_to_missing?(*) true end
  def method_missing(name, *args, **kw, &blk)
    if name == :define
      blk.call(Recorder.new(args[0].to_s))
      return self
    end
    LOG << { machine: @machine, call: name, args: args, kw: kw } if %i[network provision synced_folder].include?(name)
    if name == :ruby    # a trigger's Ruby block: kept, run below only when asked (ARGV[1])
      TRIGGERS << blk
    elsif blk
      blk.call(self)
    end
    self
  end
end
module Vagrant
  def self.configure(_version) yield Recorder.new(nil) end
  def self.has_plugin?(_name) true end
end
load ARGV[0]
if ARGV[1]
  # The triggers, with a stand-in for a machine's communicator: its commands run here, the guest's /etc/srmig/pki
  # being ARGV[1].
  comm = Object.new
  comm.define_singleton_method(:sudo) do |cmd, &out|
    text = `#{cmd.sub("/etc/srmig/pki", ARGV[1])}`
    raise "failed: #{cmd}" unless $?.success?
    out.call(:stdout, text)
  end
  machine = Struct.new(:communicate).new(comm)
  TRIGGERS.each { |t| t.call(nil, machine) }
end
puts JSON.generate(LOG)
"""


def _vagrant_env(tmp_path: Path, **extra) -> dict:
    """No .vagrant in the tree, no ~/.vagrant.d: both under tmp_path."""
    return {**os.environ, "VAGRANT_HOME": str(tmp_path / "vagrant.d"),
            "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"), **extra}


def _vagrant(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["vagrant", *args], cwd=VAGRANT, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def calls() -> list[dict]:
    out = subprocess.run(["ruby", "-e", RECORDER, str(VAGRANT / "Vagrantfile")], cwd=VAGRANT,
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def _provisioners(calls: list[dict], machine: str) -> list[dict]:
    return [c for c in calls if c["machine"] == machine and c["call"] == "provision"]


def _role(calls: list[dict], machine: str) -> dict:
    """The role provisioner (hv.sh or client.sh) of `machine`: its kw has env and inline."""
    (role,) = [p for p in _provisioners(calls, machine) if p["args"][0] in ("hv", "client")]
    return role


def _synced(calls: list[dict], machine: str) -> dict[str, dict]:
    """guest path -> the synced folder's host path and options, for the folders only `machine` has."""
    return {c["args"][1]: {"host": c["args"][0], **c["kw"]} for c in calls
            if c["machine"] == machine and c["call"] == "synced_folder"}


def _mac(calls: list[dict], machine: str, network: str) -> str:
    (net,) = [c for c in calls if c["machine"] == machine and c["call"] == "network"
              and c["kw"].get("libvirt__network_name") == network]
    return net["kw"]["mac"]


# --- vagrant validate --------------------------------------------------------------------------------------

def test_validate_without_provider_plugin(tmp_path):
    """What CI promises at least: no box, no provider plugin (VAGRANT_NO_PLUGINS: even if one is installed)."""
    r = _vagrant(["validate", "-p"], _vagrant_env(tmp_path, VAGRANT_NO_PLUGINS="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validated successfully" in r.stdout


@pytest.mark.parametrize("kvm", ["1", "0"], ids=["nested-kvm", "tcg"])
def test_validate_with_libvirt_provider(tmp_path, kvm):
    """vagrant-libvirt checks its own block (a misspelt option fails here, never under -p)."""
    env = _vagrant_env(tmp_path, SRMIG_VAGRANT_KVM=kvm)
    plugins = _vagrant(["plugin", "list"], env)
    if "vagrant-libvirt" not in plugins.stdout:
        reason = "vagrant-libvirt plugin not installed (Debian vagrant-libvirt; run ./run setup)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    r = _vagrant(["validate"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validated successfully" in r.stdout


# --- scripts: syntax, and what the Vagrantfile runs -------------------------------------------------------

SCRIPTS = sorted(PROVISION.glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_script_syntax(script):
    r = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr


def test_vagrantfile_runs_scripts_that_exist(calls):
    machines = sorted({c["machine"] for c in calls} - {None})   # None: config.vm, every machine's
    assert machines == ["client", "hv1", "hv2"]
    for m in machines:
        for p in _provisioners(calls, m):
            inline = p["kw"]["inline"]
            path = re.search(r"/srmig/(\S+\.sh)", inline).group(1)
            assert (REPO / path).is_file(), f"{m}: {inline}"
        env = _role(calls, m)["kw"]["env"]
        assert env["SRMIG_FABRIC_MAC"] == _mac(calls, m, "srmig-fabric")
        assert env["SRMIG_MGMT_MAC"] == _mac(calls, m, "srmig-mgmt")


def test_demo_defaults_match_the_vagrantfile(calls):
    from srmig.testbed.qemu import GATEWAY_V4

    demo = (PROVISION / "demo.sh").read_text()
    host_sh = (PROVISION / "host.sh").read_text()

    def default(text: str, var: str) -> str:
        return re.search(r"\$\{" + var + r":?-([^}]+)\}", text).group(1)

    for var, machine in (("SRMIG_SRC_MGMT", "hv1"), ("SRMIG_DST_MGMT", "hv2")):
        assert f"{default(demo, var)}/64" == _role(calls, machine)["kw"]["env"]["SRMIG_MGMT_ADDR"]
    assert default(demo, "SRMIG_VM_ADDR") == default(host_sh, "SRMIG_VM_ADDR")
    # the dual-stack guest: its IPv4 address on both hosts' taps, its gateway the taps' anycast one
    for machine in ("hv1", "hv2"):
        assert default(demo, "SRMIG_VM_ADDR4").split("/")[0] == _role(calls, machine)["kw"]["env"]["SRMIG_VM_ADDR4"]
    assert default(host_sh, "SRMIG_GW4") == GATEWAY_V4


# --- the scripts in a network namespace -------------------------------------------------------------------

def _ip_json(ns: str, *args: str):
    out = subprocess.run(["ip", "-n", ns, "-j", *args], capture_output=True, text=True, timeout=10, check=True)
    return json.loads(out.stdout or "[]")


@pytest.mark.netns
@pytest.mark.parametrize("machine", ["hv1", "hv2", "client"])
def test_provisioning_in_netns(calls, tmp_path, machine):
    role = _role(calls, machine)
    env = role["kw"]["env"]
    script = PROVISION / re.search(r"provision/(\S+\.sh)", role["kw"]["inline"]).group(1)
    cfg_path = tmp_path / f"{machine}.toml"
    pki = tmp_path / "pki"
    run_env = {**os.environ, **env, "SRMIG_SERVICES": "0", "SRMIG_CONFIG": str(cfg_path),
               "SRMIG_VENV": sys.prefix}
    if machine == "client":
        assert env["SRMIG_HOSTS"].split() == ["hv1", "hv2"]
        run_env["SRMIG_PKI"] = str(pki)     # client.sh makes the credentials (openssl) there
        mine = pki / "client"
    else:
        # the Vagrantfile hands the hypervisor its own directory, which its config names; here it is one
        # client.sh's etcd_pki made
        mine = Path(env["SRMIG_ETCD_CA"]).parent
        assert str(mine) == f"/etc/srmig/pki/{machine}" and env["SRMIG_ETCD_USER"] == machine
        folder = _synced(calls, machine)[str(mine)]
        assert folder["host"].endswith(f"/vagrant/.pki/{machine}") and folder["type"] == "rsync"
        _lib(f'etcd_pki "{pki}" 127.0.0.1 {machine}')
        run_env.update({f"SRMIG_ETCD_{k}": str(pki / machine / env[f"SRMIG_ETCD_{k}"].rsplit("/", 1)[1])
                        for k in ("CA", "CERT", "KEY", "PASSWORD_FILE")})
        mine = pki / machine
    assert "SRMIG_ETCD_INSECURE" not in env and env["SRMIG_ETCD"].startswith("https://")
    # PREFIX<pid>-<role>, the testbed's naming: another session's netns.sweep() leaves a live owner's alone.
    ns = f"srmig-{os.getpid()}-vtest"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        for ifname, key in (("fab0", "SRMIG_FABRIC_MAC"), ("mgmt0", "SRMIG_MGMT_MAC")):
            # veth pairs (the peer up, so the NIC gets a carrier): dummy is not in every kernel.
            subprocess.run(["ip", "-n", ns, "link", "add", ifname, "address", env[key], "type", "veth",
                            "peer", "name", f"{ifname}p"], check=True, timeout=10)
            subprocess.run(["ip", "-n", ns, "link", "set", f"{ifname}p", "up"], check=True, timeout=10)
        r = subprocess.run(["ip", "netns", "exec", ns, "sh", str(script)], capture_output=True, text=True,
                           timeout=120, env=run_env)
        assert r.returncode == 0, r.stdout + r.stderr

        # The config the agent would run with.
        check = subprocess.run([sys.executable, "-m", "srmig", "agent", "--config", str(cfg_path), "--check"],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        cfg = config_mod.load(cfg_path)
        assert cfg.db.backend == "etcd" and cfg.db.endpoints == (env["SRMIG_ETCD"],)
        assert not cfg.db.insecure and (cfg.db.user, cfg.db.ca_file, cfg.db.cert_file, cfg.db.key_file,
                                        cfg.db.password_file) == \
            (machine, str(mine / "ca.pem"), str(mine / "cert.pem"), str(mine / "key.pem"), str(mine / "password"))
        for f in ("key.pem", "password"):
            assert (mine / f).stat().st_mode & 0o077 == 0, f
        fabric_addr = env["SRMIG_FABRIC_ADDR"].split("/")[0]
        if machine == "client":
            assert cfg.host is None
            assert (cfg.ingress.name, cfg.ingress.interface, cfg.ingress.gateway) == \
                ("client", "fab0", env["SRMIG_GATEWAY"])
        else:
            h = cfg.host
            assert (h.name, h.fabric, h.address, h.locator) == (machine, "fab0", fabric_addr,
                                                               env["SRMIG_LOCATOR"])
            assert h.sr_domain == tuple(env["SRMIG_DOMAIN"].split()) and h.transit == ()
            assert h.sids.dx6 == env["SRMIG_LOCATOR"].split("/")[0] + "d6"

        # Links (the fabric dual-stack: the VM's IPv4 replies come back over its IPv4), routes to the
        # locators, permanent neighbours of both families.
        for ifname, key, family in (("fab0", "SRMIG_FABRIC_ADDR", "-6"), ("fab0", "SRMIG_FABRIC_ADDR4", "-4"),
                                    ("mgmt0", "SRMIG_MGMT_ADDR", "-6")):
            (link,) = _ip_json(ns, family, "addr", "show", "dev", ifname)
            addrs = {f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"]}
            assert env[key] in addrs and link["operstate"] == "UP"
        assert _ip_json(ns, "-4", "addr", "show", "dev", "mgmt0") == []
        routes = {(r["dst"], r.get("gateway")) for r in _ip_json(ns, "-6", "route", "show", "dev", "fab0")}
        for pair in env["SRMIG_ROUTES"].split():
            prefix, gw = pair.split("=")
            assert (prefix, gw) in routes
        neigh = {(n["dst"], n["lladdr"]) for n in _ip_json(ns, "neigh", "show", "dev", "fab0")
                 if "PERMANENT" in n.get("state", [])}
        assert neigh == {tuple(p.split("=")) for p in env["SRMIG_NEIGHBOURS"].split()}
        others = [m for m in ("client", "hv1", "hv2") if m != machine]
        assert {a for a, _ in neigh} == {_role(calls, m)["kw"]["env"][k].split("/")[0]
                                        for m in others for k in ("SRMIG_FABRIC_ADDR", "SRMIG_FABRIC_ADDR4")}

        if machine != "client":  # host.sh: the VM's tap with the anycast gateway of both families; forwarding
            (tap,) = _ip_json(ns, "addr", "show", "dev", "vmtap")
            assert tap["address"] == "02:00:5e:00:00:01"
            assert {("fe80::1", 64), ("198.51.100.1", 32)} <= {(a["local"], a["prefixlen"]) for a in tap["addr_info"]}
            vm4 = env["SRMIG_VM_ADDR4"]
            assert [r["dst"] for r in _ip_json(ns, "-6", "route", "show", "dev", "vmtap")
                    if r["dst"] != "fe80::/64"] == ["2001:db8:100::10"]
            assert [r["dst"] for r in _ip_json(ns, "-4", "route", "show", "dev", "vmtap")] == [vm4]
            vm_neigh = {(n["dst"], n["lladdr"]) for n in _ip_json(ns, "neigh", "show", "dev", "vmtap")
                        if "PERMANENT" in n.get("state", [])}
            assert vm_neigh == {("2001:db8:100::10", "02:00:00:00:10:10"), (vm4, "02:00:00:00:10:10")}
            for key in ("net.ipv6.conf.all.forwarding", "net.ipv4.ip_forward"):
                fwd = subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-n", key],
                                     capture_output=True, text=True, timeout=10, check=True)
                assert fwd.stdout.strip() == "1", key
    finally:
        subprocess.run(["ip", "netns", "del", ns], timeout=10)


def test_trigger_hands_each_hypervisor_its_credentials(tmp_path):
    """The client's trigger (Ruby, run here against a stand-in communicator) copies each hypervisor's
    directory to the host path that hypervisor's own rsync'ed folder syncs, byte for byte, root-only."""
    guest, host = tmp_path / "guest", tmp_path / "host"
    _lib(f'etcd_pki "{guest}" 127.0.0.1 root client hv1 hv2')
    out = subprocess.run(["ruby", "-e", RECORDER, str(VAGRANT / "Vagrantfile"), str(guest)], cwd=VAGRANT,
                         capture_output=True, text=True, timeout=60, check=True,
                         env={**os.environ, "SRMIG_VAGRANT_PKI": str(host)})
    calls = json.loads(out.stdout.splitlines()[-1])
    assert sorted(p.name for p in host.iterdir()) == ["hv1", "hv2"]     # not the client's, not root's
    assert host.stat().st_mode & 0o777 == 0o700
    for hv in ("hv1", "hv2"):
        folder = _synced(calls, hv)[f"/etc/srmig/pki/{hv}"]
        assert folder["host"] == str(host / hv) and folder["owner"] == "root"
        assert sorted(p.name for p in (host / hv).iterdir()) == ["ca.pem", "cert.pem", "key.pem", "password"]
        for f in (host / hv).iterdir():
            assert f.read_bytes() == (guest / hv / f.name).read_bytes(), f
            assert f.stat().st_mode & 0o777 == 0o600, f
        assert _synced(calls, "client").get(f"/etc/srmig/pki/{hv}") is None


# --- demo.sh's parts (lib.sh: demo_domain_xml, demo_ready, demo_report) ------------------------------------

def test_demo_guest_is_dual_stack():
    """The domain demo.sh starts, with its defaults: the agent's own parser (records.domain) finds both
    addresses in the metadata, the IPv6 one the VM's id; the guest's kernel command line has the IPv4
    address and the taps' anycast IPv4 gateway."""
    from srmig.ctl import records
    from srmig.testbed import guest

    try:
        guest.image()
    except FileNotFoundError as e:  # domain_xml names the image's files
        pytest.skip(str(e))
    demo = (PROVISION / "demo.sh").read_text()
    vm = re.search(r"\$\{SRMIG_VM_ADDR:-([^}]+)\}", demo).group(1)
    vm4 = re.search(r"\$\{SRMIG_VM_ADDR4-([^}]+)\}", demo).group(1)
    xml = _lib(f'demo_domain_xml "{sys.executable}" srmig-vm {vm} {vm4}').stdout
    name, vm_id, _tap, addresses = records.domain(xml)
    assert (name, vm_id, addresses) == ("srmig-vm", vm, (vm, vm4.split("/")[0]))
    cmdline = re.search(r"<cmdline>([^<]*)</cmdline>", xml).group(1).split()
    assert f"srmig.addr4={vm4}" in cmdline and "srmig.gw4=198.51.100.1" in cmdline
    xml6 = _lib(f'demo_domain_xml "{sys.executable}" srmig-vm {vm} ""').stdout  # SRMIG_VM_ADDR4="": IPv6 only
    assert records.domain(xml6)[3] == (vm,) and "srmig.addr4" not in xml6


@pytest.mark.netns
def test_demo_ready_and_report_per_family(tmp_path):
    """demo_ready waits for every address and names the family that never answers; demo_report prints a line
    per family from the probe's real --json, as demo.sh runs them. In a namespace of our own: its loopback
    answers both families, and nothing else is routed."""
    ns = f"srmig-{os.getpid()}-vdemo"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True, timeout=10)
        py = sys.executable

        def in_ns(script: str) -> subprocess.CompletedProcess:
            return subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", f'. "{PROVISION}/lib.sh"; {script}'],
                                  capture_output=True, text=True, timeout=60)

        r = in_ns(f'demo_ready "{py}" 10 ::1 127.0.0.1')
        assert r.returncode == 0, r.stdout + r.stderr
        t0 = time.monotonic()
        r = in_ns(f'demo_ready "{py}" 2 ::1 192.0.2.99')   # (no route to it here)
        assert r.returncode == 1 and "no answer from 192.0.2.99 (IPv4)" in r.stderr and "::1" not in r.stderr
        assert time.monotonic() - t0 < 30

        probe = subprocess.run([py, "-m", "srmig.testbed.probe", "::1", "127.0.0.1", "--rate", "200", "--count",
                                "20", "--timeout", "0.5", "--json", "--netns", ns],
                               capture_output=True, text=True, timeout=60)
        assert probe.returncode == 0, probe.stderr
        (tmp_path / "probe.json").write_text(probe.stdout)
        (tmp_path / "migrate.out").write_text("error: operation failed: migration out job: unexpectedly failed\n")
        for rc in (0, 1):
            out = _lib(f'demo_report "{py}" "{tmp_path}/probe.json" 200 10.0 11.5 {rc} "{tmp_path}/migrate.out"')
            lines = out.stdout.splitlines()
            assert "200 probes/s per family, migration 1.50 s" in lines[0]
            assert [ln.split()[:7] for ln in lines[1:3]] == [
                [fam, "sent", "20", "lost", "0", "duplicated", "0"] for fam in ("IPv6", "IPv4")]
            assert len(lines) == 3 + rc and ("migration error: error: operation failed" in out.stdout) == bool(rc)
    finally:
        subprocess.run(["ip", "netns", "del", ns], timeout=10)


# --- etcd as client.sh runs it -----------------------------------------------------------------------------

def _lib(script: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`script` after sourcing lib.sh: the functions client.sh calls."""
    r = subprocess.run(["sh", "-c", f'. "{PROVISION}/lib.sh"; {script}'], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.netns
def test_etcd_credentials_and_roles(calls, tmp_path):
    """client.sh's etcd part (lib.sh's etcd_pki and etcd_auth) for the Vagrantfile's agents, against a real
    etcd started as client.sh configures Debian's (TLS, --client-cert-auth) on loopback."""
    from srmig.ctl.statedb import Auth, PermissionDenied, Tls
    from srmig.ctl.statedb.etcd import EtcdKv

    env = _role(calls, "client")["kw"]["env"]
    hosts, ingress = env["SRMIG_HOSTS"].split(), env["SRMIG_NAME"]
    pki = tmp_path / "pki"
    _lib(f'etcd_pki "{pki}" 127.0.0.1 root {ingress} {" ".join(hosts)}')
    ca_key = (pki / "ca-key.pem").read_bytes()
    _lib(f'etcd_pki "{pki}" 127.0.0.1 root {ingress} {" ".join(hosts)}')    # a second run keeps them
    assert (pki / "ca-key.pem").read_bytes() == ca_key
    for name in ["root", ingress, *hosts]:
        subject = subprocess.run(["openssl", "x509", "-in", str(pki / name / "cert.pem"), "-noout", "-subject"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout
        assert subject.strip() == f"subject=OU = {name}"     # no CN: etcd 3.4's gateway refuses one
        assert (pki / name / "key.pem").stat().st_mode & 0o077 == 0

    port, peer = _free_port(), _free_port()
    endpoint = f"https://127.0.0.1:{port}"
    etcd = subprocess.Popen(
        ["etcd", "--name", "vtest", "--data-dir", str(tmp_path / "data"),
         "--listen-client-urls", endpoint, "--advertise-client-urls", endpoint,
         "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls",
         f"http://127.0.0.1:{peer}", "--initial-cluster", f"vtest=http://127.0.0.1:{peer}",
         "--cert-file", str(pki / "server.pem"), "--key-file", str(pki / "server-key.pem"),
         "--trusted-ca-file", str(pki / "ca.pem"), "--client-cert-auth", "--logger", "zap", "--log-level", "warn"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "etcd.log", "w"))
    try:
        root = pki / "root"
        deadline = time.monotonic() + 30
        while subprocess.run(["etcdctl", "--endpoints", endpoint, "--cacert", str(root / "ca.pem"),
                              "--cert", str(root / "cert.pem"), "--key", str(root / "key.pem"),
                              "endpoint", "health"], env={**os.environ, "ETCDCTL_API": "3"},
                             capture_output=True, timeout=10).returncode != 0:
            assert etcd.poll() is None and time.monotonic() < deadline, (tmp_path / "etcd.log").read_text()
            time.sleep(0.2)
        py, users = sys.executable, " ".join(hosts)
        _lib(f'etcd_auth "{py}" "{pki}" {endpoint} "{users}" {ingress}')
        r = _lib(f'etcd_auth "{py}" "{pki}" {endpoint} "{users}" {ingress}')   # again, now as root
        assert "authentication on" in r.stdout

        def kv(name: str) -> EtcdKv:
            d = pki / name
            return EtcdKv([endpoint], tls=Tls(str(d / "ca.pem"), str(d / "cert.pem"), str(d / "key.pem")),
                          auth=Auth(name, (d / "password").read_text().splitlines()[0]))

        s, d = hosts
        with kv(s) as hv:
            hv.put(f"hosts/{s}", {"up": True})
            hv.put(f"migrations/{s}/vm1", {"phase": "prepare"})
            with pytest.raises(PermissionDenied):
                hv.put(f"hosts/{d}", {"up": True})
            with pytest.raises(PermissionDenied):
                hv.put(f"migrations/{d}/vm1", {"phase": "prepare"})
            assert hv.denied == 2
        with kv(ingress) as edge:
            assert edge.get(f"hosts/{s}").value == {"up": True}
            with pytest.raises(PermissionDenied):
                edge.put("vms/vm1", {"segments": []})
        with pytest.raises(Exception, match="(?i)certificate|TLS|SSL|handshake|refused"):
            # the CA's, without a client certificate: etcd --client-cert-auth refuses the handshake
            with EtcdKv([endpoint], tls=Tls(str(pki / "ca.pem"))) as anon:
                anon.put("vms/vm1", {})
    finally:
        etcd.terminate()
        try:
            etcd.wait(timeout=10)
        except subprocess.TimeoutExpired:
            etcd.kill()
            etcd.wait(timeout=10)
