"""``SandboxAdmin``: a small synchronous client of the sandbox's ``/_sandbox/`` admin API.

Used by tests, the demo and the benchmark to register apps, mint codes, inject faults and read
counters. Every request has explicit (connect, read) timeouts. Without a ``session`` each call
uses a short-lived connection, so an admin object needs no closing; pass a session to pool them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import requests

__all__ = ["MintedPhoneCode", "SandboxAdmin", "SandboxAdminError"]

#: (connect, read) seconds for admin calls; minting many codes at once can take a moment.
DEFAULT_ADMIN_TIMEOUT_SECONDS: tuple[float, float] = (2.0, 30.0)
FaultEndpoint = Literal["token", "stable_token", "phone", "login"]


class SandboxAdminError(Exception):
    """The sandbox rejected an admin request or could not be reached."""


@dataclass(frozen=True)
class MintedPhoneCode:
    """A phone code and the number the sandbox will return for it."""

    code: str = field(repr=False)
    phone_number: str = field(repr=False)
    pure_phone_number: str = field(repr=False)
    country_code: str


class SandboxAdmin:
    """Typed wrappers around every admin endpoint of a running sandbox.

    Example::

        admin = SandboxAdmin("http://127.0.0.1:8780")
        admin.wait_until_ready(timeout_seconds=10)
        admin.register_app("wx123", "secret")
        code = admin.mint_phone_code("wx123", pure_phone_number="13800138000")
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: tuple[float, float] = DEFAULT_ADMIN_TIMEOUT_SECONDS,
        session: requests.Session | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._session = session

    def __repr__(self) -> str:
        return f"SandboxAdmin({self.base_url!r})"

    # -- apps and configuration -------------------------------------------------------------

    def register_app(self, appid: str, secret: str) -> None:
        """Register an app (or change its secret)."""
        self._call("POST", "/apps", {"appid": appid, "secret": secret})

    def apps(self) -> list[str]:
        """Registered appids."""
        apps: list[str] = self._call("GET", "/apps")["apps"]
        return apps

    def configure(self, **settings: Any) -> dict[str, Any]:
        """Change settings (``token_lifetime_seconds=4``, ``latency_ms={"phone": 20}``, ...)."""
        return self._call("POST", "/config", settings)

    def get_config(self) -> dict[str, Any]:
        """The current settings."""
        return self._call("GET", "/config")

    def revoke_tokens(self, appid: str) -> int:
        """Invalidate every token of ``appid`` now; return how many were still valid."""
        revoked: int = self._call("POST", f"/apps/{appid}/revoke")["revoked"]
        return revoked

    # -- codes ------------------------------------------------------------------------------

    def mint_phone_code(
        self,
        appid: str,
        *,
        phone_number: str | None = None,
        pure_phone_number: str | None = None,
        country_code: str = "86",
        country_code_as_number: bool = False,
        watermark_appid: str | None = None,
        lifetime_seconds: float | None = None,
    ) -> str:
        """Mint one phone code for ``appid``, as if a user had tapped the button."""
        minted = self.mint_phone_codes_detailed(
            appid,
            1,
            phone_number=phone_number,
            pure_phone_number=pure_phone_number,
            country_code=country_code,
            country_code_as_number=country_code_as_number,
            watermark_appid=watermark_appid,
            lifetime_seconds=lifetime_seconds,
        )
        return minted[0].code

    def mint_phone_codes(self, appid: str, count: int, **options: Any) -> list[str]:
        """Mint ``count`` codes; by default each resolves to a different number."""
        return [item.code for item in self.mint_phone_codes_detailed(appid, count, **options)]

    def mint_phone_codes_detailed(
        self,
        appid: str,
        count: int = 1,
        *,
        phone_number: str | None = None,
        pure_phone_number: str | None = None,
        country_code: str = "86",
        country_code_as_number: bool = False,
        watermark_appid: str | None = None,
        lifetime_seconds: float | None = None,
    ) -> list[MintedPhoneCode]:
        """Mint ``count`` codes and return each with the number it resolves to."""
        payload: dict[str, Any] = {
            "appid": appid,
            "count": count,
            "country_code": country_code,
            "country_code_as_number": country_code_as_number,
        }
        optional = {
            "phone_number": phone_number,
            "pure_phone_number": pure_phone_number,
            "watermark_appid": watermark_appid,
            "lifetime_seconds": lifetime_seconds,
        }
        payload.update({key: value for key, value in optional.items() if value is not None})
        phones = self._call("POST", "/phone_codes", payload)["phones"]
        return [MintedPhoneCode(**phone) for phone in phones]

    def mint_login_code(
        self, appid: str, *, openid: str | None = None, unionid: str | None = None, high_risk: bool = False
    ) -> tuple[str, str]:
        """Mint a ``wx.login`` code; return ``(code, openid)``."""
        payload: dict[str, Any] = {"appid": appid, "high_risk": high_risk}
        if openid is not None:
            payload["openid"] = openid
        if unionid is not None:
            payload["unionid"] = unionid
        reply = self._call("POST", "/login_codes", payload)
        return reply["code"], reply["openid"]

    # -- faults -----------------------------------------------------------------------------

    def inject_fault(
        self,
        endpoint: FaultEndpoint,
        *,
        errcode: int | None = None,
        times: int = 1,
        latency_ms: float = 0,
        drop_connection: bool = False,
        http_status: int | None = None,
        timing: Literal["before", "after"] = "before",
    ) -> int:
        """Queue a fault for the next ``times`` requests to ``endpoint``; return the queue length.

        With no effect given the fault is an ``errcode -1`` (system busy) reply.
        """
        payload: dict[str, Any] = {
            "endpoint": endpoint,
            "times": times,
            "latency_ms": latency_ms,
            "drop_connection": drop_connection,
            "timing": timing,
        }
        if errcode is not None:
            payload["errcode"] = errcode
        if http_status is not None:
            payload["http_status"] = http_status
        queued: int = self._call("POST", "/faults", payload)["queued"]
        return queued

    def pending_faults(self) -> list[dict[str, Any]]:
        """Faults not yet consumed."""
        faults: list[dict[str, Any]] = self._call("GET", "/faults")["faults"]
        return faults

    def clear_faults(self) -> None:
        """Drop every queued fault."""
        self._call("DELETE", "/faults")

    # -- observation and control ------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters per endpoint and per app, ``codes_exchanged`` and ``code_presentations``."""
        return self._call("GET", "/stats")

    def reset(self, all: bool = False) -> None:
        """Forget tokens, codes, faults and counters; ``all`` also restores start-up apps and config."""
        self._call("POST", "/reset", {"all": all})

    def advance_clock(self, seconds: float) -> float:
        """Move the sandbox's time forward; return the total offset (``reset`` clears it)."""
        offset: float = self._call("POST", "/clock", {"seconds": seconds})["offset_seconds"]
        return offset

    def health(self) -> bool:
        """Whether the sandbox answers its health check."""
        try:
            return bool(self._call("GET", "/health", timeout=(1.0, 2.0)).get("ok"))
        except SandboxAdminError:
            return False

    def wait_until_ready(self, timeout_seconds: float) -> None:
        """Poll the health check until it passes; raise :class:`SandboxAdminError` after the deadline."""
        deadline = time.monotonic() + timeout_seconds
        while not self.health():
            if time.monotonic() >= deadline:
                raise SandboxAdminError(f"sandbox at {self.base_url} not ready after {timeout_seconds:.1f}s")
            time.sleep(0.05)

    # -- plumbing ---------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        payload: dict[str, Any] | None = None,
        *,
        timeout: tuple[float, float] | None = None,
    ) -> dict[str, Any]:
        url = f"{self.base_url}/_sandbox{path}"
        try:
            if self._session is not None:
                response = self._session.request(method, url, json=payload, timeout=timeout or self.timeout)
            else:
                with requests.Session() as session:
                    response = session.request(method, url, json=payload, timeout=timeout or self.timeout)
        except requests.RequestException as error:
            raise SandboxAdminError(f"{method} {path}: {type(error).__name__}") from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 200 or not isinstance(body, dict):
            detail = body.get("error") if isinstance(body, dict) else response.text[:200]
            raise SandboxAdminError(f"{method} {path}: HTTP {response.status_code}: {detail}")
        return body
