"""Emulated underlay network: hosts in network namespaces joined by tbf-shaped veth links."""
from .errors import (CommandError, NetworkError, ProbeError, SetupError, StateError, TeardownError,
                     TopologyError, UnknownHostError)
from .shaping import LinkShape, QdiscStats
from .underlay import Direction, HostShaping, LinkStats, Underlay, UnderlayState

__all__ = [
    "Underlay", "UnderlayState", "Direction", "HostShaping", "LinkStats", "LinkShape", "QdiscStats",
    "NetworkError", "TopologyError", "UnknownHostError", "StateError", "CommandError", "SetupError",
    "TeardownError", "ProbeError",
]
