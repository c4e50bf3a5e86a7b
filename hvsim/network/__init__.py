"""hvsim networking: emulated hosts on a shaped underlay, and tenant networks over it.

* :class:`Underlay`: hosts in network namespaces joined by tbf-shaped veth links.
* Tenant networks: :class:`NetworkController` (one per datacenter) programs, over every host of an
  underlay, tenant networks (:class:`NetworkSpec`: a bridge per host, VXLAN between hosts) and ENIs
  (:class:`EniSpec`, bound to a VM on a host through a tap or veth port) and moves them between
  hosts (stage / activate / release / rollback) in one of three :class:`MobilityMode` s.
* :class:`NsEndpoint` (an emulated guest NIC in a namespace) and :class:`Prober` (1 ms UDP probes,
  echo gaps, duplicates, a TCP stream) for tests and measurements.
"""
from .controller import ControllerState, JournalEntry, Move, MoveState, NetworkController
from .endpoint import NsEndpoint
from .eni import (Binding, BindingState, Eni, EniSpec, NetworkSpec, PortKind, PortSpec, SecurityRule,
                  guest_nic_arg)
from .errors import (AddressConflictError, BindingStateError, CommandError, NetworkError, ProbeError,
                     ProgrammingError, SetupError, StateError, TeardownError, TenantInputError, TopologyError,
                     UnknownEniError, UnknownHostError, UnknownNetworkError)
from .nft import PortCounters
from .plan import MobilityMode
from .prober import EchoServer, Prober, ProbeReport
from .shaping import LinkShape, QdiscStats
from .underlay import Direction, HostShaping, LinkStats, Underlay, UnderlayState

__all__ = [
    "Underlay", "UnderlayState", "Direction", "HostShaping", "LinkStats", "LinkShape", "QdiscStats",
    "NetworkError", "TopologyError", "UnknownHostError", "StateError", "CommandError", "SetupError",
    "TeardownError", "ProbeError",
    "NetworkController", "ControllerState", "Move", "MoveState", "JournalEntry", "MobilityMode",
    "NetworkSpec", "EniSpec", "SecurityRule", "PortSpec", "PortKind", "Eni", "Binding", "BindingState",
    "guest_nic_arg", "PortCounters", "NsEndpoint", "Prober", "ProbeReport", "EchoServer",
    "TenantInputError", "UnknownNetworkError", "UnknownEniError", "AddressConflictError", "BindingStateError",
    "ProgrammingError",
]
