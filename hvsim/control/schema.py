"""The manager API's request and response bodies (shared by the server and its client).
Requests carry only what a client may set; the rest of a record is the manager's."""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, Strict
from pydantic.dataclasses import dataclass

from .ops import OperationRecord
from .state import (
    CFG, DataImage, GroupRecord, HostRecord, InstanceProfile, Name, Network, ReservationRecord, RuleRecord, VMRecord,
)


@dataclass(config=CFG)
class HostCreate:
    name: Name
    datacenter: Name = "dc1"
    vcpus: Annotated[int, Strict(), Field(ge=1, le=4096)] = 4
    memory_mib: Annotated[int, Strict(), Field(ge=64, le=16 * 1024 * 1024)] = 4096
    cpu_overcommit: Annotated[float, Strict(), Field(ge=1.0, le=16.0)] = 1.0
    memory_overcommit: Annotated[float, Strict(), Field(ge=1.0, le=4.0)] = 1.0
    agent: Annotated[str | None, Field(max_length=256, pattern=r"^(unix:/[\x21-\x7e]+|https://[\x21-\x7e]+)$")] = None


@dataclass(config=CFG)
class VMDefine:
    name: Name
    vcpus: Annotated[int, Strict(), Field(ge=1, le=64)] = 1
    memory_mib: Annotated[int, Strict(), Field(ge=16, le=1024 * 1024)] = 256
    disk_mib: Annotated[int, Strict(), Field(ge=0, le=16 * 1024 * 1024)] = 0
    host: Name | None = None
    group: Name | None = None
    protected: Annotated[bool, Strict()] = False
    priority: Annotated[int, Strict(), Field(ge=0, le=1000)] = 0
    profile: InstanceProfile | None = None
    network: Network = None
    data_image: DataImage = None


@dataclass(config=CFG)
class RuleCreate:
    name: Name
    spec: dict[str, Any]


@dataclass(config=CFG)
class MigrateRequest:
    destination: Name
    policy: Annotated[str, Field(pattern=r"^(qemu-default|stepwise|hvsim-predictive)$")] = "hvsim-predictive"


@dataclass(config=CFG)
class ExecRequest:
    command: Annotated[str, Field(min_length=1, max_length=4096)]
    timeout: Annotated[float, Strict(), Field(gt=0, le=3600)] = 30.0


@dataclass(config=CFG)
class StopBody:
    timeout: Annotated[float, Strict(), Field(gt=0, le=600, description="seconds for the guest to power off")] = 60.0


@dataclass(config=CFG)
class LeaderBrief:
    manager: str
    address: str
    token: Annotated[int, Strict()]
    datacenter: str = ""


@dataclass(config=CFG)
class ErrorBody:
    detail: Annotated[str, Field(max_length=4096)]
    field: str | None = None
    operation: str | None = None        # 502: the operation that ran and failed; 503: the one left in flight
    not_leader: bool | None = None      # 503 from a manager that does not lead
    leader: LeaderBrief | None = None   # ... and who does (null: none known yet)
    applied: bool | None = None         # 503 not leader: false = nothing was written (send it to the leader)



# -- the inter-cloud network and clones (hvsim.control.wanops) ------------------------------------------
@dataclass(config=CFG)
class GuestAddressInfo:
    vm: Name
    host: Name
    network: str
    ip: str
    gateway: str
    prefixlen: Annotated[int, Strict()]


@dataclass(config=CFG)
class CloneRequest:
    name: Name


@dataclass(config=CFG)
class CloneDiskRequest:
    clone: Name


@dataclass(config=CFG)
class ServiceAddress:
    service_ip: str
    vm: Name
    host: Name


@dataclass(config=CFG)
class RunState:
    """Where the VM's QEMU runs and its runstate as QEMU reports it (``GET /v1/vms/{name}/runstate``):
    ``running``, ``paused``, ``inmigrate``, ``postmigrate``, ... (the record's ``power`` stays
    ``running`` while QEMU is paused: pause is not a recorded operation)."""
    vm: Name
    host: Name
    qemu_status: str
    state: str


@dataclass(config=CFG)
class GuestFile:
    """A file written into a guest (``PUT /v1/vms/{name}/files``): where, how big, its SHA-256 as
    the guest computed it."""
    vm: Name
    path: str
    size: int
    sha256: str


# -- responses --------------------------------------------------------------------------------
@dataclass(config=CFG)
class Health:
    status: str
    store: str
    revision: Annotated[int, Strict()]
    manager: str = ""
    leader: Annotated[bool, Strict()] = False
    token: Annotated[int, Strict()] = 0
    resolved: Annotated[int, Strict()] = 0
    state: str = ""
    datacenter: str = ""


@dataclass(config=CFG)
class ExecResult:
    exit_code: Annotated[int, Strict()]
    stdout: str
    stderr: str
    signal: Annotated[int, Strict()] = 0
    timed_out: Annotated[bool, Strict()] = False
    truncated: Annotated[bool, Strict()] = False


@dataclass(config=CFG)
class Progress:
    """A migration's progress as its source host agent reports it."""
    state: str
    elapsed_s: float = 0.0
    passes: Annotated[int, Strict()] = 0
    transferred: Annotated[int, Strict()] = 0
    remaining: Annotated[int, Strict()] = 0
    total: Annotated[int, Strict()] = 0
    mbps: float = 0.0
    error: str | None = None


@dataclass(config=CFG)
class PlacementCheck:
    required_violations: Annotated[int, Strict()]
    preferred_penalty: Annotated[int, Strict()]
    moves: Annotated[int, Strict()]
    problems: list[str]
    rules: list[dict[str, Any]]
    vms: Annotated[int, Strict()]
    hosts: Annotated[int, Strict()]
    rules_checked: Annotated[int, Strict()]


@dataclass(config=CFG)
class HostPage:
    items: list[HostRecord]
    after: str | None
    remaining: Annotated[int, Strict()]


@dataclass(config=CFG)
class VMPage:
    items: list[VMRecord]
    after: str | None
    remaining: Annotated[int, Strict()]


@dataclass(config=CFG)
class GroupPage:
    items: list[GroupRecord]
    after: str | None
    remaining: Annotated[int, Strict()]


@dataclass(config=CFG)
class RulePage:
    items: list[RuleRecord]
    after: str | None
    remaining: Annotated[int, Strict()]


@dataclass(config=CFG)
class ReservationPage:
    items: list[ReservationRecord]
    after: str | None
    remaining: Annotated[int, Strict()]


@dataclass(config=CFG)
class OperationPage:
    items: list[OperationRecord]
    after: str | None
    remaining: Annotated[int, Strict()]


@dataclass(config=CFG)
class Defined:
    vm: VMRecord
    operation: OperationRecord


@dataclass(config=CFG)
class Done:
    operation: OperationRecord


@dataclass(config=CFG)
class HAReport:
    """The HA controller: its grace periods, the unreachable hosts' verdicts and power evidence,
    its recent events (restarted, not-restarted and why, lost, host-verdict, host-back)."""
    state: str
    grace_s: float
    off_grace_s: float
    retry_s: float
    hosts: dict[str, dict[str, Any]]
    events: list[dict[str, Any]]


@dataclass(config=CFG)
class ReservationReport:
    """The failover reservation sized for the protected VMs (hvsim.control.reservation): ours
    (per-host reserve rules) against vSphere-HA slot sizing, and what the reserve rules hold now."""
    candidates: list[str]
    candidates_are: str
    plan: dict[str, Any]
    held: list[dict[str, Any]]
    ha: HAReport
