"""hvsim core: errors, state machines, events, model, hosts, lifecycle, VMs, the cluster and the
component protocol. Imports only hvbase and qmp_bridge."""
