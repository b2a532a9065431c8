"""A local, faithful emulation of the WeChat server APIs wxphone calls, for tests and demos.

* :mod:`worker.sandbox.state`: the emulation itself (tokens, codes, quotas, faults, counters).
* :mod:`worker.sandbox.server`: the aiohttp server exposing it, plus the ``/_sandbox/`` admin API.
* :mod:`worker.sandbox.admin`: :class:`~worker.sandbox.admin.SandboxAdmin`, a client of that API.

Run it with ``wxphone sandbox --port 8780 --app wx123:secret``.
"""
