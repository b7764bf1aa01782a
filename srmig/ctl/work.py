"""What the agent's one worker is asked to do: a type per kind of item. Producers (libvirt's callbacks, the
database's watches, the hook server, timers) only build these and enqueue them; `Agent.HANDLERS` maps each
type to the method that applies it."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DbUp:
    """The state database answers (srmig.ctl.statedb)."""

    kv: object


@dataclass(frozen=True)
class DbMigrations:
    """migrations/<host>/<vm> records changed (a watch's events)."""

    events: list


@dataclass(frozen=True)
class LibvirtUp:
    conn: object


@dataclass(frozen=True)
class LibvirtDown:
    reason: str


@dataclass(frozen=True)
class Lifecycle:
    """A libvirt domain lifecycle event, by name (srmig.ctl.libvirt_events.lifecycle_names)."""

    domain: str
    type: str
    detail: str
    t_ns: int  # time.monotonic_ns() when the callback ran


@dataclass(frozen=True)
class Iteration:
    domain: str
    iteration: int
    t_ns: int


@dataclass(frozen=True)
class JobCompleted:
    domain: str
    params: dict
    t_ns: int


@dataclass(frozen=True)
class SourceCheck:
    """The destination resumed the VM SOURCE_SILENT_S ago: has the source said it paused?"""

    vm: str
    migration: str


@dataclass(frozen=True)
class GraceOver:
    vm: str
    migration: str


@dataclass(frozen=True)
class Recheck:
    """A source VM paused by its migration after a reconnect: poll its state again."""

    vm: str
    migration: str


@dataclass(frozen=True)
class Forget:
    """An AWAY map entry nothing explains: delete it if still so."""

    vm: str


@dataclass(frozen=True)
class Call:
    """Deferred work of the executor (srmig.ctl.executor.Owner.later)."""

    fn: Callable
    args: tuple = ()


@dataclass(frozen=True)
class HookBegin:
    """`migrate begin` from the libvirt hook: answered through `result`."""

    domain_xml: str
    result: Future = field(default_factory=Future)


@dataclass(frozen=True)
class Status:
    result: Future = field(default_factory=Future)


@dataclass(frozen=True)
class Noop:
    """Answered once everything queued before it is applied."""

    result: Future = field(default_factory=Future)


@dataclass(frozen=True)
class Stop:
    pass


Item = (DbUp | DbMigrations | LibvirtUp | LibvirtDown | Lifecycle | Iteration | JobCompleted | SourceCheck
        | GraceOver | Recheck | Forget | Call | HookBegin | Status | Noop | Stop)
