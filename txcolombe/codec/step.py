"""The steps of an SMTP conversation, named once for errors, timeouts and logs."""

from __future__ import annotations

import enum


class Step(enum.Enum):
    """The point of the SMTP conversation where something happened."""

    CONNECT = "connect"
    GREETING = "greeting"
    EHLO = "EHLO"
    HELO = "HELO"
    STARTTLS = "STARTTLS"
    TLS = "TLS handshake"
    AUTH = "AUTH"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    BODY = "message body"
    DATA_END = "end of data"
    RSET = "RSET"
    QUIT = "QUIT"

    # Members are singletons, equal only to themselves: hashed by identity, in
    # C, instead of by Enum's own __hash__, Python code run at each lookup.
    __hash__ = object.__hash__
