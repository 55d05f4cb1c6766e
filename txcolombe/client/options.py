"""The client's configuration types: what a caller may set, apart from the code that uses it.

:class:`ConnectOptions` says how to reach and talk to a server,
:class:`MessageOptions` what one message asks for. Both are frozen and
compare by value, so that two equal :class:`ConnectOptions` name one kind of
session: :class:`~txcolombe.client.pool.Pool` keys its sessions by them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint

from txcolombe.client.connect import IOpenSSLTrustRoot
from txcolombe.client.machine import TLSMode
from txcolombe.codec.dsn import DSN
from txcolombe.codec.errors import InvalidArgument, UsageError
from txcolombe.codec.sasl import Authentication
from txcolombe.codec.step import Step

#: A trust root, or the path of a PEM file of CA certificates.
TrustRoot = IOpenSSLTrustRoot | str | os.PathLike[str]


def default_reactor() -> Any:
    """The global reactor, for a caller that gave none (imported late: installing
    another reactor must stay possible until the first connection)."""
    from twisted.internet import reactor

    return reactor


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait at each step; RFC 5321 §4.5.3.2's values by default."""

    connect: float = 30.0
    greeting: float = 300.0
    command: float = 300.0
    """EHLO, STARTTLS, AUTH, RSET."""
    mail: float = 300.0
    rcpt: float = 300.0
    data_start: float = 120.0
    data_block: float = 180.0
    """Between two writes of the body; restarts while the body flows."""
    data_end: float = 600.0
    quit: float = 10.0
    """After QUIT (or a fatal error): how long to wait for a polite close."""

    def for_step(self, step: Step) -> float:
        """The timeout for waiting at ``step``."""
        return getattr(self, _TIMEOUT_FIELDS.get(step, "command"))  # type: ignore[no-any-return]


_TIMEOUT_FIELDS = {
    Step.GREETING: "greeting",
    Step.MAIL: "mail",
    Step.RCPT: "rcpt",
    Step.DATA: "data_start",
    Step.BODY: "data_block",
    Step.DATA_END: "data_end",
    Step.QUIT: "quit",
}


DEFAULT_TIMEOUTS = Timeouts()


@dataclass(frozen=True)
class ConnectOptions:
    """How to reach a server and set a session up (the keywords of
    :func:`~txcolombe.client.session.connect`).

    Objects without a value of their own (TLS options, trust roots,
    endpoints) compare by identity: give the same object to share sessions.
    """

    port: int = 25
    tls_mode: TLSMode = TLSMode.OPPORTUNISTIC
    domain: str | None = None
    """The EHLO name; None: this host's FQDN, else our address literal."""
    tls: IOpenSSLClientConnectionCreator | None = None
    trust_root: TrustRoot | None = None
    authentication: Authentication | None = None
    timeouts: Timeouts = DEFAULT_TIMEOUTS
    endpoint: IStreamClientEndpoint | None = None
    trace: bool = True
    """Log the conversation at debug level (credentials masked)."""
    max_recipients: int | None = 100
    """Recipients per transaction at most (RFC 5321 §4.5.3.1.8's minimum);
    more go in further transactions on the same connection. LIMITS RCPTMAX
    and a "too many recipients" reply lower it. None: no limit of ours."""

    def __hash__(self) -> int:
        # By value, like the generated one, except that a value that cannot
        # be hashed (a twisted Certificate as trust root compares by value but
        # has no hash) counts by its type alone: equal options still hash alike.
        return hash(tuple(_hashable(getattr(self, f.name)) for f in fields(self)))

    def check(self) -> None:
        """Refuse wrong types, before anything is connected (or hashed).

        :raises InvalidArgument: the first wrong value found.
        """
        port = self.port
        if isinstance(port, bool) or not isinstance(port, int):
            raise InvalidArgument(f"the port must be an int, not {type(port).__name__}")
        if not 0 < port < 65536:
            raise InvalidArgument(f"invalid port {port}: not between 1 and 65535")
        if not isinstance(self.tls_mode, TLSMode):
            raise InvalidArgument(f"tls_mode must be a TLSMode, not {_kind(self.tls_mode)}")
        if self.domain is not None and not isinstance(self.domain, str):
            raise InvalidArgument(f"the domain must be a str or None, not {_kind(self.domain)}")
        if self.tls is not None and not IOpenSSLClientConnectionCreator.providedBy(self.tls):
            raise InvalidArgument(
                "tls must provide IOpenSSLClientConnectionCreator (optionsForClientTLS),"
                f" not {_kind(self.tls)}"
            )
        limit = self.max_recipients
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise InvalidArgument(f"max_recipients must be an int or None, not {_kind(limit)}")
        if limit is not None and limit < 1:
            raise InvalidArgument(f"max_recipients must be at least 1, not {limit}")
        if self.authentication is not None and not isinstance(self.authentication, Authentication):
            raise InvalidArgument(
                f"authentication must be an Authentication, not {_kind(self.authentication)}"
            )
        if not isinstance(self.timeouts, Timeouts):
            raise InvalidArgument(f"timeouts must be a Timeouts, not {_kind(self.timeouts)}")


@dataclass(frozen=True)
class MessageOptions:
    """What one message asks of the server (the keywords of
    :meth:`~txcolombe.client.session.Session.send`).

    :ivar all_or_nothing: send no DATA unless every recipient is accepted.
    :ivar dsn: delivery status notification options (RFC 3461).
    :ivar requiretls: ask for REQUIRETLS (RFC 8689).
    :ivar chunking: BDAT (RFC 3030): None uses it when offered with
        PIPELINING, True requires it, False never uses it.
    :ivar binary: send the body untouched with BODY=BINARYMIME.
    :ivar body_type: the BODY the message came with, for a relay to pass on:
        None (the default) or "8BITMIME" say BODY=8BITMIME when the server
        offers it; "7BIT" sends no BODY parameter.
    :ivar smtputf8: the message came with SMTPUTF8: say it when the server
        offers it (a non-ASCII address always needs it).
    :ivar utf8_headers: the header has UTF-8 (RFC 6532): a server without
        SMTPUTF8 gets nothing (:class:`~txcolombe.codec.errors.UTF8Unsupported`).
    :raises UsageError: ``body_type`` is none of those.
    """

    all_or_nothing: bool = False
    dsn: DSN | None = None
    requiretls: bool = False
    chunking: bool | None = None
    binary: bool = False
    body_type: str | None = None
    smtputf8: bool = False
    utf8_headers: bool = False

    def __post_init__(self) -> None:
        if self.body_type not in (None, "7BIT", "8BITMIME"):
            raise UsageError(f"body_type is None, '7BIT' or '8BITMIME', not {self.body_type!r}")


_Options = TypeVar("_Options", ConnectOptions, MessageOptions)


def either(keywords: _Options, given: object) -> _Options:
    """The options object a caller passed (``options=``), else the one built
    from its keywords.

    :raises InvalidArgument: ``given`` is of the wrong type, or both an
        object and keywords that differ from the defaults were given.
    """
    if given is None:
        return keywords
    kind = type(keywords)
    if not isinstance(given, kind):
        raise InvalidArgument(f"options must be a {kind.__name__}, not {_kind(given)}")
    if keywords != kind():
        raise InvalidArgument("give the options as keywords or as options=, not both")
    return given


def _hashable(value: object) -> int:
    try:
        return hash(value)
    except TypeError:
        return hash(type(value))


def _kind(value: object) -> str:
    return type(value).__name__
