"""The private RabbitMQ brokers of tests/support/rabbitmq.py do what fault tests rely on.

A restart keeps durable queues and persistent messages, a kill is a crash the broker recovers
from, close_all_connections() cuts clients off, and reset() leaves nothing for the next test.
"""

from __future__ import annotations

from typing import Any

import amqp.exceptions
import pytest

from tests.support.rabbitmq import MakeRabbitMQServer, RabbitMQServer

pytestmark = pytest.mark.slow

#: Persistent: the broker writes the message to disk in a durable queue.
PERSISTENT = 2


def _publish(server: RabbitMQServer, queue_name: str, body: dict[str, Any]) -> None:
    """Publish ``body`` to a durable queue and wait for the broker's confirm (it is then on disk)."""
    with server.connection(transport_options={"confirm_publish": True}) as conn:
        queue = conn.SimpleQueue(queue_name)  # a durable queue behind a durable direct exchange
        queue.put(body, delivery_mode=PERSISTENT)
        queue.close()


def test_a_persistent_message_in_a_durable_queue_survives_a_restart(
    make_rabbitmq_server: MakeRabbitMQServer,
) -> None:
    server = make_rabbitmq_server()
    _publish(server, "wxphone", {"job": 1})
    with server.connection() as conn:
        conn.default_channel.queue_declare(queue="transient", durable=False, auto_delete=False)
    port = server.port

    server.restart()

    assert server.port == port
    assert server.queue_depth("wxphone") == 1
    # A queue that is not durable is gone: the broker really went down and came back.
    with pytest.raises(LookupError):
        server.queue_depth("transient")
    with server.connection() as conn:
        queue = conn.SimpleQueue("wxphone")
        message = queue.get(block=True, timeout=5)
        message.ack()
        queue.close()
    assert message.payload == {"job": 1}


def test_close_all_connections_cuts_a_consumer_off(
    rabbitmq_server: RabbitMQServer, rabbitmq_url: str
) -> None:
    with rabbitmq_server.connection() as conn:
        queue = conn.SimpleQueue("wxphone")  # consuming from here on

        rabbitmq_server.close_all_connections()

        # The broker's Connection.Close reaches the consumer while it waits for a delivery.
        with pytest.raises(amqp.exceptions.ConnectionForced):
            queue.get(block=True, timeout=10)


def test_a_killed_broker_starts_again_with_what_it_confirmed(
    make_rabbitmq_server: MakeRabbitMQServer,
) -> None:
    server = make_rabbitmq_server()
    _publish(server, "wxphone", {"job": 2})

    server.kill()

    assert not server.is_running()
    assert not server.answers()
    server.start()
    assert server.queue_depth("wxphone") == 1


def test_reset_leaves_no_queue_and_no_exchange(rabbitmq_server: RabbitMQServer, rabbitmq_url: str) -> None:
    _publish(rabbitmq_server, "wxphone.token", {"job": 3})
    with rabbitmq_server.connection() as conn:
        conn.default_channel.queue_declare(queue="never-consumed", auto_delete=True)

    rabbitmq_server.reset()

    definitions = rabbitmq_server.definitions()
    assert definitions["queues"] == []
    assert [each["name"] for each in definitions["exchanges"] if not each["name"].startswith("amq.")] == []
