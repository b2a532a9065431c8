"""``wxphone api``: the reference HTTP front end (FastAPI, served by uvicorn).

A mini program can call it directly: log in with its ``wx.login`` code for a session, then
exchange the phone-number button's code for the user's verified, masked number. See the README
("The HTTP API") and docs/security.md ("The HTTP API") for sessions and rate limits.

Build it with :func:`create_app` from its collaborators; ``wxphone api`` does so from the
process's runtime (:mod:`worker.cli.api`).
"""

from worker.api.app import create_app

__all__ = ["create_app"]
