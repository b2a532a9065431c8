"""Logging set-up for wxphone: every line, ours or a library's, is redacted before it is written.

What is removed from each log line:

* the value of any ``secret``, ``access_token``, ``code``, ``js_code``, ``session_key``,
  ``phoneNumber``, ``purePhoneNumber``, ``phone_number`` or ``pure_phone_number`` key, written as
  ``key=value`` (query strings, kwargs reprs), ``"key": "value"`` (JSON) or ``'key': 'value'``
  (Python dict reprs): the value becomes ``***``;
* every value registered with :func:`register_secret` (AppSecrets for the life of the process,
  access tokens as they are fetched), wherever it appears: it becomes ``***``;
* mainland China mobile numbers (``13800138000`` -> ``138****8000``) and ``+``-prefixed
  international numbers of 8 to 15 digits (``+85291234567`` -> ``+***4567``).

Usage::

    from worker.logs import configure_logging, register_secret

    configure_logging(settings.log_level, secrets=[app.secret for app in settings.apps])
    register_secret(token.value)  # each access token, as soon as it is fetched or read

Celery adds handlers of its own (for ``celery.task``, which does not propagate to the root
logger); connect :func:`install_redaction` to its ``after_setup_logger`` and
``after_setup_task_logger`` signals so those handlers redact too (see that function).
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import TextIO
from urllib.parse import quote

__all__ = [
    "LOG_FORMAT",
    "REDACTED",
    "RedactingFilter",
    "RedactingFormatter",
    "configure_logging",
    "install_redaction",
    "redact",
    "register_secret",
]

REDACTED = "***"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"

#: Keys whose values are secrets or personal data wherever they appear.
SENSITIVE_KEYS: tuple[str, ...] = (
    "secret",
    "access_token",
    "code",
    "js_code",
    "session_key",
    "phoneNumber",
    "purePhoneNumber",
    "phone_number",
    "pure_phone_number",
)
#: Libraries whose DEBUG lines carry request URLs, and so the secret or token in the query.
NOISY_HTTP_LOGGERS: tuple[str, ...] = ("urllib3", "requests")
#: Loggers whose DEBUG lines print task arguments as the sender rendered them (positional
#: arguments carry no key name to redact by): held at INFO or above.
ARGUMENT_PRINTING_LOGGERS: tuple[str, ...] = ("celery.pool", "celery.worker.strategy", "celery.app.trace")
#: Registered values shorter than this are ignored: masking every "ab" would wreck the logs, and
#: real AppSecrets (32 characters) and access tokens (over 100) are far longer.
MIN_SECRET_LENGTH = 6
#: How many rotating values (access tokens) are remembered. Each app holds at most a few live
#: tokens at once, so this covers many apps while keeping the pattern small.
MAX_ROTATING_SECRETS = 64

_KEY_ALTERNATION = "|".join(re.escape(key) for key in SENSITIVE_KEYS)
# The key must not be the tail of a longer name: "errcode=40029" and "error_code=x" stay readable.
_NOT_AFTER_WORD = r"(?<![A-Za-z0-9_])"
_QUOTED_VALUE = r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'"
# A bare value ends where a query string, kwargs repr or sentence would move on.
_BARE_VALUE = r"[^\s&,;)\]}>\"']+"
# key=value, key='value' (query strings, kwargs and dataclass reprs).
_ASSIGNMENT = re.compile(
    rf"{_NOT_AFTER_WORD}(?P<prefix>(?:{_KEY_ALTERNATION})\s*=\s*)(?P<value>{_QUOTED_VALUE}|{_BARE_VALUE})"
)
# "key": "value", 'key': 'value', "key": 123 (JSON and Python dict reprs).
_MAPPING_ENTRY = re.compile(
    rf"{_NOT_AFTER_WORD}(?P<prefix>(?P<q>[\"'])(?:{_KEY_ALTERNATION})(?P=q)\s*:\s*)"
    rf"(?P<value>{_QUOTED_VALUE}|{_BARE_VALUE})"
)
# Alphanumeric boundaries, not digit boundaries, so hex runs inside task ids are left alone.
_MAINLAND_MOBILE = re.compile(r"(?<![0-9A-Za-z])1[3-9]\d{9}(?![0-9A-Za-z])")
_INTERNATIONAL_NUMBER = re.compile(r"(?<![0-9A-Za-z+])\+\d{8,15}(?!\d)")

_HANDLER_MARK = "_wxphone_redacting_handler"


class _SecretRegistry:
    """Literal values to redact: permanent ones plus a bounded, most-recent set of rotating ones."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._permanent: set[str] = set()
        # Registered value -> the forms of it that are redacted (raw and percent-encoded).
        self._rotating: OrderedDict[str, frozenset[str]] = OrderedDict()
        # Readers use whatever pattern is current; it is replaced whole, never mutated.
        self.pattern: re.Pattern[str] | None = None

    def add(self, value: str, *, permanent: bool) -> None:
        if len(value) < MIN_SECRET_LENGTH:
            return
        # Query strings carry the percent-encoded form; tokens may contain "*" or "+".
        forms = frozenset({value, quote(value, safe="")})
        with self._lock:
            if permanent:
                self._permanent |= forms
                self._rotating.pop(value, None)
            elif not forms <= self._permanent:
                self._rotating[value] = forms
                self._rotating.move_to_end(value)
                while len(self._rotating) > MAX_ROTATING_SECRETS:
                    self._rotating.popitem(last=False)
            self._rebuild()

    def clear(self) -> None:
        with self._lock:
            self._permanent.clear()
            self._rotating.clear()
            self._rebuild()

    def _rebuild(self) -> None:
        values = set(self._permanent).union(*self._rotating.values())
        # Longest first, so a secret that contains another is replaced whole.
        ordered = sorted(values, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None


_registry = _SecretRegistry()


def register_secret(value: str, *, permanent: bool = False) -> None:
    """Redact ``value`` from every log line from now on.

    Use ``permanent=True`` for values that live as long as the process (AppSecrets); other values
    (access tokens) are kept in a bounded set of the most recently registered ones, so a
    long-running worker that fetches a token every hour does not grow without bound. Values
    shorter than :data:`MIN_SECRET_LENGTH` characters are ignored.
    """
    _registry.add(value, permanent=permanent)


def _clear_registered_secrets() -> None:
    """Forget every registered value (for tests)."""
    _registry.clear()


def _mask_quoted_or_bare(value: str) -> str:
    if len(value) >= 2 and value[0] in "\"'" and value[-1] == value[0]:
        return value[0] + REDACTED + value[0]
    return REDACTED


def _redact_key_value(match: re.Match[str]) -> str:
    return match.group("prefix") + _mask_quoted_or_bare(match.group("value"))


def _mask_mainland(match: re.Match[str]) -> str:
    number = match.group(0)
    return number[:3] + "****" + number[-4:]


def _mask_international(match: re.Match[str]) -> str:
    return "+***" + match.group(0)[-4:]


def redact(text: str) -> str:
    """Return ``text`` with secrets, codes, tokens and phone numbers removed (see the module doc)."""
    pattern = _registry.pattern
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    text = _ASSIGNMENT.sub(_redact_key_value, text)
    text = _MAPPING_ENTRY.sub(_redact_key_value, text)
    text = _INTERNATIONAL_NUMBER.sub(_mask_international, text)
    return _MAINLAND_MOBILE.sub(_mask_mainland, text)


class RedactingFilter(logging.Filter):
    """Redacts a record in place: its message, its exception text and its stack information.

    The message is rendered (``record.getMessage()``) and stored back with ``args = None``, so
    task arguments passed as ``%``-style arguments can no longer reach any formatter. The
    filter never drops a record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            # A bad format string must not turn a log call into a crash of the caller (filters
            # run outside the handler's own error handling). The arguments are withheld: out of
            # their "key=%s" context nothing tells which of them are secrets.
            message = f"{record.msg!s} [arguments withheld: they do not fit the message]"
        record.msg = redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            # Render the traceback now: formatters reuse a cached exc_text, so a redacted one here
            # is what every handler prints.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class RedactingFormatter(logging.Formatter):
    """Redacts the final formatted line, traceback included.

    With ``inner`` it wraps an existing formatter (for example Celery's colour or task
    formatter) and keeps its layout; without, it formats like :class:`logging.Formatter`.
    """

    def __init__(
        self,
        fmt: str | None = None,
        datefmt: str | None = None,
        *,
        inner: logging.Formatter | None = None,
    ) -> None:
        super().__init__(fmt, datefmt)
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record) if self.inner is not None else super().format(record)
        return redact(text)


def _protect_handler(handler: logging.Handler) -> None:
    if not any(isinstance(existing, RedactingFilter) for existing in handler.filters):
        handler.addFilter(RedactingFilter())
    if not isinstance(handler.formatter, RedactingFormatter):
        handler.setFormatter(RedactingFormatter(inner=handler.formatter or logging.Formatter()))


def install_redaction(
    *targets: logging.Logger | logging.Handler, logger: logging.Logger | None = None, **_signal: object
) -> None:
    """Make handlers redact: each handler given, and every handler of each logger given.

    Each handler gets a :class:`RedactingFilter` and its formatter is wrapped in a
    :class:`RedactingFormatter` (layout unchanged). Calling it again is harmless.

    Meant for Celery, which creates its own handlers once the worker starts (``celery.task``
    has its own handler and does not propagate to the root logger). The signature matches
    Celery's logging signals, which pass the logger by keyword, so in ``worker/app.py``::

        from celery.signals import after_setup_logger, after_setup_task_logger

        after_setup_logger.connect(install_redaction, weak=False)
        after_setup_task_logger.connect(install_redaction, weak=False)

    The other signal arguments (``sender``, ``loglevel``, ``format`` ...) are ignored.
    """
    all_targets: list[logging.Logger | logging.Handler] = list(targets)
    if logger is not None:
        all_targets.append(logger)
    for target in all_targets:
        handlers = target.handlers if isinstance(target, logging.Logger) else [target]
        for handler in handlers:
            _protect_handler(handler)


def _level_number(level: str) -> int:
    number = logging.getLevelNamesMapping().get(level.upper())
    if number is None:
        raise ValueError(f"unknown log level {level!r}")
    return number


def configure_logging(level: str, *, secrets: Iterable[str] = (), stream: TextIO | None = None) -> None:
    """Send all logging to one redacting stderr handler on the root logger.

    ``secrets`` (the AppSecrets) are registered permanently. Calling it again changes the level
    and registers more secrets without adding a second handler. Every other handler already on
    the root logger is made to redact as well. ``urllib3`` and ``requests`` stay at WARNING or
    above even at DEBUG, since their DEBUG lines are request URLs. Celery's loggers keep no level
    of their own here and propagate to the root handler.
    """
    number = _level_number(level)
    for secret in secrets:
        register_secret(secret, permanent=True)

    root = logging.getLogger()
    if not any(getattr(handler, _HANDLER_MARK, False) for handler in root.handlers):
        # sys.__stderr__, not sys.stderr: a Celery worker replaces sys.stderr with a proxy that
        # logs what is written to it, and a handler writing there would feed itself.
        handler = logging.StreamHandler(stream or sys.__stderr__ or sys.stderr)
        handler.setFormatter(RedactingFormatter(LOG_FORMAT))
        setattr(handler, _HANDLER_MARK, True)
        root.addHandler(handler)
    install_redaction(root)
    root.setLevel(number)

    for name in NOISY_HTTP_LOGGERS:
        logging.getLogger(name).setLevel(max(number, logging.WARNING))
    for name in ARGUMENT_PRINTING_LOGGERS:
        logging.getLogger(name).setLevel(max(number, logging.INFO))
    celery_logger = logging.getLogger("celery")
    celery_logger.setLevel(logging.NOTSET)
    celery_logger.propagate = True
