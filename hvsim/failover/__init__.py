"""Failover across datacenters (issue 14): two datacenters and a witness joined by a shaped WAN
(:mod:`.sites`), the manager of dc1 on a dc1 host (:mod:`.hosted`), the failover controller that
restarts it in dc2 from reserved capacity (:mod:`.controller`), clients that run inside the
namespaces (:mod:`.nsclient`) and the scene the tests, the benchmark and the lab share (:mod:`.scene`)."""
