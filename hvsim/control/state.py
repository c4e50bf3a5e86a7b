"""The manager's durable records: hosts, VM definitions (and their host), placement groups and
rules, reservations. Typed, validated (pydantic dataclasses: a bad field raises
:class:`ControlInputError` naming it) and serialised to JSON for the store.

Store layout (one key per record, plus index keys so that per-host/per-group questions are one
prefix listing)::

    /hvsim/hosts/<host>            HostRecord
    /hvsim/vms/<vm>                VMRecord
    /hvsim/groups/<group>          GroupRecord
    /hvsim/rules/<rule>            RuleRecord (a placement rule, hvsim.placement's schema)
    /hvsim/reservations/<name>     ReservationRecord
    /hvsim/ops/<id>                OperationRecord (hvsim.control.ops)
    /hvsim/index/host-vms/<host>/<vm>, /hvsim/index/group-vms/<group>/<vm>
    /hvsim/index/vm-op/<vm>        id of the one operation in flight on that VM (a lock)
    /hvsim/index/inflight/<id>     operations not yet terminal (what a restarted manager resolves)
"""
from __future__ import annotations

import enum
import re
from typing import Annotated, Any, TypeVar

import pydantic
from pydantic import Strict, ConfigDict, Field, TypeAdapter, field_validator
from pydantic.dataclasses import dataclass

from hvsim.core.model import NAME_RE
from qmp_bridge.machine import CPU_MODELS, DISK_BUSES, MACHINE_TYPES, NIC_MODELS
from hvsim.placement.schema import rule_from_dict, rule_to_dict

from .errors import ControlInputError
from .imports import IMAGE_PATH_RE

ROOT = "/hvsim/"
HOSTS = ROOT + "hosts/"
VMS = ROOT + "vms/"
GROUPS = ROOT + "groups/"
RULES = ROOT + "rules/"
RESERVATIONS = ROOT + "reservations/"
OPS = ROOT + "ops/"
HOST_VMS = ROOT + "index/host-vms/"
GROUP_VMS = ROOT + "index/group-vms/"
VM_OP = ROOT + "index/vm-op/"
INFLIGHT = ROOT + "index/inflight/"
CLONES = ROOT + "index/clones/"          # CLONES<base>/<clone>: the clones standing on a VM's frozen disk

CFG = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)
Name = Annotated[str, Field(pattern=NAME_RE.pattern, min_length=1, max_length=32,
                            description="1-32 lowercase letters, digits and '-', starting with a letter")]
Text = Annotated[str, Field(max_length=256)]
R = TypeVar("R")


class HostStatus(enum.Enum):
    REGISTERED = "registered"      # known, no host agent seen yet
    UP = "up"
    UNREACHABLE = "unreachable"
    MAINTENANCE = "maintenance"    # takes no new VMs


class VMPower(enum.Enum):
    SHUTOFF = "shutoff"            # defined, not running
    RUNNING = "running"
    PAUSED = "paused"
    MIGRATING = "migrating"
    CRASHED = "crashed"


def _one_of(values: tuple[str, ...]) -> str:
    return "^(" + "|".join(re.escape(v) for v in values) + ")$"


# a VM's NIC on the inter-cloud network (hvsim.crosscloud.network): routed there, or isolated (a test clone's)
Network = Annotated[str | None, Field(pattern=r"^(wan|isolated)$",
                                      description="a NIC on the inter-cloud network ('wan') or an isolated one "
                                                  "('isolated'); absent: no NIC")]
DataImage = Annotated[str | None, Field(max_length=256, pattern=IMAGE_PATH_RE,
                                        description="fill the disk on first start from this raw image, a path "
                                                    "relative to the import directory (--import-dir)")]


@dataclass(config=CFG)
class InstanceProfile:
    """The machine a VM gets (a provider's instance profile): QEMU machine type, CPU model, disk
    bus of its disk, NIC model (for NICs; the manager's VMs have none yet). Absent: q35, qemu64,
    virtio-blk, virtio-net-pci."""
    machine: Annotated[str, Field(pattern=_one_of(MACHINE_TYPES))] = "q35"
    cpu_model: Annotated[str, Field(pattern=_one_of(CPU_MODELS))] = "qemu64"
    disk_bus: Annotated[str, Field(pattern=_one_of(DISK_BUSES))] = "virtio-blk"
    nic_model: Annotated[str, Field(pattern=_one_of(NIC_MODELS))] = "virtio-net-pci"


