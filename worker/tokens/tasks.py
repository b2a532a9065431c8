"""Celery tasks of the token service. Thin adapters over :class:`worker.tokens.service.TokenService`."""

from __future__ import annotations

import logging
from typing import Any

from worker.app import app
from worker.errors import OperatorActionRequiredError, WxphoneError
from worker.runtime import get_runtime

log = logging.getLogger(__name__)

REFRESH_ACCESS_TOKEN = "wxphone.refresh_access_token"


@app.task(name=REFRESH_ACCESS_TOKEN, ignore_result=True)
def refresh_access_token(appid: str | None = None) -> dict[str, Any]:
    """Refresh the token of ``appid`` (every configured app when omitted) if it is due.

    Scheduled by beat on queue ``wxphone.token``. Not retried: the next beat tick tries again,
    and one app's failure never stops the others.
    """
    service = get_runtime().token_service
    appids = [appid] if appid else sorted(service.apps)
    outcomes: list[dict[str, object]] = []
    for each in appids:
        try:
            outcomes.append(service.refresh_if_due(each).as_dict())
        except OperatorActionRequiredError as error:
            log.error("token refresh needs an operator: %s", error, extra={"appid": each})
            outcomes.append({"appid": each, "status": "error", "error_code": error.error_code})
        except WxphoneError as error:
            log.warning("token refresh failed, next tick retries: %s", error, extra={"appid": each})
            outcomes.append({"appid": each, "status": "error", "error_code": error.error_code})
    return {"apps": outcomes}
