"""The sessions of ``wxphone api``: the front end's own credential, minted after a login.

A session is an opaque bearer string that the API signs (HMAC-SHA256, ``WXPHONE_API_SESSION_KEY``)
and that expires ``WXPHONE_API_SESSION_TTL_SECONDS`` after its login. It carries the appid, the
openid, a random session id (what the per-session rate limit counts by) and its expiry time; it
never carries WeChat's session_key, nor anything secret: its payload is readable by whoever holds
it (base64), and only the signature keeps it from being forged or changed.

Signed with itsdangerous rather than issued as a JWT: nothing outside this API reads a session,
so JWT's interoperability buys nothing, while its header-chosen algorithms are a known source of
forgery bugs (``alg: none``, RS/HS confusion). itsdangerous has one fixed algorithm, salts the
key per use (a key shared with nothing else still never signs anything but a session), and
compares signatures in constant time.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from itsdangerous import BadSignature, URLSafeSerializer

from worker.settings import APPID_PATTERN

__all__ = ["MAX_SESSION_LENGTH", "ApiSession", "InvalidSessionError", "SessionSigner"]

#: Separates this use of the key from any other (itsdangerous derives a key per salt).
SESSION_SALT = "wxphone.api.session.v1"
#: A session string is about 200 characters; anything far longer is not one (checked before any
#: decoding work).
MAX_SESSION_LENGTH = 1024
#: Random bytes of a session id (128 bits: never guessed, never repeated).
SESSION_ID_BYTES = 16
_PAYLOAD_VERSION = 1


class InvalidSessionError(Exception):
    """The string is not a valid, unexpired session of this key (the reason is not told)."""


@dataclass(frozen=True)
class ApiSession:
    """What a valid session says: whose it is, its id and when it expires (epoch seconds)."""

    appid: str
    openid: str
    session_id: str
    expires_at: int


class SessionSigner:
    """Mints and verifies sessions with one key; ``clock`` returns epoch seconds."""

    def __init__(self, key: str, *, ttl_seconds: float, clock: Callable[[], float] = time.time) -> None:
        self._serializer = URLSafeSerializer(
            key, salt=SESSION_SALT, signer_kwargs={"digest_method": hashlib.sha256}
        )
        self.ttl_seconds = ttl_seconds
        self.clock = clock

    def mint(self, *, appid: str, openid: str) -> tuple[str, ApiSession]:
        """A new session for this user (a fresh random session id) and what it says."""
        session = ApiSession(
            appid=appid,
            openid=openid,
            session_id=secrets.token_urlsafe(SESSION_ID_BYTES),
            expires_at=int(self.clock() + self.ttl_seconds),
        )
        payload = {
            "v": _PAYLOAD_VERSION,
            "a": session.appid,
            "o": session.openid,
            "s": session.session_id,
            "e": session.expires_at,
        }
        return self._serializer.dumps(payload), session

    def verify(self, token: str) -> ApiSession:
        """The session ``token`` stands for; :class:`InvalidSessionError` when it is malformed,
        signed with another key, changed in any way, or expired."""
        if not token or len(token) > MAX_SESSION_LENGTH or not token.isascii():
            raise InvalidSessionError("malformed session")
        try:
            payload: Any = self._serializer.loads(token)
        except (BadSignature, ValueError):
            raise InvalidSessionError("bad signature") from None
        session = _session_from(payload)
        if session is None:
            # Signed by this key but not a session of this shape: an older or foreign payload.
            raise InvalidSessionError("unknown session format")
        if session.expires_at <= self.clock():
            raise InvalidSessionError("expired")
        return session


def _session_from(payload: Any) -> ApiSession | None:
    if not isinstance(payload, dict) or payload.get("v") != _PAYLOAD_VERSION:
        return None
    appid, openid, session_id, expires_at = (payload.get(key) for key in ("a", "o", "s", "e"))
    if not (isinstance(appid, str) and APPID_PATTERN.fullmatch(appid)):
        return None
    if not (isinstance(openid, str) and openid and isinstance(session_id, str) and session_id):
        return None
    if not isinstance(expires_at, int) or isinstance(expires_at, bool):
        return None
    return ApiSession(appid=appid, openid=openid, session_id=session_id, expires_at=expires_at)
