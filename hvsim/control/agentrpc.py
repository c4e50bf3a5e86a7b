"""The host agent's RPC: request and response bodies shared by the agent (server,
:mod:`hvsim.control.hostagent`) and its client (:mod:`hvsim.control.agent_client`, used by the
manager and by a source agent driving a migration to another agent).

HTTP/JSON (FastAPI on the agent, httpx on the client), like the manager API: over a unix socket
(0600 in a 0700 directory) on the same machine, over TCP with mutual TLS (certificates from
:mod:`hvsim.control.pki`) across machines. Every mutating call carries the caller's **fencing
token** in the ``X-Fencing-Token`` header (the create-revision of the manager's lease key): the agent
remembers the newest it has seen (on disk, across its restarts) and refuses an older one with 409,
so a manager that lost its lease cannot change anything on a host, whatever it believes. A manager
also sends ``X-Fencing-Until`` (wall clock, seconds): the latest time its lease is held for sure; a
call that arrives later is refused too (a manager frozen between its own check and the send). Every
mutating call, accepted or refused, is appended to the agent's history (``GET /v1/history``).
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, Strict
from pydantic.dataclasses import dataclass

from .state import CFG, DataImage, InstanceProfile, Name, Network, Text, VMRecord

FENCE_HEADER = "X-Fencing-Token"
FENCE_UNTIL_HEADER = "X-Fencing-Until"
AgentAddress = Annotated[str, Field(max_length=256, pattern=r"^(unix:/[\x21-\x7e]+|https://[\x21-\x7e]+)$",
                                    description="a host agent: unix:/PATH or https://IP:PORT")]
MigrationId = Annotated[str, Field(pattern=r"^[a-z0-9:>._-]{1,128}$", description="a migration id")]
Policy = Annotated[str, Field(pattern=r"^(qemu-default|stepwise|hvsim-predictive)$")]
Capability = Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,40}$")]


@dataclass(config=CFG)
class GuestSpec:
    """What the manager knows of a VM, as the agent needs it to start one. A disk (``disk_mib``
    > 0) lives in the declared datastore directory (shared by every host), created on first start."""
    name: Name
    vcpus: Annotated[int, Strict(), Field(ge=1, le=64)] = 1
    memory_mib: Annotated[int, Strict(), Field(ge=64, le=1024 * 1024)] = 256
    disk_mib: Annotated[int, Strict(), Field(ge=0, le=16 * 1024 * 1024)] = 0
    profile: InstanceProfile | None = None      # the machine (type, CPU, disk bus); absent: the defaults
    network: Network = None                     # a NIC on the inter-cloud network (the agent's --wan)
    data_image: DataImage = None                # the disk filled from this image (the agent's --import-dir)
    clone_of: Name | None = None                # the disk is a copy-on-write overlay of this VM's (clone-disk)


def guest_spec(vm: VMRecord) -> GuestSpec:
    """What a host agent needs of the manager's record ``vm`` to start it."""
    return GuestSpec(name=vm.name, vcpus=vm.vcpus, memory_mib=max(64, vm.memory_mib), disk_mib=vm.disk_mib,
                     profile=vm.profile, network=vm.network, data_image=vm.data_image, clone_of=vm.clone_of)


@dataclass(config=CFG)
class StartRequest:
    vm: GuestSpec
    wait_ready: Annotated[bool, Strict()] = True
    ready_timeout: Annotated[float, Strict(), Field(gt=0, le=600)] = 120.0


@dataclass(config=CFG)
class StopRequest:
    timeout: Annotated[float, Strict(), Field(gt=0, le=600)] = 60.0


@dataclass(config=CFG)
class ExecBody:
    command: Annotated[str, Field(min_length=1, max_length=4096)]
    timeout: Annotated[float, Strict(), Field(gt=0, le=3600)] = 30.0


