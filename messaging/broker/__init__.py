"""THE CORE: the broker service layer. every delivery rule of Pegasus lives here (docs/API.md, "Concepts").

Each public function is one synchronous operation that owns its database transaction and takes
keyword-only arguments. (A plain publish or ack on PostgreSQL is a single statement, which is
its own transaction in autocommit: common.one_statement.) REST, WebSocket, STOMP, the console,
bridges and commands call these and nothing else writes messages or delivery state.

Time-based rules need no daemon: lease expiry, delays and TTL are decided at query time inside
`receive`; housekeeping (idle transactions, expired non-durable subscriptions, acked rows, old
dedup records) is `run_maintenance`, which each server process runs on a timer
(messaging/maintenance.py).

Lock order, to stay free of deadlocks: transaction row, then delivery rows in id order, durable
store before transient store. Claims use FOR UPDATE SKIP LOCKED, so consumers never wait on
each other and never get the same row.

Modules: common (stores, values, validation, shared locks), destinations, publishing,
delivery (receive/ack/nack/extend/dead letters), transactions, housekeeping. Call them through
this package: `from messaging import broker; broker.publish(...)`.
"""

from __future__ import annotations

from messaging.broker.common import (
    ANY_QUEUE,
    DURABLE,
    MAX_DELAY_SECONDS,
    STORES,
    TRANSIENT,
    OutgoingMessage,
    PublishResult,
    QueueSettings,
    ReceivedMessage,
    Store,
    store_for,
    validate_message,
    validate_name,
)
from messaging.broker.consumers import refresh_consumers, register_consumer, unregister_consumers
from messaging.broker.delivery import (
    ACK_OK,
    ACK_STALE,
    ack,
    ack_and_receive,
    extend,
    nack,
    receive,
    redrive,
    require_some_ok,
)
from messaging.broker.destinations import (
    create_queue,
    create_subscription,
    create_topic,
    delete_owned_subscriptions,
    delete_queue,
    delete_topic,
    get_queue,
    get_subscription,
    get_topic,
    keep_alive,
    purge_queue,
    set_paused,
)
from messaging.broker.housekeeping import MaintenanceReport, run_maintenance
from messaging.broker.operator import (
    delete_messages,
    move_messages,
    parse_cursors,
    retry_dead_letters,
    set_priority,
)
from messaging.broker.publishing import PublishRequest, check_publish, publish, publish_many
from messaging.broker.transactions import begin, commit, get_transaction, list_transactions, prepare, rollback
from messaging.exceptions import StaleReceipt

__all__ = [
    "ACK_OK",
    "ACK_STALE",
    "ANY_QUEUE",
    "DURABLE",
    "MAX_DELAY_SECONDS",
    "STORES",
    "TRANSIENT",
    "MaintenanceReport",
    "OutgoingMessage",
    "PublishRequest",
    "PublishResult",
    "QueueSettings",
    "ReceivedMessage",
    "StaleReceipt",
    "Store",
    "ack",
    "ack_and_receive",
    "begin",
    "check_publish",
    "commit",
    "create_queue",
    "create_subscription",
    "create_topic",
    "delete_messages",
    "delete_owned_subscriptions",
    "delete_queue",
    "delete_topic",
    "extend",
    "get_queue",
    "get_subscription",
    "get_topic",
    "get_transaction",
    "keep_alive",
    "list_transactions",
    "move_messages",
    "nack",
    "parse_cursors",
    "prepare",
    "publish",
    "publish_many",
    "purge_queue",
    "receive",
    "redrive",
    "refresh_consumers",
    "register_consumer",
    "require_some_ok",
    "retry_dead_letters",
    "rollback",
    "run_maintenance",
    "set_paused",
    "set_priority",
    "store_for",
    "unregister_consumers",
    "validate_message",
    "validate_name",
]
