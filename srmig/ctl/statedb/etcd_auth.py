"""Least privilege in etcd: which keys each agent's etcd user may write and read, and the users and roles
made from that (etcd's authentication: users, roles, permissions on key ranges).

One etcd user per agent, named as the agent (`[host] name`, `[ingress] name`), with one role per part it
plays: `srmig-host-<name>`, `srmig-ingress-<name>`. Keys are relative to the database's prefix (/srmig/):

    role                 writes                                          reads
    srmig-host-<name>    hosts/<name>, agents/<name>,                    hosts/, migrations/, acks/,
                         migrations/<name>/..., vms/...                  ingresses/
    srmig-ingress-<name> agents/<name>, ingresses/<name>, acks/...       vms/, hosts/
    root (the operator)  everything, and the users and roles

A host writes its own host record, presence and migration records only: another host's identity cannot
forge the events of a migration it is not an end of. `vms/` (the segment lists) is every host's to write:
which host may move a VM is decided by the migration, not by a key, so etcd cannot tell the owner (a
host's identity can still redirect any VM; the ingress's cannot). An ingress reads the segment lists
and writes its acknowledgements only.

`permissions()` is the one list; `init_auth()` applies it through an EtcdKv (as root, or before
authentication is on); `etcdctl_commands()` spells it for operators (docs/operations.md).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from srmig.ctl.statedb.etcd import EtcdKv, _bytes_end

ROOT = "root"           # etcd's own: the user that may change users and roles once authentication is on


@dataclass(frozen=True)
class Perm:
    key: str            # relative to the database's prefix
    prefix: bool        # every key starting with `key` (else exactly `key`)
    write: bool         # READWRITE (else READ)


def role_name(part: str, name: str) -> str:
    return f"srmig-{part}-{name}"


def permissions(part: str, name: str) -> list[Perm]:
    """What agent `name` may do as `part` ("host" or "ingress")."""
    if "/" in name or not name:
        raise ValueError(f"agent name {name!r}: a name without '/' (it is part of the keys)")
    if part == "host":
        return [Perm(f"hosts/{name}", False, True), Perm(f"agents/{name}", False, True),
                Perm(f"migrations/{name}/", True, True), Perm("vms/", True, True),
                Perm("hosts/", True, False), Perm("migrations/", True, False), Perm("acks/", True, False),
                Perm("ingresses/", True, False)]
    if part == "ingress":
        return [Perm(f"agents/{name}", False, True), Perm(f"ingresses/{name}", False, True),
                Perm("acks/", True, True), Perm("vms/", True, False), Perm("hosts/", True, False)]
    raise ValueError(f"unknown part {part!r}: expected 'host' or 'ingress'")


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


BENIGN = ("already exists", "already granted")     # what a second run is told


def _call(kv: EtcdKv, path: str, payload: dict) -> bool:
    """False when etcd says it is done already (BENIGN)."""
    try:
        kv._call(path, payload)
    except RuntimeError as e:
        if not any(b in str(e) for b in BENIGN):
            raise
        return False
    return True


def add_user(kv: EtcdKv, name: str, password: str, parts: tuple[str, ...]) -> None:
    """User `name` (its password set again when it exists) with a role per part; idempotent."""
    if not _call(kv, "auth/user/add", {"name": name, "password": password}):
        kv._call("auth/user/changepw", {"name": name, "password": password})
    for part in parts:
        role = role_name(part, name)
        _call(kv, "auth/role/add", {"name": role})
        for p in permissions(part, name):
            full = (kv.prefix + p.key).encode()
            perm = {"key": _b64(full), "permType": "READWRITE" if p.write else "READ"}
            if p.prefix:
                perm["range_end"] = _b64(_bytes_end(full))
            kv._call("auth/role/grant", {"name": role, "perm": perm})
        _call(kv, "auth/user/grant", {"user": name, "role": role})


def init_auth(kv: EtcdKv, root_password: str, users: dict[str, tuple[str, tuple[str, ...]]]) -> None:
    """Make the root user (the operator's), one user per agent ({name: (password, parts)}), their roles, and
    turn etcd's authentication on. `kv`: connected as root, or to an etcd whose authentication is still off.
    Idempotent: run again to add agents or set their passwords."""
    _call(kv, "auth/user/add", {"name": ROOT, "password": root_password})
    _call(kv, "auth/user/grant", {"user": ROOT, "role": "root"})
    for name, (password, parts) in users.items():
        add_user(kv, name, password, parts)
    kv._call("auth/enable", {})


def etcdctl_commands(prefix: str, agents: dict[str, tuple[str, ...]]) -> list[str]:
    """The same as init_auth, for etcdctl (which asks for the passwords): {name: parts}."""
    out = ["etcdctl user add root", "etcdctl user grant-role root root"]
    for name, parts in agents.items():
        out.append(f"etcdctl user add {name}")
        for part in parts:
            role = role_name(part, name)
            out.append(f"etcdctl role add {role}")
            for p in permissions(part, name):
                out.append(f"etcdctl role grant-permission {role} {'readwrite' if p.write else 'read'} "
                           f"{'--prefix ' if p.prefix else ''}{prefix}{p.key}")
            out.append(f"etcdctl user grant-role {name} {role}")
    out.append("etcdctl auth enable")
    return out
