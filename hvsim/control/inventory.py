"""The manager's inventory in the store: every change one transaction over the record, its index
keys and its operation record, so a crash never leaves half of it. With a ``fence`` (the
manager's held lease) every write is a fenced transaction: a manager that lost its lease cannot
change anything, whatever it believes.

Conflicts (exists already, unknown host/group, still referenced, an operation in flight) raise
:class:`ConflictError` / :class:`NotFoundError` and change nothing.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import ConflictError, ControlInputError, FencedError, NotFoundError
from .ops import IN_FLIGHT, Operation, OperationRecord, OpKind, OpState, Resolution
from .state import (
    CLONES, GROUP_VMS, GROUPS, HOST_VMS, HOSTS, INFLIGHT, OPS, RESERVATIONS, RULES, VM_OP, VMS, GroupRecord, HostRecord,
    HostStatus, ReservationRecord, RuleRecord, VMPower, VMRecord, as_dict, dump, key_of, parse,
)
from .store import Compare, Delete, Fence, Get, KeyValue, Op, Put, Store, TxnResult

T = TypeVar("T")
MAX_RETRIES = 20


@dataclass(frozen=True)
class Listing(Generic[T]):
    items: list[T]
    after: str | None          # cursor: the name of the last item, when there is more
    remaining: int             # records from this page on (first page: all)


class Inventory:
    """Records in a :class:`Store` (see :mod:`hvsim.control.state` for the key layout)."""

    def __init__(self, store: Store, fence: Fence | None = None, manager: str = "manager",
                 on_fenced: Callable[[FencedError], None] | None = None) -> None:
        self.store = store
        self.fence = fence
        self.on_fenced = on_fenced        # told when the store refuses a fenced write (a newer holder)
        self.manager = manager
        # defines onto one host (or into one group) are serialised in this manager, so they do
        # not fight over the record they touch; the compare-and-set still guards other writers
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, key: str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    async def _txn(self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = (),
                   mark: bool = False) -> TxnResult:
        if self.fence is not None:
            try:
                return await self.store.fenced_txn(self.fence, compares, success, failure, mark=mark)
            except FencedError as e:
                if self.on_fenced is not None:
                    self.on_fenced(e)
                raise
        return await self.store.txn(compares, success, failure)

    async def touch(self) -> None:
        """A fenced write that changes no record (it journals the term: see ``Store.fenced_txn``)."""
        if self.fence is not None:
            await self._txn((), (), mark=True)

    def _op(self, kind: OpKind, vm: str, **params: str) -> Operation:
        return Operation.new(kind, vm, params, manager=self.manager, token=self.fence.token if self.fence else 0)

    async def _get(self, cls: type[T], key: str) -> tuple[T, KeyValue] | None:
        kv = await self.store.get(key)
        return None if kv is None else (parse(cls, kv.value), kv)

    async def raw(self, prefix: str, name: str, what: str) -> bytes:
        """One record's stored JSON (validated when it was written), for the API to send as is."""
        kv = await self.store.get(prefix + name)
        if kv is None:
            raise NotFoundError(f"no {what} {name!r}")
        return kv.value

    async def raw_page(self, prefix: str, limit: int, after: str | None) -> Listing[bytes]:
        """A page of stored JSON records (see :meth:`raw`)."""
        page = await self.store.list(prefix, limit=limit, after=prefix + after if after else None)
        return Listing([kv.value for kv in page.items], page.after[len(prefix):] if page.after else None,
                       page.remaining)

    async def _list(self, cls: type[T], prefix: str, limit: int, after: str | None) -> Listing[T]:
        page = await self.store.list(prefix, limit=limit, after=prefix + after if after else None)
        items = [parse(cls, kv.value) for kv in page.items]
        return Listing(items, page.after[len(prefix):] if page.after else None, page.remaining)

    # -- hosts --------------------------------------------------------------------------------
    async def add_host(self, host: HostRecord) -> HostRecord:
        key = key_of(host)
        if not (await self._txn([Compare.absent(key)], [Put(key, dump(host))])).succeeded:
            raise ConflictError(f"host {host.name!r} exists already")
        return host

    async def get_host(self, name: str) -> HostRecord:
        got = await self._get(HostRecord, HOSTS + name)
        if got is None:
            raise NotFoundError(f"no host {name!r}")
        return got[0]

    async def list_hosts(self, limit: int = 100, after: str | None = None) -> Listing[HostRecord]:
        return await self._list(HostRecord, HOSTS, limit, after)

    async def update_host(self, name: str, **fields: object) -> HostRecord:
        """Change fields of a host record (compare-and-set, retried on a concurrent change)."""
        for _ in range(MAX_RETRIES):
            got = await self._get(HostRecord, HOSTS + name)
            if got is None:
                raise NotFoundError(f"no host {name!r}")
            host, kv = got
            new = parse(HostRecord, {**as_dict(host), **{k: (v.value if isinstance(v, HostStatus) else v)
                                                         for k, v in fields.items()}}, "host.")
            if new == host:
                return host
            if (await self._txn([Compare.mod_revision(kv.key, kv.mod_revision)], [Put(kv.key, dump(new))])).succeeded:
                return new
        raise ConflictError(f"host {name!r} kept changing, try again")

    async def set_vm_power(self, name: str, power: VMPower, *, host: str | None = None) -> VMRecord | None:
        """Record what a host agent reports about a VM no operation holds (it crashed, or powered
        itself off); changes nothing (None) while an operation is in flight on it or when ``host``
        is given and the record names another host."""
        got = await self._get(VMRecord, VMS + name)
        if got is None:
            return None
        vm, kv = got
        if vm.power is power or (host is not None and vm.host != host):
            return None
        new = VMRecord(**{**{k: getattr(vm, k) for k in vm.__dataclass_fields__}, "power": power})
        res = await self._txn([Compare.mod_revision(kv.key, kv.mod_revision), Compare.absent(VM_OP + name)],
                              [Put(kv.key, dump(new))])
        return new if res.succeeded else None

    async def remove_host(self, name: str) -> None:
        """Remove a host that no VM names. A define onto this host touches the host record, so a
        define racing with this removal makes its compare fail: nothing is changed then."""
        kv = await self.store.get(HOSTS + name)
        if kv is None:
            raise NotFoundError(f"no host {name!r}")
        vms = await self.store.list(f"{HOST_VMS}{name}/", limit=1)
        if vms.items:
            raise ConflictError(f"host {name!r} still has VMs (e.g. {vms.items[0].key.rsplit('/', 1)[1]!r})")
        if not (await self._txn([Compare.mod_revision(kv.key, kv.mod_revision)], [Delete(kv.key)])).succeeded:
            raise ConflictError(f"host {name!r} changed meanwhile, try again")

    # -- VMs ----------------------------------------------------------------------------------
    async def define_vm(self, vm: VMRecord) -> tuple[VMRecord, OperationRecord]:
        """Define a VM (shut off), optionally on a host and in a group; the operation is recorded
        in the same transaction."""
        if vm.power is not VMPower.SHUTOFF:
            raise ControlInputError("power", "a VM is defined shut off")
        async with contextlib.AsyncExitStack() as stack:
            for key in ([HOSTS + vm.host] if vm.host else []) + ([GROUPS + vm.group] if vm.group else []):
                await stack.enter_async_context(self._lock(key))
            for _ in range(MAX_RETRIES):
                done = await self._define_once(vm)
                if done is not None:
                    return vm, done
        raise ConflictError(f"host {vm.host!r} kept changing, try again")

    async def _define_once(self, vm: VMRecord) -> OperationRecord | None:
        compares = [Compare.absent(VMS + vm.name)]
        touch: list[Op] = []
        if vm.host is not None:
            got = await self._get(HostRecord, HOSTS + vm.host)
            if got is None:
                raise NotFoundError(f"no host {vm.host!r} (field host)")
            host, hkv = got
            if host.status is HostStatus.MAINTENANCE:
                raise ConflictError(f"host {vm.host!r} is {host.status.value}: it takes no new VMs")
            # touching the host orders this define against a concurrent remove_host
            compares.append(Compare.mod_revision(hkv.key, hkv.mod_revision))
            touch.append(Put(hkv.key, hkv.value))
        if vm.group is not None:
            gkv = await self.store.get(GROUPS + vm.group)
            if gkv is None:
                raise NotFoundError(f"no placement group {vm.group!r} (field group)")
            # touching the group orders this define against a concurrent remove_group
            compares.append(Compare.mod_revision(gkv.key, gkv.mod_revision))
            touch.append(Put(gkv.key, gkv.value))
        op = self._op(OpKind.DEFINE, vm.name)
        op.start()
        done = op.succeed("defined")
        ops: list[Op] = [Put(VMS + vm.name, dump(vm)), Put(OPS + done.id, dump(done)), *touch]
        if vm.host is not None:
            ops.append(Put(f"{HOST_VMS}{vm.host}/{vm.name}", b""))
        if vm.group is not None:
            ops.append(Put(f"{GROUP_VMS}{vm.group}/{vm.name}", b""))
        if vm.clone_of is not None:
            ops.append(Put(f"{CLONES}{vm.clone_of}/{vm.name}", b""))
        res = await self._txn(compares, ops, [Get(VMS + vm.name)])
        if not res.succeeded:
            if res.results[0] is not None:
                raise ConflictError(f"vm {vm.name!r} exists already")
            return None    # the host or group record changed meanwhile: read them again
        return done

    async def get_vm(self, name: str) -> VMRecord:
        got = await self._get(VMRecord, VMS + name)
        if got is None:
            raise NotFoundError(f"no vm {name!r}")
        return got[0]

    async def list_vms(self, limit: int = 100, after: str | None = None) -> Listing[VMRecord]:
        return await self._list(VMRecord, VMS, limit, after)

    async def undefine_vm(self, name: str) -> OperationRecord:
        got = await self._get(VMRecord, VMS + name)
        if got is None:
            raise NotFoundError(f"no vm {name!r}")
        vm, kv = got
        if vm.power is not VMPower.SHUTOFF:
            raise ConflictError(f"vm {name!r} is {vm.power.value}: only a shut-off VM can be undefined")
        op = self._op(OpKind.UNDEFINE, name)
        op.start()
        done = op.succeed("undefined")
        ops: list[Op] = [Delete(kv.key), Put(OPS + done.id, dump(done)), *self._index_deletes(vm)]
        res = await self._txn([Compare.mod_revision(kv.key, kv.mod_revision), Compare.absent(VM_OP + name)], ops)
        if not res.succeeded:
            raise ConflictError(f"vm {name!r} changed or has an operation in flight, try again")
        return done

    @staticmethod
    def _index_deletes(vm: VMRecord) -> list[Op]:
        ops: list[Op] = []
        if vm.host:
            ops.append(Delete(f"{HOST_VMS}{vm.host}/{vm.name}"))
        if vm.group:
            ops.append(Delete(f"{GROUP_VMS}{vm.group}/{vm.name}"))
        if vm.clone_of:
            ops.append(Delete(f"{CLONES}{vm.clone_of}/{vm.name}"))
        return ops

    async def clones_of(self, name: str, limit: int = 20) -> list[str]:
        """The clones defined on ``name``'s disk (``POST /v1/vms/{name}/clone``), at most ``limit``."""
        page = await self.store.list(f"{CLONES}{name}/", limit=limit)
        return [kv.key.rsplit("/", 1)[1] for kv in page.items]

    async def finish_undefine(self, op: Operation, revision: int) -> OperationRecord:
        """The last step of an undefine recorded as an operation (:mod:`.diskops`: the VM's disks
        are removed already): the VM record and its index keys are deleted and the operation
        succeeds, releasing the VM's lock, in one transaction."""
        name = op.record.vm
        got = await self._get(VMRecord, VMS + name)
        op.succeed("undefined: disks removed")
        rec = op.record
        ops: list[Op] = [Put(OPS + rec.id, dump(rec)), Delete(VM_OP + name), Delete(INFLIGHT + rec.id)]
        compares = [Compare.mod_revision(OPS + rec.id, revision)]
        if got is not None:
            vm, kv = got
            ops += [Delete(kv.key), *self._index_deletes(vm)]
            compares.append(Compare.mod_revision(kv.key, kv.mod_revision))
        if not (await self._txn(compares, ops)).succeeded:
            raise ConflictError(f"operation {rec.id} or vm {name!r} changed meanwhile: undefine again")
        return rec

    # -- groups, rules, reservations ----------------------------------------------------------
    async def add_group(self, g: GroupRecord) -> GroupRecord:
        if not (await self._txn([Compare.absent(key_of(g))], [Put(key_of(g), dump(g))])).succeeded:
            raise ConflictError(f"placement group {g.name!r} exists already")
        return g

    async def get_group(self, name: str) -> GroupRecord:
        got = await self._get(GroupRecord, GROUPS + name)
        if got is None:
            raise NotFoundError(f"no placement group {name!r}")
        return got[0]

    async def list_groups(self, limit: int = 100, after: str | None = None) -> Listing[GroupRecord]:
        return await self._list(GroupRecord, GROUPS, limit, after)

    async def remove_group(self, name: str) -> None:
        got = await self._get(GroupRecord, GROUPS + name)
        if got is None:
            raise NotFoundError(f"no placement group {name!r}")
        members = await self.store.list(f"{GROUP_VMS}{name}/", limit=1)
        if members.items:
            raise ConflictError(f"placement group {name!r} still has VMs")
        rules = await self.list_all(RuleRecord, RULES)
        users = [r.name for r in rules if name in r.groups()]
        if users:
            raise ConflictError(f"placement group {name!r} is used by rule(s) {users}")
        # a define into this group touches the group record: one that raced with us fails this compare
        kv = got[1]
        if not (await self._txn([Compare.mod_revision(kv.key, kv.mod_revision)], [Delete(kv.key)])).succeeded:
            raise ConflictError(f"placement group {name!r} changed meanwhile, try again")

    async def add_rule(self, r: RuleRecord) -> RuleRecord:
        compares = [Compare.absent(key_of(r))] + [Compare.exists(GROUPS + g) for g in r.groups()]
        fails: list[Op] = [Get(key_of(r)), *(Get(GROUPS + g) for g in r.groups())]
        res = await self._txn(compares, [Put(key_of(r), dump(r))], fails)
        if not res.succeeded:
            if res.results[0] is not None:
                raise ConflictError(f"rule {r.name!r} exists already")
            missing = [g for g, got in zip(r.groups(), res.results[1:], strict=True) if got is None]
            raise NotFoundError(f"rule {r.name!r} names unknown placement group(s) {missing} (field spec.groups)")
        return r

    async def get_rule(self, name: str) -> RuleRecord:
        got = await self._get(RuleRecord, RULES + name)
        if got is None:
            raise NotFoundError(f"no rule {name!r}")
        return got[0]

    async def list_rules(self, limit: int = 100, after: str | None = None) -> Listing[RuleRecord]:
        return await self._list(RuleRecord, RULES, limit, after)

    async def remove_rule(self, name: str) -> None:
        if not (await self._txn([Compare.exists(RULES + name)], [Delete(RULES + name)])).succeeded:
            raise NotFoundError(f"no rule {name!r}")

    async def add_reservation(self, r: ReservationRecord) -> ReservationRecord:
        if not (await self._txn([Compare.absent(key_of(r))], [Put(key_of(r), dump(r))])).succeeded:
            raise ConflictError(f"reservation {r.name!r} exists already")
        return r

    async def list_reservations(self, limit: int = 100, after: str | None = None) -> Listing[ReservationRecord]:
        return await self._list(ReservationRecord, RESERVATIONS, limit, after)

    async def list_all(self, cls: type[T], prefix: str) -> list[T]:
        out: list[T] = []
        after: str | None = None
        while True:
            page = await self.store.list(prefix, limit=1000, after=after)
            out += [parse(cls, kv.value) for kv in page.items]
            if page.after is None:
                return out
            after = page.after

    # -- operations ---------------------------------------------------------------------------
    async def begin(self, kind: OpKind, vm: str, **params: str) -> tuple[Operation, int]:
        """Record a new operation on ``vm`` before anything is done: it takes the VM's operation
        lock (one operation per VM at a time) and the in-flight index. Returns it with the
        revision of its record (for :meth:`update`)."""
        op = self._op(kind, vm, **params)
        rec = op.record
        res = await self._txn([Compare.exists(VMS + vm), Compare.absent(VM_OP + vm)],
                              [Put(OPS + rec.id, dump(rec)), Put(VM_OP + vm, rec.id.encode()),
                               Put(INFLIGHT + rec.id, b"")],
                              [Get(VMS + vm), Get(VM_OP + vm)])
        if not res.succeeded:
            if res.results[0] is None:
                raise NotFoundError(f"no vm {vm!r}")
            other = res.results[1]
            busy = other.value.decode() if isinstance(other, KeyValue) else "?"
            raise ConflictError(f"vm {vm!r} has operation {busy} in flight")
        return op, res.revision

    async def update(self, op: Operation, revision: int, vm: VMRecord | None = None) -> int:
        """Write ``op``'s current record (compare-and-set on ``revision``); with ``vm``, the VM
        record too, in the same transaction. A terminal operation releases the VM's lock."""
        rec = op.record
        ops: list[Op] = [Put(OPS + rec.id, dump(rec))]
        if vm is not None:
            ops.append(Put(VMS + vm.name, dump(vm)))
        if rec.state not in IN_FLIGHT:
            ops += [Delete(VM_OP + rec.vm), Delete(INFLIGHT + rec.id)]
        res = await self._txn([Compare.mod_revision(OPS + rec.id, revision)], ops)
        if not res.succeeded:
            raise ConflictError(f"operation {rec.id} was changed by someone else")
        return res.revision

    async def get_op(self, op_id: str) -> tuple[OperationRecord, int]:
        got = await self._get(OperationRecord, OPS + op_id)
        if got is None:
            raise NotFoundError(f"no operation {op_id!r}")
        return got[0], got[1].mod_revision

    async def list_ops(self, limit: int = 100, after: str | None = None) -> Listing[OperationRecord]:
        return await self._list(OperationRecord, OPS, limit, after)

    async def settle(self, rec: OperationRecord, revision: int, res: Resolution) -> OperationRecord:
        """Record a resolution's verdict (after its actions were carried out): the operation
        becomes terminal, the VM record names the host and power state decided, its host index
        moves with it, and the VM's operation lock is released, all in one transaction."""
        if res.final is None:
            raise ConflictError(f"operation {rec.id}: the resolution is deferred ({res.reason})")
        op = Operation(rec)
        if res.final is OpState.SUCCEEDED:
            op.succeed(res.reason)
        elif op.fsm.state is OpState.PENDING:
            op.fail(res.reason)
        else:
            if op.fsm.state is OpState.RUNNING:
                op.rollback(res.reason)
            op.rolled_back()
        got = await self._get(VMRecord, VMS + rec.vm)
        ops: list[Op] = [Put(OPS + rec.id, dump(op.record)), Delete(VM_OP + rec.vm), Delete(INFLIGHT + rec.id)]
        compares = [Compare.mod_revision(OPS + rec.id, revision)]
        if got is not None:
            vm, kv = got
            fields = {k: getattr(vm, k) for k in vm.__dataclass_fields__}
            if res.vm_host is not None:
                fields["host"] = res.vm_host
            if res.vm_power is not None:
                fields["power"] = res.vm_power
            new = VMRecord(**fields)
            ops.append(Put(kv.key, dump(new)))
            compares.append(Compare.mod_revision(kv.key, kv.mod_revision))
            if new.host != vm.host:
                if vm.host:
                    ops.append(Delete(f"{HOST_VMS}{vm.host}/{vm.name}"))
                if new.host:
                    ops.append(Put(f"{HOST_VMS}{new.host}/{vm.name}", b""))
        if not (await self._txn(compares, ops)).succeeded:
            raise ConflictError(f"operation {rec.id} or its vm changed meanwhile")
        return op.record

    async def in_flight(self) -> list[tuple[OperationRecord, int]]:
        """Operations not yet terminal (oldest first): what a restarted manager resolves."""
        out = []
        after: str | None = None
        while True:
            page = await self.store.list(INFLIGHT, limit=1000, after=after)
            for kv in page.items:
                out.append(await self.get_op(kv.key[len(INFLIGHT):]))
            if page.after is None:
                return out
            after = page.after


