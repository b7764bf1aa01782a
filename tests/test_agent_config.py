"""The agent's configuration (no root): agent.toml parsed with its defaults, every error as one line naming
file, key and expected form, `srmig agent --check`, and the srmig metadata that makes a libvirt domain a
managed VM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from srmig.ctl import config, records
from srmig.ctl.agent import Domain, metadata_xml
from srmig.ctl.phases import HostSids


GOOD = """
[host]
name = "hv1"
fabric = "eth1"
locator = "fc00:0:1::/48"
address = "2001:db8:a::2"
transit = ["fc00:0:3::e"]
sr_domain = ["2001:db8::/32"]

[ingress]
interface = "eth0"
gateway = "2001:db8:c::2"

[db]
backend = "etcd"
endpoints = ["http://[2001:db8:c::1]:2379"]
insecure = true

[hook]
ack_timeout_s = 1.5
on_timeout = "refuse"
"""


def test_good_config_and_defaults():
    cfg = config.parse(GOOD, "agent.toml")
    assert cfg.host.sids == HostSids("hv1", "fc00:0:1::d6", "fc00:0:1::5", "fc00:0:1::b")
    assert cfg.host.transit == ("fc00:0:3::e",) and cfg.host.sr_domain == ("2001:db8::/32",)
    assert cfg.host.xdp_mode == "native" and cfg.host.tap_queue == 10000 and cfg.host.drain is True
    assert cfg.ingress.gateway == "2001:db8:c::2"
    assert cfg.db.backend == "etcd" and cfg.db.endpoints == ("http://[2001:db8:c::1]:2379",)
    assert cfg.db.insecure is True and cfg.db.ca_file is None
    assert cfg.hook.on_timeout == "refuse" and cfg.hook.ack_timeout_s == 1.5
    assert cfg.metrics_listen == "127.0.0.1:9477"
    assert [w.split(": ")[1] for w in cfg.warnings] == ["db.insecure"]


def test_config_docstring_example_parses():
    """The example at the top of srmig/ctl/config.py is the reference: it must stay valid."""
    text = config.__doc__.split("\n\n", 1)[1].split("\nA VM is managed")[0]
    example = "\n".join(line[4:] for line in text.splitlines())
    cfg = config.parse(example, "example")
    assert cfg.host.fabric == "eth1" and cfg.ingress.name == "edge1"
    # and its metadata, as the agent reads a domain's: a dual-stack VM
    metadata = config.__doc__.split("\nA VM is managed")[1].split(":\n", 1)[1]
    assert records.domain(f"<domain><name>vm1</name>{metadata}</domain>")[3] == ("2001:db8:100::10", "198.51.100.10")


HOST = "[host]\nfabric = 'eth1'\nlocator = 'fc00:0:1::/48'\naddress = '2001:db8::1'\nsr_domain = ['fc00::/16']\n"
ETCD = "[ingress]\ninterface = 'eth0'\ngateway = '2001:db8::1'\n[db]\nbackend = 'etcd'\n"

BAD = [
    ("[host]\nfabric = 'eth1'\naddress = '2001:db8::1'\n", "host.sids.dx6", "IPv6 address"),
    # the SR domain is closed by default: no implicit "every source"
    ("[host]\nfabric = 'eth1'\nlocator = 'fc00:0:1::/48'\naddress = '2001:db8::1'\n", "host.sr_domain",
     'sr_domain = ["::/0"] accepts every source'),
    ("[host]\nfabric = 'eth1'\nlocator = 'fc00:0:1::/48'\naddress = '2001:db8::1'\nsr_domain = []\n",
     "host.sr_domain", "the SR domain's source prefixes"),
    # etcd: TLS unless insecure = true says otherwise, and then every file it needs
    (ETCD, "db.ca_file", "https:// endpoints need db.ca_file, db.cert_file and db.key_file"),  # the default
    (ETCD + "endpoints = ['http://[2001:db8:c::1]:2379']\n", "db.endpoints", "only with db.insecure = true"),
    (ETCD + "endpoints = ['https://a:2379', 'http://b:2379']\ninsecure = true\n", "db.endpoints", "one scheme"),
    (ETCD + "endpoints = ['https://a:2379']\nca_file = '/nonexistent/ca.pem'\n", "db.ca_file",
     "a readable PEM file, the CA certificate that signed etcd's (No such file or directory)"),
    (ETCD + "endpoints = ['https://a:2379']\nca_file = '/dev/null'\n", "db.cert_file",
     "a PEM file, this agent's client certificate"),
    (ETCD + "endpoints = ['https://a:2379']\ninsecure = 'yes'\n", "db.insecure", "true or false"),
    # etcd's user: with its password file, which must be root's alone (tried on real files in test_etcd_auth)
    (ETCD + "user = 'hv1'\n", "db.password_file", "db.user and db.password_file together"),
    (ETCD + "password_file = '/etc/srmig/pw'\n", "db.user", "db.user and db.password_file together"),
    (ETCD + "user = 'hv1'\npassword_file = '/nonexistent/pw'\n", "db.password_file",
     "a root-only file holding the etcd user's password: cannot read /nonexistent/pw (No such file"),
    (ETCD + "user = 'hv1'\npassword_file = '/etc/passwd'\n", "db.password_file", "readable by others"),
    (ETCD + "user = 'a/b'\npassword_file = '/etc/passwd'\n", "db.user", "an etcd user name"),
    (HOST.replace("'2001:db8::1'", "'nope'"), "host.address", "IPv6 address"),
    ("[host]\nfabric = 'eth1'\nlocator = 'fc00::1::/48'\naddress = '2001:db8::1'\n", "host.locator", "prefix"),
    (HOST + "sids = {dx6 = 'fc00:9::d6'}\n", "host.sids.dx6", "inside host.locator"),
    (HOST + "xdp_mode = 'fast'\n", "host.xdp_mode", "native, generic"),
    (HOST + "hold_ring_pages = 1000\n", "host.hold_ring_pages", "power of two"),
    (HOST + "grace_s = -1\n", "host.grace_s", "number >= 0"),
    ("[host]\nfabric = 'eth1'\nlocator = 'fc00:0:1::/48'\naddress = '2001:db8::1'\nsr_domain = ['fc00::1/16']\n",
     "host.sr_domain[0]", "IPv6 prefix"),
    (HOST + "fabrik = 'x'\n", "host.fabrik", "known keys"),
    ("[ingress]\ninterface = 'eth0'\n", "ingress.gateway", "required"),
    ("[ingress]\ninterface = 'eth0'\ngateway = '2001:db8::1'\nencap = 'seg6'\n", "ingress.encap", "bpf, kernel"),
    ("[ingress]\ninterface = 'eth0'\ngateway = '2001:db8::1'\nsource = 'eth0'\n", "ingress.source", "IPv6 address"),
    ("[ingress]\ninterface = 'eth0'\ngateway = '2001:db8::1'\n[db]\nbackend = 'redis'\n", "db.backend",
     "embedded, etcd"),
    ("[ingress]\ninterface = 'eth0'\ngateway = '2001:db8::1'\n[db]\nendpoints = ['127.0.0.1:2379']\n",
     "db.endpoints", "list of URLs"),
    ("[ingress]\ninterface = 'eth0'\ngateway = '2001:db8::1'\n[metrics]\nlisten = '9477'\n", "metrics.listen",
     "HOST:PORT"),
    ("[ingress]\ninterface = 'eth0'\ngateway = '2001:db8::1'\n[hooks]\n", "hooks", "no such table"),
    ("[db]\nbackend = 'embedded'\n", "host", "[host] or an [ingress]"),
    ("[host\nfabric = 1\n", "(syntax)", "valid TOML"),
]


@pytest.mark.parametrize("text,key,expected", BAD, ids=[b[1] for b in BAD])
def test_bad_config_names_file_key_and_form(text, key, expected):
    with pytest.raises(config.ConfigError) as e:
        config.parse(text, "/etc/srmig/agent.toml")
    msg = str(e.value)
    assert msg.startswith(f"/etc/srmig/agent.toml: {key}: expected "), msg
    assert expected in msg and "\n" not in msg


def test_bad_config_exits_nonzero_and_installs_nothing(tmp_path):
    sock = tmp_path / "agent.sock"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"[host]\nfabric = 'eth1'\nlocator = 'fc00:0:1::/48'\naddress = 'x'\nsr_domain = ['fc00::/16']\n"
                   f"[hook]\nsocket = '{sock}'\n")
    out = subprocess.run([sys.executable, "-m", "srmig", "agent", "--config", str(cfg)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip() == f"srmig: error: {cfg}: host.address: expected an IPv6 address, got 'x'"
    assert not sock.exists()
    missing = subprocess.run([sys.executable, "-m", "srmig", "agent", "--config", str(tmp_path / "nope.toml")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "nope.toml: (file): expected a readable file" in missing.stderr


def _check(cfg) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "srmig", "agent", "--config", str(cfg), "--check"],
                          capture_output=True, text=True, timeout=60)


def test_etcd_tls_files(tmp_path):
    """https:// endpoints with the CA, the client certificate and its key: accepted with no warning when the
    key is root-only; a key others can read is a warning naming the chmod."""
    from srmig.testbed.pki import Pki

    pki = Pki(tmp_path / "pki")
    pair = pki.client("ing1")
    text = (ETCD + f"endpoints = ['https://[2001:db8:c::1]:2379']\nca_file = '{pki.ca_file}'\n"
            f"cert_file = '{pair.cert}'\nkey_file = '{pair.key}'\n")
    cfg = config.parse(text, "agent.toml")
    assert (cfg.db.ca_file, cfg.db.cert_file, cfg.db.key_file, cfg.db.insecure) == \
        (pki.ca_file, pair.cert, pair.key, False)
    assert cfg.warnings == ()
    path = tmp_path / "agent.toml"
    path.write_text(text)
    out = _check(path)
    assert out.returncode == 0 and out.stderr == "" and out.stdout.strip() == f"{path}: ok (ingress)"
    Path(pair.key).chmod(0o644)
    out = _check(path)
    assert out.returncode == 0 and out.stderr == (f"srmig: warning: {path}: db.key_file: {pair.key} is mode 0644, "
                                                  f"readable by others (chmod 600 {pair.key})\n")


def test_check_warns_about_plain_http_etcd_and_an_open_domain(tmp_path):
    """insecure = true and sr_domain = ["::/0"] are allowed, explicitly, and --check says so: one line each."""
    path = tmp_path / "agent.toml"
    path.write_text(HOST.replace("['fc00::/16']", "['::/0']") + "[db]\nbackend = 'etcd'\n"
                    "endpoints = ['http://127.0.0.1:2379']\ninsecure = true\n")
    out = _check(path)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"srmig: warning: {path}: ") for line in lines), lines
    assert "db.insecure: etcd over plain http://" in lines[0] and "use https://" in lines[0]
    assert 'host.sr_domain: "::/0" accepts packets to our SIDs from every source' in lines[1]
    assert config.load(path).host.sr_domain == ("::/0",)


# (IPv6 forwarding, IPv4 forwarding) on the fabric -> the families --check warns about
FORWARDING = [((0, 0), ["IPv6", "IPv4"]), ((1, 0), ["IPv4"]), ((0, 1), ["IPv6"]), ((1, 1), [])]


@pytest.mark.netns
def test_check_warns_when_the_fabric_does_not_forward(tmp_path):
    """The dataplane delivers by a FIB lookup from the fabric, which the kernel refuses where that family's
    forwarding is off there: --check says so, a line per family, naming the sysctl to set. In a namespace of
    our own with the fabric a veth; an interface that is not there gets no warning."""
    ns = f"srmig-{os.getpid()}-fwd"
    path = tmp_path / "agent.toml"
    path.write_text(HOST.replace("'eth1'", "'fab0'"))
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        def check() -> list[str]:
            out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "srmig", "agent", "--config",
                                  str(path), "--check"], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0 and out.stdout.strip() == f"{path}: ok (host)", out.stderr
            return out.stderr.splitlines()

        assert check() == []  # no fab0 here yet
        subprocess.run(["ip", "-n", ns, "link", "add", "fab0", "type", "veth", "peer", "name", "fab0p"], check=True,
                       timeout=10)
        for (v6, v4), families in FORWARDING:
            for key, v in (("net.ipv6.conf.fab0.forwarding", v6), ("net.ipv4.conf.fab0.forwarding", v4)):
                subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={v}"], check=True, timeout=10)
            lines = check()
            assert len(lines) == len(families), lines
            for line, family in zip(lines, families):
                key, fix = (("net.ipv6.conf.fab0.forwarding", "net.ipv6.conf.all.forwarding=1") if family == "IPv6"
                            else ("net.ipv4.conf.fab0.forwarding", "net.ipv4.ip_forward=1"))
                assert line.startswith(f"srmig: warning: {path}: host.fabric: {key} is 0: nothing reaches the "
                                       f"VMs' {family} addresses") and line.endswith(f"sysctl -w {fix}"), line
    finally:
        subprocess.run(["ip", "netns", "del", ns], timeout=10)


def test_ingress_encap_and_source():
    cfg = config.parse("[ingress]\ninterface = 'eth0'\ngateway = '2001:db8:c::2'\n", "agent.toml")
    assert cfg.ingress.encap == "bpf" and cfg.ingress.source is None  # defaults: BPF, interface's address
    cfg = config.parse("[ingress]\ninterface = 'eth0'\ngateway = '2001:db8:c::2'\nencap = 'kernel'\n"
                       "source = '2001:db8:c:0::1'\n", "agent.toml")
    assert cfg.ingress.encap == "kernel" and cfg.ingress.source == "2001:db8:c::1"


def test_check_refuses_kernel_encap_without_kernel_srv6(tmp_path):
    """encap = "kernel" passes --check where the kernel has SRv6 lwtunnels, and fails it with one line naming
    the fix where it has not: the expected outcome comes from this kernel, tried the same way."""
    from srmig.check import kernel_srv6

    cfg = tmp_path / "agent.toml"
    cfg.write_text("[ingress]\ninterface = 'eth0'\ngateway = '2001:db8:c::2'\nencap = 'kernel'\n")
    out = subprocess.run([sys.executable, "-m", "srmig", "agent", "--config", str(cfg), "--check"],
                         capture_output=True, text=True, timeout=60)
    has_srv6, reason = kernel_srv6()
    if has_srv6:
        assert out.returncode == 0 and out.stdout.strip() == f"{cfg}: ok (ingress)", out.stderr
    else:
        assert out.returncode == 1 and out.stdout == ""
        assert out.stderr.strip() == (f'srmig: error: {cfg}: ingress.encap: "kernel" needs SRv6 lwtunnels, which '
                                      f'this kernel lacks ({reason.removeprefix("absent: ")}): use encap = "bpf" '
                                      f'(the default)')


def test_domain_metadata_round_trip():
    xml = (f"<domain><name>vm1</name><metadata>{metadata_xml('2001:db8:100:0::10')}</metadata>"
           "<devices><interface type='ethernet'><target dev='tap7'/></interface></devices></domain>")
    assert Domain.from_xml(xml) == Domain("vm1", "2001:db8:100::10", "tap7")
    assert Domain.from_xml("<domain><name>other</name></domain>") is None
