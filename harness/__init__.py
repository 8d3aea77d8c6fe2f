"""Real role processes and real clients, for the tests and the benchmarks alike.

Both start roles as their own processes with certificates from a throw-away cloud CA, and call them
over HTTPS the way other roles and visitors do. That code lives here, beside ``roles/`` and ``shared/``
rather than in either user, so that neither imports the other: ``tests/`` and ``bench/`` both import
``harness``, and ``harness`` imports only ``shared`` and the roles' config classes. It is not part of
the installed package: role hosts never get it.

- :mod:`harness.processes`: the cloud CA, role homes on free ports, a role process, one HTTPS call.
- :mod:`harness.clients`: HTTPS requests to a site through a front end, or straight to a worker.
"""