@dataclass(config=CFG)
class MigrateOut:
    """To the source agent: migrate ``vm`` to ``destination`` (host name), whose agent is at
    ``destination_agent``. The source agent drives the whole migration (libvirt's peer-to-peer
    mode): it asks the destination agent to start the incoming QEMU, runs the policy loop on its
    own QEMU, and hands the VM off once the destination agent adopted it."""
    destination: Name
    destination_agent: AgentAddress
    policy: Policy = "hvsim-predictive"
    timeout: Annotated[float, Strict(), Field(gt=0, le=3600)] = 300.0
    migration_id: MigrationId | None = None


@dataclass(config=CFG)
class IncomingRequest:
    """To the destination agent: start an incoming QEMU for ``vm`` (``-incoming defer``)."""
    migration_id: MigrationId
    vm: GuestSpec
    source: Name


@dataclass(config=CFG)
class ListenRequest:
    capabilities: Annotated[list[Capability], Field(max_length=16)]


@dataclass(config=CFG)
class Listening:
    uri: Text


@dataclass(config=CFG)
class AgentInfo:
    host: Name
    datacenter: Name
    vcpus: Annotated[int, Strict()]
    memory_mib: Annotated[int, Strict()]
    cpu_overcommit: float
    memory_overcommit: float
    used_vcpus: Annotated[int, Strict()]
    used_memory_mib: Annotated[int, Strict()]
    address: Text
    pid: Annotated[int, Strict()]
    started_at: float
    token: int                      # the newest fencing token seen
    vms: Annotated[int, Strict()]
    power_domain: Text | None = None


@dataclass(config=CFG)
class MigrationInfo:
    id: Text
    vm: Name
    destination: Name
    state: Text                     # hvsim.migration's MigrationState value
    elapsed_s: float = 0.0
    passes: Annotated[int, Strict()] = 0
    transferred: Annotated[int, Strict()] = 0
    remaining: Annotated[int, Strict()] = 0
    total: Annotated[int, Strict()] = 0
    mbps: float = 0.0
    destination_started: Annotated[bool, Strict()] = False
    handed_off: Annotated[bool, Strict()] = False
    error: Text | None = None
    result: dict[str, Any] | None = None


@dataclass(config=CFG)
class QemuInfo:
    """One QEMU of a VM on this host: an adopted VM's, or an incoming migration's."""
    vm: Name
    role: Annotated[str, Field(pattern=r"^(vm|incoming)$")]
    pid: int | None
    qemu_status: Text               # QEMU's runstate (running, paused, inmigrate, postmigrate, ...) or "unknown"
    state: Text                     # the VM's state here (running, paused, migrating, starting, ...)
    busy_with: Text | None = None   # the operation holding it (start, migration to h2, ...)
    migration: MigrationInfo | None = None
    incoming_id: Text | None = None
    generation: Annotated[int, Strict()] = 0
    agent_socket: Text | None = None
    heartbeat_socket: Text | None = None
    console_log: Text | None = None
    boot_s: float | None = None     # its QEMU's launch to the guest agent's first answer (this host's view)


@dataclass(config=CFG)
class QemuList:
    items: list[QemuInfo]
    # VMs that ended here on their own (crashed, powered off, gone while the agent was down) -> why
    lost: dict[Name, Text] = Field(default_factory=dict)
    token: Annotated[int, Strict()] = 0      # the newest fencing token this agent has seen


@dataclass(config=CFG)
class HistoryItem:
    """One mutating command the agent received (see :class:`hvsim.control.fencing.HistoryEntry`)."""
    seq: Annotated[int, Strict()]
    wall: float
    verb: Text
    vm: Name | None
    token: Annotated[int, Strict()] | None
    accepted: Annotated[bool, Strict()]
    reason: Text = ""


@dataclass(config=CFG)
class HistoryPage:
    items: list[HistoryItem]
    last: Annotated[int, Strict()]           # the newest seq the agent has written (pass it as since)


@dataclass(config=CFG)
class ExecOutput:
    exit_code: Annotated[int, Strict()]
    stdout: str
    stderr: str
    signal: Annotated[int, Strict()] = 0
    timed_out: Annotated[bool, Strict()] = False
    truncated: Annotated[bool, Strict()] = False


@dataclass(config=CFG)
class Ok:
    ok: Annotated[bool, Strict()] = True
    detail: Text = ""
