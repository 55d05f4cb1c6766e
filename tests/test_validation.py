"""Caller mistakes are refused before any connection is made (issue 11, item 1).

The README promises that a :class:`UsageError` means nothing was sent: each
case here must fail without a single ``connectTCP`` on the fake reactor, and
without a connection reaching a real listener on loopback.
"""

from __future__ import annotations

import io
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred

from txcolombe.client.api import sendmail, submit
from txcolombe.client.pool import Pool
from txcolombe.client.session import check_message, connect
from txcolombe.codec.errors import (
    InvalidAddress,
    InvalidArgument,
    InvalidCredentials,
    UsageError,
)
from txcolombe.codec.sasl import Authentication
from txcolombe.testing import MemorySMTP

MESSAGE = b"Subject: hi\r\n\r\nHello\r\n"
GOOD: dict[str, Any] = {
    "sender": "alice@example.com",
    "recipients": ["bob@example.org"],
    "body": MESSAGE,
}

# (name, changes to the good arguments, expected error, message fragment)
MESSAGE_MISTAKES: list[tuple[str, dict[str, Any], type[UsageError], str]] = [
    ("CR in sender", {"sender": "alice@example.com\r\nRCPT TO:<x@y>"}, InvalidAddress, "CR"),
    ("LF in recipient", {"recipients": ["bob@example.org\nDATA"]}, InvalidAddress, "CR"),
    ("NUL in recipient", {"recipients": ["bob\x00@example.org"]}, InvalidAddress, "NUL"),
    ("sender without @", {"sender": "alice"}, InvalidAddress, "alice"),
    ("no recipient", {"recipients": []}, UsageError, "at least one recipient"),
    ("str body", {"body": "Subject: hi\r\n\r\nHello\r\n"}, InvalidArgument, "not str"),
    ("text-mode file body", {"body": io.StringIO("x")}, InvalidArgument, "text mode"),
    ("int body", {"body": 42}, InvalidArgument, "unsupported body type int"),
    ("int sender", {"sender": 42}, InvalidArgument, "sender must be"),
    ("int recipient", {"recipients": [42]}, InvalidArgument, "recipient must be"),
    ("recipients not iterable", {"recipients": 42}, InvalidArgument, "iterable"),
]

CONNECT_MISTAKES: list[tuple[str, dict[str, Any], type[UsageError], str]] = [
    ("str port", {"port": "2525"}, InvalidArgument, "port must be an int"),
    ("port out of range", {"port": 70000}, InvalidArgument, "invalid port"),
    (
        "missing trust root file",
        {"trust_root": "/nonexistent/ca.pem"},
        InvalidArgument,
        "cannot read",
    ),
    ("trust root of wrong type", {"trust_root": 42}, InvalidArgument, "trust_root must be"),
    ("tls of wrong type", {"tls": "yes"}, InvalidArgument, "tls must provide"),
    (
        "authentication of wrong type",
        {"authentication": ("alice", "pw")},
        InvalidArgument,
        "Authentication",
    ),
    ("bad EHLO name", {"domain": "bad name"}, InvalidAddress, "domain"),
]


def _failure(d: Deferred[Any]) -> BaseException:
    failures: list[BaseException] = []
    d.addErrback(lambda f: failures.append(f.value))
    assert failures, "the Deferred did not fail at once"
    return failures[0]


SENDERS: dict[str, Callable[..., Deferred[Any]]] = {
    "sendmail": lambda fake, **kw: sendmail("mx.example.org", reactor=fake.reactor, **kw),
    "submit": lambda fake, **kw: submit("mx.example.org", reactor=fake.reactor, **kw),
    "pool": lambda fake, **kw: Pool(reactor=fake.reactor).send(
        "mx.example.org", reactor=fake.reactor, **kw
    ),
}


@pytest.mark.parametrize("how", sorted(SENDERS))
@pytest.mark.parametrize(("name", "change", "error", "fragment"), MESSAGE_MISTAKES)
def test_message_mistakes_connect_nothing(
    how: str, name: str, change: dict[str, Any], error: type[UsageError], fragment: str
) -> None:
    fake = MemorySMTP()
    arguments = {**GOOD, **change}
    d = SENDERS[how](
        fake, sender=arguments["sender"], recipients=arguments["recipients"], body=arguments["body"]
    )
    failure = _failure(d)
    assert isinstance(failure, error), name
    assert fragment in str(failure)
    fake.flush()
    assert fake.reactor.tcpClients == []
    assert fake.connections == []


