"""Documented limits on problem size and numeric ranges (docs/placement.md, "Limits").

Every problem is checked against them before any model is built, so that no input costs more
than a bounded amount of memory or time: the input document is read only up to
``MAX_INPUT_BYTES``; group counts, host and rule lists are counted before any object is made
from them; numbers are range-checked (no CP-SAT integer overflow is possible within them); the
size of the CP-SAT model is estimated from the problem and refused beyond ``MAX_MODEL_CELLS`` /
``MAX_MODEL_TERMS``. The benchmark's largest instance (200 hosts x 2000 VMs x 500 rules) is about
a fifth of each model limit. Memory measured at the limits: docs/placement.md, "Limits".
"""
from __future__ import annotations

MAX_INPUT_BYTES = 4 * 1024 * 1024      # a problem document (file or JSON text)
MAX_HOSTS = 2000
MAX_VMS = 20_000                        # over all groups (a group's count included)
MAX_GROUPS = 2000
MAX_RULES = 2000
MAX_RULE_REFS = 20_000                  # groups + domains + hosts named, summed over all rules
MAX_LEVELS = 8
MAX_RESOURCES = 16                      # resource names in one capacity / demand / amount mapping
MAX_NAME_LEN = 128                      # host, group, VM, rule, level, domain and resource names

MAX_AMOUNT = 2 ** 32                    # capacity, demand, reserved amount (integers >= 0)
MAX_OVERCOMMIT = 100.0                  # overcommit ratio: a finite number in (0, MAX_OVERCOMMIT]
MAX_WEIGHT = 1_000_000                  # weight of a preferred rule (integer >= 1)

# CP-SAT model size, estimated before building: a "cell" is one (VM class, host) pair, a count
# variable; the terms add, per rule, the cells of the groups it names (reservations: all cells).
MAX_MODEL_CELLS = 100_000
MAX_MODEL_TERMS = 1_000_000

# command line options
MIN_TIME_LIMIT_S = 0.5
MAX_TIME_LIMIT_S = 3600.0
MAX_WORKERS = 16
MAX_SEED = 2 ** 31 - 1


