"""Errors of the failover package (one branch of the hvsim tree, causes kept)::

    HvsimError
     +-- ControlError
     |    +-- FailoverError              hvsim.failover: a takeover or fail back did not complete
     |         +-- TakeoverError         the new manager did not come up / serve in time
     +-- InputError
     |    +-- ControlInputError
     |         +-- FailoverInputError    a malformed topology or controller setting (names the field)
     +-- StateError
          +-- TopologyError              the sites topology in the wrong state, or teardown left something
"""
from __future__ import annotations

from hvbase.errors import StateError
from hvsim.control.errors import ControlError, ControlInputError


class FailoverError(ControlError):
    """A takeover or a fail back did not complete."""


class TakeoverError(FailoverError):
    """The new manager did not come up or did not serve reads and writes in time."""


class FailoverInputError(ControlInputError):
    """A malformed topology or controller setting."""


class TopologyError(StateError):
    """The sites topology is in the wrong state, or its teardown left something behind."""
