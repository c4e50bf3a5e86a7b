"""hvsim's control plane (composition layer): the durable store (SQLite or etcd), the etcd
cluster runner, the PKI for mutual TLS, the durable model and operations, and the manager's HTTP
API with its async client. Nothing below this package imports it."""
