"""The manager's placement of VMs defined without a host: hvsim.placement's filters and weighers
(the greedy scheduler, Nova/kube-scheduler style: required rules and capacity filter hosts out, the
preferred rules and the balance rank the rest) over one incremental state, built from the store's
hosts, VMs and rules when first needed and kept up to date as VMs are defined; anything else that
changes the placement (a host or a rule added, an undefine, a migration, a failed write) drops the
state and it is built again. Defined VMs hold their capacity whether they run or not.

:meth:`Placer.check` is the independent check of everything the store holds
(:func:`hvsim.placement.check.check`): the required-rule violations, capacity, unplaced VMs.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hvsim.placement.check import check
from hvsim.placement.greedy import HostSetFilter, ReserveAmountFilter, State, schedule
from hvsim.placement.model import HOST_LEVEL, Group, Host, MovePolicy, Problem, ReserveAmount, ReserveHosts, Rule
from hvsim.placement.model import VM as PVM
from hvsim.placement.schema import rule_from_dict

from .errors import ConflictError
from .state import GroupRecord, HostRecord, HostStatus, RuleRecord, VMRecord

UNGROUPED = "(ungrouped)"
LEVELS = ("datacenter", HOST_LEVEL)


def _demand(vm: VMRecord) -> dict[str, int]:
    return {"vcpus": vm.vcpus, "memory_mib": vm.memory_mib}


def _problem(hosts: Iterable[HostRecord], vms: Iterable[VMRecord], rules: Iterable[RuleRecord],
             groups: Iterable[str] = ()) -> Problem:
    phosts = [Host.make(h.name, h.vcpus, h.memory_mib, {"vcpus": h.cpu_overcommit, "memory_mib": h.memory_overcommit},
                        {"datacenter": h.datacenter}) for h in hosts]
    names = {h.name for h in phosts}
    members: dict[str, list[PVM]] = {g: [] for g in groups}
    current: dict[str, str] = {}
    for vm in vms:
        g = vm.group or UNGROUPED
        members.setdefault(g, []).append(PVM(vm.name, g, _demand(vm)))
        if vm.host in names:
            current[vm.name] = vm.host
    prules = [rule_from_dict({**r.spec, "name": r.name}) for r in rules]
    return Problem(phosts, [Group(n, v) for n, v in members.items()], prules, LEVELS, current, MovePolicy(False))


def is_reservation(rule: Rule) -> bool:
    return rule.required and isinstance(rule, ReserveAmount | ReserveHosts)


def place_failover(vm: VMRecord, hosts: Iterable[HostRecord], vms: Iterable[VMRecord],
                   rules: Iterable[RuleRecord]) -> str:
    """The host an HA restart of ``vm`` goes to: the greedy scheduler over the hosts that are UP
    (with an agent), counting the VMs recorded on them, under every required rule except the
    reservations (failover is what they are held for). ConflictError naming what eliminated the
    hosts when none takes it."""
    usable = [h for h in hosts if h.status is HostStatus.UP and h.agent is not None]
    names = {h.name for h in usable}
    holding = [v for v in vms if v.host in names and v.name != vm.name]
    p = _problem(usable, holding, rules)
    p = Problem(p.hosts, p.groups, [r for r in p.rules if not is_reservation(r)], LEVELS, p.current,
                MovePolicy(False))
    if not p.hosts:
        raise ConflictError(f"vm {vm.name!r} cannot be restarted: no host is up")
    pv = PVM(vm.name, vm.group or UNGROUPED, _demand(vm))
    try:
        st = State(p)
        idx = p.topology.host_index
        for g in p.groups:
            for v in g.vms:
                st.place(v, idx[p.current[v.name]])       # every VM recorded on a host that is up holds it
        out = schedule(p, [pv], st)
    except KeyError as e:            # a rule names a domain none of the hosts up is in
        raise ConflictError(f"vm {vm.name!r} cannot be restarted: {e.args[0] if e.args else e}") from e
    if not out.placed_all:
        why = out.failure.text if out.failure is not None else "no host"
        raise ConflictError(f"vm {vm.name!r} cannot be restarted on any host that is up without breaking a required "
                            f"rule or a host's capacity: {why}")
    return out.assignment[vm.name]


class Placer:
    def __init__(self) -> None:
        self.problem: Problem | None = None
        self.state: State | None = None
        self._groups: dict[str, Group] = {}

    @property
    def ready(self) -> bool:
        return self.state is not None

    def invalidate(self) -> None:
        self.problem = self.state = None

    def load(self, hosts: list[HostRecord], vms: list[VMRecord], rules: list[RuleRecord]) -> None:
        usable = [h for h in hosts if h.status is not HostStatus.MAINTENANCE]
        p = _problem(usable, vms, rules)
        st = State(p)
        idx = p.topology.host_index
        for g in p.groups:
            for v in g.vms:
                h = p.current.get(v.name)
                if h is not None:
                    st.place(v, idx[h])
        self.problem, self.state = p, st
        self._groups = {g.name: g for g in p.groups}

    def place(self, vm: VMRecord) -> str:
        """The host for ``vm`` (committed to the state), or ConflictError naming what eliminated
        the hosts (e.g. ``0/200 hosts: 150 anti-affinity web@host, 50 memory``)."""
        assert self.problem is not None and self.state is not None
        if not self.problem.hosts:
            raise ConflictError(f"vm {vm.name!r} cannot be placed: no host takes VMs")
        gname = vm.group or UNGROUPED
        pv = PVM(vm.name, gname, _demand(vm))
        out = schedule(self.problem, [pv], self.state)
        if not out.placed_all:
            why = out.failure.text if out.failure is not None else "no host"
            raise ConflictError(f"vm {vm.name!r} cannot be placed without breaking a required rule or a host's "
                                f"capacity: {why}")
        host = out.assignment[vm.name]
        self._add(pv, host)
        return host

    def _add(self, pv: PVM, host: str) -> None:
        assert self.problem is not None
        g = self._groups.get(pv.group)
        if g is None:
            g = self._groups[pv.group] = Group(pv.group, [])
            self.problem.groups.append(g)
        g.vms.append(pv)
        self.problem.current[pv.name] = host

    def admit(self, vm: VMRecord) -> None:
        """Admission control for a define pinned to ``vm.host``: ConflictError naming the rule when
        it would consume reserved capacity (a required reserve rule). Needs the state loaded."""
        assert self.problem is not None and self.state is not None and vm.host is not None
        idx = self.problem.topology.host_index.get(vm.host)
        if idx is None:
            return                       # a host not in the placement state (maintenance): the store decides
        pv = PVM(vm.name, vm.group or UNGROUPED, _demand(vm))
        n = len(self.problem.hosts)
        for r in self.problem.rules:
            if not is_reservation(r):
                continue
            hidx = self.problem.topology.host_index
            flt = (ReserveAmountFilter(r) if isinstance(r, ReserveAmount) else
                   HostSetFilter(r.describe(), set(range(n)) - {hidx[x] for x in getattr(r, "hosts", ()) if x in hidx}))
            if not flt.passes(self.state, pv, idx):
                raise ConflictError(f"vm {vm.name!r} on host {vm.host!r} would consume capacity reserved by rule "
                                    f"{r.name!r} ({flt.label}): only HA restarts may use it")

    def note_defined(self, vm: VMRecord) -> None:
        """A VM defined on a host the caller chose: it holds that capacity too."""
        if self.problem is None or self.state is None or vm.host is None:
            return
        idx = self.problem.topology.host_index.get(vm.host)
        if idx is None:
            self.invalidate()
            return
        pv = PVM(vm.name, vm.group or UNGROUPED, _demand(vm))
        self.state.place(pv, idx)
        self._add(pv, vm.host)

    @staticmethod
    def check(hosts: list[HostRecord], vms: list[VMRecord], rules: list[RuleRecord],
              groups: list[GroupRecord]) -> dict[str, Any]:
        """The independent check of the stored placement."""
        p = _problem(hosts, vms, rules, [g.name for g in groups])
        rep = check(p, {v.name: v.host for v in vms if v.host is not None})
        out = rep.to_dict()
        out["vms"] = len(vms)
        out["hosts"] = len(hosts)
        out["rules_checked"] = len(rep.rules)
        return out