@pytest.mark.parametrize(("name", "change", "error", "fragment"), CONNECT_MISTAKES)
def test_connection_mistakes_connect_nothing(
    name: str, change: dict[str, Any], error: type[UsageError], fragment: str
) -> None:
    fake = MemorySMTP()
    for d in (
        sendmail("mx.example.org", **GOOD, reactor=fake.reactor, **change),
        connect("mx.example.org", reactor=fake.reactor, **change),
    ):
        failure = _failure(d)
        assert isinstance(failure, error), name
        assert fragment in str(failure)
    fake.flush()
    assert fake.reactor.tcpClients == []


def test_wrong_types_are_still_type_errors() -> None:
    """Callers that caught TypeError keep working."""
    fake = MemorySMTP()
    failure = _failure(sendmail("mx.example.org", **GOOD, port="2525", reactor=fake.reactor))  # type: ignore[arg-type]
    assert isinstance(failure, TypeError)
    assert isinstance(failure, UsageError)


def test_authentication_without_secret_is_a_credentials_error() -> None:
    with pytest.raises(InvalidCredentials, match="a password or a token") as caught:
        Authentication("alice")
    assert not isinstance(caught.value, InvalidAddress)
    with pytest.raises(InvalidCredentials, match="username must be a str"):
        Authentication(42, "pw")  # type: ignore[arg-type]


def test_trust_root_may_be_a_pem_file_path(tmp_path: Path) -> None:
    fake = MemorySMTP()
    pem = tmp_path / "ca.pem"
    pem.write_bytes(fake.trust_root.dumpPEM())
    d = sendmail("mx.example.org", **GOOD, trust_root=str(pem), reactor=fake.reactor)
    fake.flush()
    receipts: list[Any] = []
    d.addBoth(receipts.append)
    [receipt] = receipts
    assert receipt.tls is not None  # verified against the CA read from the file
    assert len(fake.server.transactions) == 1
    assert _failure(
        sendmail("mx.example.org", **GOOD, trust_root=str(tmp_path), reactor=fake.reactor)
    )


def test_pem_file_without_certificate_is_refused(tmp_path: Path) -> None:
    fake = MemorySMTP()
    pem = tmp_path / "empty.pem"
    pem.write_bytes(b"not a certificate\n")
    failure = _failure(sendmail("mx.example.org", **GOOD, trust_root=pem, reactor=fake.reactor))
    assert isinstance(failure, InvalidArgument)
    assert "no PEM certificate" in str(failure)
    assert fake.reactor.tcpClients == []


def test_check_message_returns_the_recipients_of_an_iterator() -> None:
    recipients = check_message("a@example.com", iter(["b@example.org", "c@example.org"]), b"x")
    assert recipients == ("b@example.org", "c@example.org")


def test_a_real_listener_sees_no_connection() -> None:
    """Against a real loopback listener: a caller's mistake never connects."""
    from twisted.internet import reactor

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        for change in ({"sender": "alice"}, {"body": "text"}, {"recipients": []}):
            arguments = {**GOOD, **change}
            d = sendmail("127.0.0.1", port=port, reactor=reactor, **arguments)
            assert isinstance(_failure(d), UsageError)
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


@pytest.mark.parametrize(
    ("body", "options"),
    [
        ("a str body", {}),
        (io.StringIO("text mode"), {}),
        (42, {}),
        (b"Subject: s\r\n\r\nx\r\n", {"body_type": "8BIT"}),
    ],
)
def test_deliver_refuses_a_bad_body_before_any_lookup(body: object, options: Any) -> None:
    """deliver() checks the body's kind before it resolves or connects."""
    from txcolombe.delivery.deliver import deliver

    fake = MemorySMTP()
    looked_up: list[str] = []

    class Resolver:
        def __getattr__(self, name: str) -> Any:
            looked_up.append(name)
            raise AssertionError(f"resolver.{name} used")

    d = deliver(
        "a@example.com", ["b@example.org"], body, reactor=fake.reactor, resolver=Resolver(),
        **options,
    )  # fmt: skip
    failure = _failure(d)
    assert isinstance(failure, UsageError)
    fake.flush()
    assert looked_up == [] and fake.reactor.tcpClients == [] and fake.connections == []
