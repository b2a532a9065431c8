"""No secret, token, code, session_key or phone number reaches a log line, whoever logs it."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest
from celery.signals import after_setup_logger, after_setup_task_logger

from worker.logs import (
    MAX_ROTATING_SECRETS,
    RedactingFilter,
    RedactingFormatter,
    _clear_registered_secrets,
    configure_logging,
    install_redaction,
    redact,
    register_secret,
)

APP_SECRET = "0123456789abcdefSECRETfedcba9876"
ACCESS_TOKEN = "81_ACCESSTOKEN-xYzAbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
PHONE_CODE = "e31968a7f94cc5ee25fafc2aef2773f0"
SESSION_KEY = "tiihtNczf5v6AKRyjwEUhQ=="
TASK_ID = "5d2a37e1-8f0b-4c3e-9a1d-a13912345678"

_CLAMPED = ("urllib3", "requests", "celery")


@pytest.fixture(autouse=True)
def isolated_logging() -> Iterator[None]:
    """Undo what configure_logging and install_redaction do to process-wide logging state."""
    root = logging.getLogger()
    handlers = [(handler, handler.formatter, list(handler.filters)) for handler in root.handlers]
    level = root.level
    levels = {name: logging.getLogger(name).level for name in _CLAMPED}
    _clear_registered_secrets()
    yield
    _clear_registered_secrets()
    for handler in root.handlers[:]:
        if handler not in [saved for saved, _, _ in handlers]:
            root.removeHandler(handler)
    for handler, formatter, filters in handlers:
        handler.setFormatter(formatter)
        handler.filters[:] = filters
    root.setLevel(level)
    for name, saved_level in levels.items():
        logging.getLogger(name).setLevel(saved_level)


@pytest.fixture
def output() -> io.StringIO:
    return io.StringIO()


@pytest.fixture
def isolated_logger() -> Iterator[logging.Logger]:
    """A logger of its own (not propagating) for tests of single handlers."""
    logger = logging.getLogger("tests.logs.isolated")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    before = list(logger.handlers)
    yield logger
    for handler in logger.handlers[:]:
        if handler not in before:
            logger.removeHandler(handler)


def stream_handler(
    stream: io.StringIO, fmt: str = "%(levelname)s %(message)s"
) -> logging.StreamHandler[io.StringIO]:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(fmt))
    return handler


# -- the rules ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            '"GET /cgi-bin/token?grant_type=client_credential&appid=wx1&secret=abc123def HTTP/1.1" 200',
            '"GET /cgi-bin/token?grant_type=client_credential&appid=wx1&secret=*** HTTP/1.1" 200',
        ),
        (
            "/wxa/business/getuserphonenumber?access_token=TOKEN_abc-123",
            "/wxa/business/getuserphonenumber?access_token=***",
        ),
        (
            "/sns/jscode2session?appid=wx1&js_code=0a1b2c&grant_type=x",
            "/sns/jscode2session?appid=wx1&js_code=***&grant_type=x",
        ),
        ('{"code": "0e1f2a", "openid": "o-1"}', '{"code": "***", "openid": "o-1"}'),
        ('{"code":"0e1f2a"}', '{"code":"***"}'),
        ("{'session_key': 'k+/=='}", "{'session_key': '***'}"),
        ("kwargs={'code': 'abc', 'appid': 'wx1'}", "kwargs={'code': '***', 'appid': 'wx1'}"),
        ("resolve(code='abc', appid='wx1')", "resolve(code='***', appid='wx1')"),
        (
            '{"phoneNumber": "+85291234567", "countryCode": "852"}',
            '{"phoneNumber": "***", "countryCode": "852"}',
        ),
        ("{'pure_phone_number': 13800138000}", "{'pure_phone_number': ***}"),
        ("phone_number=13800138000, purePhoneNumber=13800138000", "phone_number=***, purePhoneNumber=***"),
    ],
)
def test_sensitive_keys_lose_their_values(line: str, expected: str) -> None:
    assert redact(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        "phone: invalid code errcode=40029 rid=632d16be-15ad5486-1e378de4",
        "job failed error_code=invalid_code",
        '{"countryCode": "86", "errcode": 0}',
        f"Task wxphone.resolve_phone[{TASK_ID}] succeeded in 0.12s",
        "expires_in=7200 at 1637744274 tz +0800",
    ],
)
def test_diagnostic_values_stay_readable(line: str) -> None:
    assert redact(line) == line


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("resolved 13800138000 for wx1", "resolved 138****8000 for wx1"),
        ("numbers: 19912345678,15011112222.", "numbers: 199****5678,150****2222."),
        ("tel +85291234567 ok", "tel +***4567 ok"),
        ("tel +8613800138000", "tel +***8000"),
    ],
)
def test_phone_numbers_are_masked(line: str, expected: str) -> None:
    assert redact(line) == expected


def test_registered_secrets_are_redacted_anywhere() -> None:
    register_secret(APP_SECRET, permanent=True)
    register_secret(ACCESS_TOKEN)

    text = redact(f"secret was{APP_SECRET}; token[{ACCESS_TOKEN}]")

    assert text == "secret was***; token[***]"


def test_percent_encoded_form_of_a_secret_is_redacted() -> None:
    token = "tok+en/with=chars"
    register_secret(token)
    assert redact("url?x=tok%2Ben%2Fwith%3Dchars") == "url?x=***"


def test_only_the_most_recent_rotating_secrets_are_kept_but_permanent_ones_stay() -> None:
    register_secret(APP_SECRET, permanent=True)
    tokens = [f"token-number-{index:04d}" for index in range(MAX_ROTATING_SECRETS + 1)]
    for token in tokens:
        register_secret(token)

    assert redact(tokens[0]) == tokens[0]
    assert redact(tokens[1]) == "***"
    assert redact(tokens[-1]) == "***"
    assert redact(APP_SECRET) == "***"


def test_very_short_values_are_not_registered() -> None:
    register_secret("ab")
    assert redact("tab cab") == "tab cab"


# -- configure_logging --------------------------------------------------------------------------------


def test_urllib3_debug_url_lines_never_reach_the_log(output: io.StringIO) -> None:
    configure_logging("DEBUG", secrets=[APP_SECRET], stream=output)

    # The exact call urllib3.connectionpool makes for each request.
    logging.getLogger("urllib3.connectionpool").debug(
        '%s://%s:%s "%s %s %s" %s %s',
        "https",
        "api.weixin.qq.com",
        443,
        "GET",
        f"/cgi-bin/token?grant_type=client_credential&appid=wx1&secret={APP_SECRET}",
        "HTTP/1.1",
        200,
        None,
    )
    logging.getLogger("app").debug("still logging at DEBUG")

    assert APP_SECRET not in output.getvalue()
    assert "still logging at DEBUG" in output.getvalue()
    assert logging.getLogger("urllib3").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("requests").getEffectiveLevel() == logging.WARNING


def test_urllib3_url_line_is_redacted_even_if_its_logger_is_turned_up(output: io.StringIO) -> None:
    configure_logging("DEBUG", stream=output)
    logging.getLogger("urllib3").setLevel(logging.DEBUG)
    register_secret(ACCESS_TOKEN)

    logging.getLogger("urllib3.connectionpool").debug(
        '%s://%s:%s "%s %s %s" %s %s',
        "https",
        "api.weixin.qq.com",
        443,
        "POST",
        f"/wxa/business/getuserphonenumber?access_token={ACCESS_TOKEN}",
        "HTTP/1.1",
        200,
        None,
    )
    logging.getLogger("urllib3.connectionpool").debug(
        "GET /cgi-bin/token?grant_type=client_credential&appid=wx1&secret=not-registered-yet HTTP/1.1"
    )

    text = output.getvalue()
    assert "getuserphonenumber?access_token=***" in text
    assert ACCESS_TOKEN not in text
    assert "secret=***" in text
    assert "not-registered-yet" not in text


def test_quieter_level_also_applies_to_http_libraries(output: io.StringIO) -> None:
    configure_logging("ERROR", stream=output)
    logging.getLogger("urllib3.connectionpool").warning("Retrying after connection broken")
    assert output.getvalue() == ""


def test_registered_secret_in_a_traceback_is_redacted(output: io.StringIO) -> None:
    configure_logging("INFO", secrets=[APP_SECRET], stream=output)
    register_secret(ACCESS_TOKEN)

    try:
        raise RuntimeError(f"boom with {APP_SECRET} and {ACCESS_TOKEN} for 13800138000")
    except RuntimeError:
        logging.getLogger("app").exception("call failed")

    text = output.getvalue()
    assert "Traceback (most recent call last)" in text
    assert "RuntimeError: boom with *** and *** for 138****8000" in text
    assert APP_SECRET not in text
    assert ACCESS_TOKEN not in text


def test_celery_task_lines_are_redacted(output: io.StringIO) -> None:
    configure_logging("DEBUG", stream=output)

    # Celery's pool prints positional arguments at DEBUG, where no key names a value to redact:
    # those loggers are held at INFO even when everything else logs DEBUG.
    logging.getLogger("celery.pool").debug("TaskPool: Apply (args:(%r,))", PHONE_CODE)
    logging.getLogger("celery.worker.strategy").info(
        "Task %(name)s[%(id)s] received: kwargs=%(kwargs)s",
        {
            "name": "wxphone.resolve_phone",
            "id": TASK_ID,
            "kwargs": {"code": PHONE_CODE, "appid": "wx1", "js_code": "0c3f9a", "session_key": SESSION_KEY},
        },
    )
    logging.getLogger("celery.app.trace").info(
        "Task %(name)s[%(id)s] succeeded in %(runtime)ss: %(return_value)s",
        {
            "name": "wxphone.resolve_phone",
            "id": TASK_ID,
            "runtime": 0.12,
            "return_value": {"phone_number": "13800138000", "country_code": "86"},
        },
    )

    text = output.getvalue()
    assert "TaskPool: Apply" not in text
    assert f"Task wxphone.resolve_phone[{TASK_ID}] received: kwargs={{'code': '***', 'appid': 'wx1'" in text
    assert f"Task wxphone.resolve_phone[{TASK_ID}] succeeded in 0.12s: {{'phone_number': '***'" in text
    for value in (PHONE_CODE, SESSION_KEY, "0c3f9a", "13800138000"):
        assert value not in text


def test_configure_logging_is_idempotent(output: io.StringIO) -> None:
    configure_logging("INFO", stream=output)
    configure_logging("DEBUG", secrets=[APP_SECRET], stream=output)
    configure_logging("DEBUG", stream=output)

    logging.getLogger("app").debug("once %s", APP_SECRET)

    assert output.getvalue().count("once ***") == 1
    assert logging.getLogger().level == logging.DEBUG


def test_celery_loggers_propagate_to_the_redacting_root_handler(output: io.StringIO) -> None:
    logging.getLogger("celery").setLevel(logging.ERROR)
    configure_logging("INFO", stream=output)

    logging.getLogger("celery.worker.consumer").info("Connected to redis://127.0.0.1:6379/0")

    assert "Connected to redis" in output.getvalue()


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="LOUD"):
        configure_logging("LOUD")


def test_other_root_handlers_are_made_to_redact(output: io.StringIO) -> None:
    foreign = io.StringIO()
    root = logging.getLogger()
    root.addHandler(stream_handler(foreign))
    configure_logging("INFO", stream=output)

    logging.getLogger("app").info("secret=%s", "abc123")

    assert "secret=***" in foreign.getvalue()
    assert "abc123" not in foreign.getvalue()


# -- install_redaction, RedactingFilter, RedactingFormatter --------------------------------------------


def test_install_redaction_keeps_the_handler_layout(
    isolated_logger: logging.Logger, output: io.StringIO
) -> None:
    handler = stream_handler(output, fmt="[%(name)s] <%(message)s>")
    isolated_logger.addHandler(handler)

    install_redaction(isolated_logger)
    install_redaction(isolated_logger)  # twice: still one filter, one wrapping
    isolated_logger.info("kwargs={'code': 'abc'}")

    assert output.getvalue() == "[tests.logs.isolated] <kwargs={'code': '***'}>\n"
    assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
    assert isinstance(handler.formatter, RedactingFormatter)
    assert not isinstance(handler.formatter.inner, RedactingFormatter)


def test_install_redaction_accepts_a_handler(isolated_logger: logging.Logger, output: io.StringIO) -> None:
    handler = stream_handler(output)
    isolated_logger.addHandler(handler)

    install_redaction(handler)
    isolated_logger.warning("session_key=%s", SESSION_KEY)

    assert output.getvalue() == "WARNING session_key=***\n"


@pytest.mark.parametrize(
    "signal", [after_setup_logger, after_setup_task_logger], ids=["logger", "task_logger"]
)
def test_install_redaction_can_be_connected_to_celery_logging_signals(
    signal: object, isolated_logger: logging.Logger, output: io.StringIO
) -> None:
    isolated_logger.addHandler(stream_handler(output))
    signal.connect(install_redaction, weak=False)  # type: ignore[attr-defined]
    try:
        # The arguments Celery's Logging.setup_logging_subsystem/setup_task_loggers send.
        signal.send(  # type: ignore[attr-defined]
            sender=None,
            logger=isolated_logger,
            loglevel=logging.INFO,
            logfile=None,
            format="%(message)s",
            colorize=False,
        )
    finally:
        signal.disconnect(install_redaction)  # type: ignore[attr-defined]

    isolated_logger.info("GET /cgi-bin/token?appid=wx1&secret=abc123def")

    assert output.getvalue() == "INFO GET /cgi-bin/token?appid=wx1&secret=***\n"


def test_filter_redacts_the_record_for_every_later_handler(isolated_logger: logging.Logger) -> None:
    redacted, plain = io.StringIO(), io.StringIO()
    first = stream_handler(redacted)
    first.addFilter(RedactingFilter())
    isolated_logger.addHandler(first)
    isolated_logger.addHandler(stream_handler(plain))  # no redaction of its own
    register_secret(ACCESS_TOKEN)

    try:
        raise ValueError(ACCESS_TOKEN)
    except ValueError:
        isolated_logger.exception("token %s rejected", ACCESS_TOKEN)

    for text in (redacted.getvalue(), plain.getvalue()):
        assert "token *** rejected" in text
        assert "ValueError: ***" in text
        assert ACCESS_TOKEN not in text


def test_formatter_alone_redacts_message_and_traceback(
    isolated_logger: logging.Logger, output: io.StringIO
) -> None:
    handler = stream_handler(output)
    handler.setFormatter(RedactingFormatter("%(levelname)s %(message)s"))
    isolated_logger.addHandler(handler)
    register_secret(APP_SECRET, permanent=True)

    try:
        raise KeyError(APP_SECRET)
    except KeyError:
        isolated_logger.exception("lookup of %s failed", APP_SECRET)

    text = output.getvalue()
    assert text.startswith("ERROR lookup of *** failed\nTraceback (most recent call last)")
    assert "KeyError: '***'" in text
    assert APP_SECRET not in text


def test_bad_format_arguments_do_not_break_the_caller() -> None:
    # Handler filters run outside the handler's error handling: a raise here would reach the
    # code that logged. (Called directly: pytest's own capture handler raises on such records.)
    record = logging.LogRecord("app", logging.INFO, __file__, 1, "code=%s and %s", (PHONE_CODE,), None)

    assert RedactingFilter().filter(record) is True

    assert record.args is None
    assert "code=***" in record.getMessage()
    assert PHONE_CODE not in record.getMessage()
