"""The client session's states, and every move between them, as a table.

:data:`TRANSITIONS` is the whole of it: the machine changes state only
through it (``ClientMachine._go``), so reading this module tells every
state the session can be in and how it gets there.
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    """Where the session is; with pipelining, where its newest transaction is."""

    GREETING = "greeting"
    SETUP = "setup"
    TLS_WAIT = "waiting for TLS"
    READY = "ready"
    TRANSACTION = "transaction"
    BODY = "body"
    DATA_END = "end of data"
    RESETTING = "resetting"
    QUITTING = "quitting"
    CLOSED = "closed"

    # Members are singletons, equal only to themselves: hashed by identity, in
    # C, instead of by Enum's own __hash__, Python code run at each lookup.
    __hash__ = object.__hash__


class Input(enum.Enum):
    """What moves the session from one :class:`State` to another."""

    GREETED = "220 greeting, EHLO sent"
    TLS_ACCEPTED = "220 to STARTTLS"
    TLS_STARTED = "TLS started"
    SET_UP = "session set up"
    MAIL = "MAIL sent"
    BODY = "body wanted"
    END_OF_DATA = "end of data sent"
    RSET = "RSET sent to end a transaction"
    IDLE = "no transaction left"
    QUIT = "QUIT sent"
    CLOSE = "connection over"

    # Members are singletons, equal only to themselves: hashed by identity, in
    # C, instead of by Enum's own __hash__, Python code run at each lookup.
    __hash__ = object.__hash__


_S, _I = State, Input

#: Every move the session makes: (state, input) → next state. Nothing else
#: assigns :attr:`ClientMachine.state`; a pair not listed is a bug.
TRANSITIONS: dict[tuple[State, Input], State] = {
    (_S.GREETING, _I.GREETED): _S.SETUP,
    (_S.SETUP, _I.TLS_ACCEPTED): _S.TLS_WAIT,
    (_S.TLS_WAIT, _I.TLS_STARTED): _S.SETUP,
    (_S.SETUP, _I.SET_UP): _S.READY,
    (_S.READY, _I.MAIL): _S.TRANSACTION,
    # With PIPELINING the next MAIL leaves with the final dot or the RSET (RFC 2920 §3.1).
    (_S.DATA_END, _I.MAIL): _S.TRANSACTION,
    (_S.RESETTING, _I.MAIL): _S.TRANSACTION,
    (_S.TRANSACTION, _I.BODY): _S.BODY,
    (_S.BODY, _I.END_OF_DATA): _S.DATA_END,
    (_S.TRANSACTION, _I.RSET): _S.RESETTING,
    (_S.BODY, _I.RSET): _S.RESETTING,  # a BDAT chunk refused mid-body
    (_S.DATA_END, _I.RSET): _S.RESETTING,
    (_S.DATA_END, _I.IDLE): _S.READY,
    (_S.RESETTING, _I.IDLE): _S.READY,
    # QUIT cannot be sent mid-body nor before the TLS handshake: those close.
    **{
        (state, _I.QUIT): _S.QUITTING
        for state in (_S.GREETING, _S.SETUP, _S.READY, _S.TRANSACTION, _S.DATA_END, _S.RESETTING)
    },
    **{(state, _I.CLOSE): _S.CLOSED for state in State if state is not _S.CLOSED},
}
