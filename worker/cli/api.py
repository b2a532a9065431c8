"""``wxphone api``: serve the reference HTTP front end (worker/api) with uvicorn."""

from __future__ import annotations

import click

from worker.logs import configure_logging
from worker.runtime import get_runtime
from worker.settings import get_settings

#: Seconds uvicorn gives open requests (waits included) to finish on shutdown.
GRACEFUL_SHUTDOWN_SECONDS = 10


@click.command("api")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option(
    "--port", type=click.IntRange(min=0, max=65535), default=8080, show_default=True, help="TCP port."
)
def api_command(host: str, port: int) -> None:
    """Serve the HTTP API: POST /v1/login, POST /v1/phone, GET /v1/phone/{job_id}, /healthz and
    /openapi.json.

    It needs the broker, the database and Redis (WXPHONE_BROKER_URL, WXPHONE_DATABASE_URL,
    WXPHONE_REDIS_URL), the keys that read numbers (WXPHONE_ENCRYPTION_KEYS,
    WXPHONE_BLIND_INDEX_KEY) and the key that signs sessions (WXPHONE_API_SESSION_KEY); no
    AppSecret. Run several behind a load balancer to scale: rate limits are counted in Redis.
    """
    settings = get_settings()
    # Before anything listens: where the public development keys are not allowed, a process
    # without its own keys stops here, naming the variables (SettingsError).
    settings.require_production_secrets(fingerprint_key=False, api_session_key=True)
    configure_logging(settings.log_level, secrets=[app.secret for app in settings.apps])

    import uvicorn  # imported late: the other commands never need it

    from worker.api import create_app

    runtime = get_runtime()
    app = create_app(producer=runtime.producer, redis=runtime.redis, settings=settings)
    try:
        uvicorn.run(
            app,
            host=host,
            port=port,
            # Logging stays wxphone's redacting root handler (configured above).
            log_config=None,
            # uvicorn's access log prints each request's path, and a login job id in a path mints
            # a session: worker.api.middleware logs the route's template instead.
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        )
    finally:
        runtime.close()
