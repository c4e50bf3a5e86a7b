"""Guest layer: host-side helpers for what runs inside a guest (heartbeat stream, swap setup)."""
