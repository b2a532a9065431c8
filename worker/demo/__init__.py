"""``wxphone demo``: the whole system on one machine, played by simulated front ends.

* :mod:`worker.demo.runner` orchestrates a run: services, database, processes, progress, report.
* :mod:`worker.demo.scenario` fixes the plan: users, repeated and never-issued codes, faults.
* :mod:`worker.demo.frontends` plays the users: login, phone code, submission.
* :mod:`worker.demo.processes` runs sandbox, worker and beat in their own process groups.
* :mod:`worker.demo.report` reads the outcome back from PostgreSQL and the sandbox and checks it.
"""

from worker.demo.runner import DemoError, DemoOptions, run_demo

__all__ = ["DemoError", "DemoOptions", "run_demo"]
