"""hvbase: the bottom layer shared by qmp_bridge and hvsim: the error root, the state-machine
helper and the event bus. It imports nothing but the standard library."""
from .errors import HvsimError, InputError, StateError
from .events import EventBus, Subscription, SubscriptionClosed
from .fsm import StateMachine, Transition, guarded

__all__ = ["HvsimError", "InputError", "StateError", "EventBus", "Subscription", "SubscriptionClosed", "StateMachine",
           "Transition", "guarded"]
