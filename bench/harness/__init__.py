"""Real role processes and real clients, for the tests and the benchmarks alike.

Both start roles as their own processes with certificates from a throw-away cloud CA, and call them
over HTTPS the way other roles and visitors do. The benchmarks own it and the tests import it, so
``bench/`` never imports ``tests/``; it imports only ``shared`` and the roles' config classes. It is
not part of the installed package: role hosts never get it.

- :mod:`bench.harness.processes`: the cloud CA, role homes on free ports, a role process, one HTTPS call.
- :mod:`bench.harness.clients`: HTTPS requests to a site through a front end, or straight to a worker.
"""
