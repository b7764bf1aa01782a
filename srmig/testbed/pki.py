"""Certificates for etcd's mutual TLS in tests, benches and demos, made with `cryptography`.

    pki = Pki(directory)                        # a CA: directory/ca.pem (and ca-key.pem)
    pki.server("etcd", ["127.0.0.1"])           # the member's certificate, valid for those addresses
    pki.client("hv1")                           # an agent's: OU=hv1 and no CN (etcd 3.4's JSON gateway
                                                # refuses a client certificate with a CN once etcd's
                                                # authentication is on; the user logs in with a password)

Keys are ECDSA P-256 (fast to make, and what etcd's own docs use with cfssl), written mode 0600 into a
directory made 0700. Nothing here is for production: a deployment makes its certificates with its own CA
(docs/operations.md, "Certificates for etcd").

    python -m srmig.testbed.pki DIR --server ADDR... --client NAME...   # the same from the shell
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

VALID_DAYS = 365


@dataclass(frozen=True)
class Pair:
    cert: str
    key: str


def _crypto():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as e:
        raise ImportError(f"{e}: the testbed's etcd certificates need `cryptography` (run ./run setup)") from e
    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def _write(path: Path, data: bytes, mode: int) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)    # an existing file keeps its old mode through O_CREAT
    return str(path)


class Pki:
    """A CA in `directory` (created 0700 if missing; an existing CA there is reused) and the certificates
    it signs."""

    def __init__(self, directory: str | Path, name: str = "srmig test CA"):
        x509, hashes, serialization, ec, _, NameOID = _crypto()
        self.dir = Path(directory)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.ca_file = str(self.dir / "ca.pem")
        key_path = self.dir / "ca-key.pem"
        if key_path.exists() and Path(self.ca_file).exists():
            self._key = serialization.load_pem_private_key(key_path.read_bytes(), None)
            self._cert = x509.load_pem_x509_certificate(Path(self.ca_file).read_bytes())
            return
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self._cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(self._key, hashes.SHA256()))
        _write(key_path, self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()), 0o600)
        _write(Path(self.ca_file), self._cert.public_bytes(serialization.Encoding.PEM), 0o644)

    def _issue(self, stem: str, common_name: str, server_names: list[str], server: bool) -> Pair:
        x509, hashes, serialization, ec, EKU, NameOID = _crypto()
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        # etcd 3.4's JSON gateway dials its own gRPC port with the member's certificate as a client
        # certificate, so a member's certificate is for both ends of TLS.
        usages = [EKU.SERVER_AUTH, EKU.CLIENT_AUTH] if server else [EKU.CLIENT_AUTH]
        # a client's name goes in OU: etcd 3.4's gateway refuses any request whose certificate has a CN once
        # authentication is on ("CommonName of client sending a request against gateway will be ignored")
        attr = NameOID.COMMON_NAME if server else NameOID.ORGANIZATIONAL_UNIT_NAME
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(attr, common_name)]))
             .issuer_name(self._cert.subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
        if server_names:
            alt = []
            for n in server_names:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(n.strip("[]"))))
                except ValueError:
                    alt.append(x509.DNSName(n))
            b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = b.sign(self._key, hashes.SHA256())
        return Pair(
            cert=_write(self.dir / f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644),
            key=_write(self.dir / f"{stem}-key.pem",
                       key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()), 0o600))

    def server(self, name: str, addresses: list[str]) -> Pair:
        """An etcd member's certificate: valid for `addresses` (IP addresses or DNS names), which is what the
        clients verify against the endpoint they dial."""
        return self._issue(f"server-{name}", name, list(addresses), server=True)

    def client(self, name: str) -> Pair:
        """An agent's client certificate, OU=`name`, no CN."""
        return self._issue(f"client-{name}", name, [], server=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m srmig.testbed.pki",
                                description="A test CA and certificates for etcd's mutual TLS (not for production).")
    p.add_argument("dir")
    p.add_argument("--server", nargs="*", default=[], metavar="ADDR", help="the etcd member's addresses")
    p.add_argument("--client", nargs="*", default=[], metavar="NAME", help="one client certificate per name")
    a = p.parse_args(argv)
    pki = Pki(a.dir)
    print(f"ca {pki.ca_file}")
    if a.server:
        s = pki.server("etcd", a.server)
        print(f"server {s.cert} {s.key}")
    for name in a.client:
        c = pki.client(name)
        print(f"client {name} {c.cert} {c.key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
