"""A message's envelope, and what it needs from the server it goes to.

:class:`Envelope` is what a send gives the machine; :func:`use_bdat` and
:func:`mail_parameters` check it against the server's extensions before
anything of it is sent, and write its MAIL parameters. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from txcolombe.codec.address import Mailbox
from txcolombe.codec.dsn import DSN, RecipientOptions
from txcolombe.codec.errors import (
    ExtensionUnavailable,
    MessageTooLarge,
    Step,
    UTF8Unsupported,
)
from txcolombe.codec.extensions import Extensions


@dataclass(frozen=True)
class Envelope:
    """One message's envelope and the extensions it asks for.

    :ivar size: the body size when known (declared with SIZE).
    :ivar rcpt_options: DSN options of each recipient, in order (or empty).
    :ivar dsn: per-message DSN options (RET, ENVID).
    :ivar requiretls: ask for REQUIRETLS (RFC 8689).
    :ivar chunking: BDAT (RFC 3030): None to use it when CHUNKING and
        PIPELINING are offered, True to require it, False never.
    :ivar binary: send the body as it is with BODY=BINARYMIME (needs
        CHUNKING and BINARYMIME).
    :ivar reset_first: send RSET before MAIL (pipelined when possible): on
        a connection that sat idle, it proves the server is still there
        before anything of the message is at stake.
    :ivar body_type: the BODY the message was declared with (a relay passes
        it on): None says BODY=8BITMIME whenever the server offers it (the
        default); "8BITMIME" likewise; "7BIT" sends no BODY parameter.
    :ivar smtputf8: the message came with SMTPUTF8: say it whenever the
        server offers it (a non-ASCII address always needs it).
    :ivar utf8_headers: the header has UTF-8 (RFC 6532): like a non-ASCII
        address, the message cannot go to a server without SMTPUTF8.
    :ivar all_or_nothing: deliver only if every recipient is accepted; such
        a send is never split over several transactions.
    """

    sender: Mailbox | None
    recipients: tuple[Mailbox, ...]
    size: int | None = None
    all_or_nothing: bool = False
    rcpt_options: tuple[RecipientOptions, ...] = ()
    dsn: DSN | None = None
    requiretls: bool = False
    chunking: bool | None = None
    binary: bool = False
    reset_first: bool = False
    body_type: str | None = None
    smtputf8: bool = False
    utf8_headers: bool = False


def use_bdat(envelope: Envelope, extensions: Extensions) -> bool:
    """Whether the body goes with BDAT (RFC 3030) rather than DATA.

    :raises ExtensionUnavailable: the envelope asks for CHUNKING or
        BINARYMIME and the server cannot give it.
    """
    pipelining = "PIPELINING" in extensions
    offered = "CHUNKING" in extensions
    if envelope.binary or envelope.chunking:
        if not offered:
            raise ExtensionUnavailable("CHUNKING")
        if not pipelining:
            raise ExtensionUnavailable(
                "PIPELINING", "txcolombe sends BDAT only to servers that offer PIPELINING"
            )
        if envelope.binary and "BINARYMIME" not in extensions:
            raise ExtensionUnavailable("BINARYMIME")
        return True
    return envelope.chunking is None and offered and pipelining


def mail_parameters(envelope: Envelope, extensions: Extensions, tls_active: bool) -> str:
    """The ESMTP parameters of the envelope's MAIL command, e.g. ``" SIZE=1234"``.

    :raises UsageError: the envelope cannot go to this server (SMTPUTF8,
        SIZE, DSN, REQUIRETLS); nothing of it is to be sent then.
    """
    params = ""
    mailboxes = [*envelope.recipients]
    if envelope.sender is not None:
        mailboxes.append(envelope.sender)
    address = any(m.needs_smtputf8 for m in mailboxes)
    if "SMTPUTF8" in extensions:
        if address or envelope.smtputf8 or envelope.utf8_headers:
            params += " SMTPUTF8"
    elif address or envelope.utf8_headers:
        what = "a non-ASCII address" if address else "a UTF-8 header (RFC 6532)"
        raise UTF8Unsupported(
            f"{what} needs SMTPUTF8, which the server does not offer", step=Step.MAIL
        )
    if envelope.binary:
        params += " BODY=BINARYMIME"
    elif "8BITMIME" in extensions and envelope.body_type != "7BIT":
        params += " BODY=8BITMIME"
    if envelope.size is not None and "SIZE" in extensions:
        limit = extensions.size
        if limit is not None and envelope.size > limit:
            raise MessageTooLarge(
                f"the message ({envelope.size} octets) is over the server's"
                f" limit of {limit} octets",
                step=Step.MAIL,
            )
        params += f" SIZE={envelope.size}"
    wants_dsn = envelope.dsn is not None or any(
        o.notify or o.orcpt is not None for o in envelope.rcpt_options
    )
    if wants_dsn:
        if "DSN" not in extensions:
            raise ExtensionUnavailable("DSN")
        if envelope.dsn is not None:
            params += envelope.dsn.mail_parameters()
    if envelope.requiretls:
        if "REQUIRETLS" not in extensions or not tls_active:
            raise ExtensionUnavailable(
                "REQUIRETLS", "REQUIRETLS needs TLS and a server that offers it"
            )
        params += " REQUIRETLS"
    return params
