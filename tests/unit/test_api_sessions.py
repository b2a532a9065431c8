"""Sessions of ``wxphone api``: signed, expiring, and nothing but a valid one verifies."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from itsdangerous import URLSafeSerializer

from worker.api.sessions import SESSION_SALT, InvalidSessionError, SessionSigner

KEY = "unit-tests-session-key-0123456789abcdef"
APPID = "wxunit0000000001"
OPENID = "oUnitUser000001"
NOW = 1_800_000_000.0


def signer(key: str = KEY, *, now: float = NOW, ttl_seconds: float = 7200) -> SessionSigner:
    return SessionSigner(key, ttl_seconds=ttl_seconds, clock=lambda: now)


def test_a_minted_session_verifies_until_it_expires() -> None:
    token, minted = signer().mint(appid=APPID, openid=OPENID)
    assert (minted.appid, minted.openid, minted.expires_at) == (APPID, OPENID, int(NOW + 7200))
    assert signer(now=NOW + 7199).verify(token) == minted
    for later in (NOW + 7200, NOW + 10**6):
        with pytest.raises(InvalidSessionError):
            signer(now=later).verify(token)


def test_every_session_gets_its_own_random_id() -> None:
    ids = {signer().mint(appid=APPID, openid=OPENID)[1].session_id for _ in range(100)}
    assert len(ids) == 100
    assert all(len(session_id) >= 22 for session_id in ids)  # 128 bits, URL-safe base64


def test_a_session_holds_nothing_secret() -> None:
    token, minted = signer().mint(appid=APPID, openid=OPENID)
    # Anyone can read it (no key needed): so it holds only what its owner already knows.
    readable, decoded = URLSafeSerializer("not-the-key").loads_unsafe(token)
    assert not readable
    assert decoded == {"v": 1, "a": APPID, "o": OPENID, "s": minted.session_id, "e": minted.expires_at}
    assert KEY not in token


def _tampered(token: str) -> list[str]:
    payload, signature = token.rsplit(".", 1)
    forged_payload = (
        base64.urlsafe_b64encode(
            json.dumps(
                {"v": 1, "a": APPID, "o": "oSomeoneElse01", "s": "x" * 22, "e": 4_000_000_000}
            ).encode()
        )
        .decode()
        .rstrip("=")
    )
    return [
        payload + "." + signature[:-1] + ("A" if signature[-1] != "A" else "B"),
        forged_payload + "." + signature,
        payload + "X." + signature,
        payload,
        "." + signature,
        token + " ",
        token + "é",
        "",
        token * 8,
    ]


def test_any_change_to_a_session_is_refused() -> None:
    token, _ = signer().mint(appid=APPID, openid=OPENID)
    for changed in _tampered(token):
        with pytest.raises(InvalidSessionError):
            signer().verify(changed)


def test_a_session_of_another_key_or_purpose_is_refused() -> None:
    token, _ = signer("another-session-key-0123456789abcdef").mint(appid=APPID, openid=OPENID)
    with pytest.raises(InvalidSessionError):
        signer().verify(token)
    # Signed with the same key for another purpose (another salt): not a session.
    other_use = URLSafeSerializer(KEY, salt="something-else").dumps({"v": 1, "a": APPID, "o": OPENID})
    with pytest.raises(InvalidSessionError):
        signer().verify(other_use)


@pytest.mark.parametrize(
    "payload",
    [
        {"v": 2, "a": APPID, "o": OPENID, "s": "sid", "e": 4_000_000_000},
        {"v": 1, "a": "wx app", "o": OPENID, "s": "sid", "e": 4_000_000_000},
        {"v": 1, "a": APPID, "o": "", "s": "sid", "e": 4_000_000_000},
        {"v": 1, "a": APPID, "o": OPENID, "s": "", "e": 4_000_000_000},
        {"v": 1, "a": APPID, "o": OPENID, "s": "sid", "e": "never"},
        {"v": 1, "a": APPID, "o": OPENID, "s": "sid", "e": True},
        {"v": 1, "a": APPID, "o": OPENID, "s": "sid"},
        [APPID, OPENID],
        "a session",
    ],
)
def test_a_well_signed_payload_of_another_shape_is_refused(payload: object) -> None:
    token = URLSafeSerializer(KEY, salt=SESSION_SALT, signer_kwargs={"digest_method": hashlib.sha256}).dumps(
        payload
    )
    with pytest.raises(InvalidSessionError):
        signer().verify(token)