@dataclass(config=CFG)
class HostRecord:
    name: Name
    datacenter: Name = "dc1"
    vcpus: Annotated[int, Strict(), Field(ge=1, le=4096)] = 4
    memory_mib: Annotated[int, Strict(), Field(ge=64, le=16 * 1024 * 1024)] = 4096
    cpu_overcommit: Annotated[float, Strict(), Field(ge=1.0, le=16.0)] = 1.0
    memory_overcommit: Annotated[float, Strict(), Field(ge=1.0, le=4.0)] = 1.0
    agent: Annotated[str | None, Field(max_length=256, pattern=r"^(unix:/[\x21-\x7e]+|https://[\x21-\x7e]+)$",
                                       description="the host agent: unix:/PATH or https://HOST:PORT")] = None
    status: HostStatus = HostStatus.REGISTERED
    power_domain: Annotated[str | None, Field(max_length=256, pattern=r"^/[\x21-\x7e]+$",
                                              description="the host's power domain (cgroup), as its agent "
                                                          "reported it: HA's power evidence")] = None


@dataclass(config=CFG)
class VMRecord:
    name: Name
    vcpus: Annotated[int, Strict(), Field(ge=1, le=64)] = 1
    memory_mib: Annotated[int, Strict(), Field(ge=16, le=1024 * 1024)] = 256
    disk_mib: Annotated[int, Strict(), Field(ge=0, le=16 * 1024 * 1024)] = 0
    host: Name | None = None
    group: Name | None = None
    power: VMPower = VMPower.SHUTOFF
    protected: Annotated[bool, Strict()] = False
    priority: Annotated[int, Strict(), Field(ge=0, le=1000)] = 0
    profile: InstanceProfile | None = None
    network: Network = None
    data_image: DataImage = None
    clone_of: Annotated[Name | None, Field(description="the VM whose disk this copy-on-write clone's overlays "
                                                       "(POST /v1/vms/{name}/clone)")] = None


@dataclass(config=CFG)
class GroupRecord:
    name: Name
    description: Text = ""


@dataclass(config=CFG)
class RuleRecord:
    """A placement rule in hvsim.placement's JSON form (``{"kind": "anti_affinity", ...}``);
    validated by that schema, so the manager and the placement controller agree on every rule."""
    name: Name
    spec: dict[str, Any]

    @field_validator("spec")
    @classmethod
    def _valid_rule(cls, v: dict[str, Any], info: pydantic.ValidationInfo) -> dict[str, Any]:
        name = info.data.get("name", "rule")
        try:
            rule = rule_from_dict({**v, "name": name})
        except ValueError as e:
            raise ValueError(str(e)) from e
        return rule_to_dict(rule)

    def groups(self) -> tuple[str, ...]:
        g = self.spec.get("groups", ())
        return tuple(g) if isinstance(g, list | tuple) else ()


@dataclass(config=CFG)
class ReservationRecord:
    """Capacity held back (e.g. failover capacity in a datacenter): placements never use it."""
    name: Name
    datacenter: Name
    vcpus: Annotated[int, Strict(), Field(ge=0, le=1 << 20)] = 0
    memory_mib: Annotated[int, Strict(), Field(ge=0, le=1 << 32)] = 0
    hosts: Annotated[tuple[Name, ...], Field(max_length=1000)] = ()
    purpose: Text = ""


_ADAPTERS: dict[Any, TypeAdapter[Any]] = {}


def _adapter(cls: Any) -> TypeAdapter[Any]:
    ad = _ADAPTERS.get(cls)
    if ad is None:
        ad = _ADAPTERS[cls] = TypeAdapter(cls)
    return ad


def input_error(e: pydantic.ValidationError, prefix: str = "") -> ControlInputError:
    """The first problem of a pydantic error as a ControlInputError naming the field."""
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ()) if x != "__root__") or "body"
    return ControlInputError(prefix + loc, str(err.get("msg", "invalid")))


def parse(cls: type[R], data: Any, prefix: str = "") -> R:
    """Validate ``data`` (a dict or JSON bytes) into ``cls``; ControlInputError names the field."""
    try:
        if isinstance(data, bytes | str):
            out: R = _adapter(cls).validate_json(data)
        else:
            out = _adapter(cls).validate_python(data)
    except pydantic.ValidationError as e:
        raise input_error(e, prefix) from e
    return out


def dump(rec: Any) -> bytes:
    data: bytes = _adapter(type(rec)).dump_json(rec)
    return data


def as_dict(rec: Any) -> dict[str, Any]:
    out: dict[str, Any] = _adapter(type(rec)).dump_python(rec, mode="json")
    return out


def key_of(rec: Any) -> str:
    prefix = {HostRecord: HOSTS, VMRecord: VMS, GroupRecord: GROUPS, RuleRecord: RULES,
              ReservationRecord: RESERVATIONS}[type(rec)]
    return prefix + rec.name
