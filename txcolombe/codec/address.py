"""Mailboxes, domains and paths as RFC 5321 §4.1.2 defines them.

Everything a caller gives as an address is parsed here, before any byte is
sent: CR, LF, NUL or anything outside the grammar is an
:class:`~txcolombe.codec.errors.InvalidAddress`. Non-ASCII domains become A-labels
(IDNA 2008) so they need no SMTPUTF8, and are kept as given too, for a
transaction that uses SMTPUTF8 (RFC 6531: the envelope as received); a
non-ASCII local part marks the mailbox as needing SMTPUTF8.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata
from dataclasses import dataclass, field

import idna

from txcolombe.codec.errors import InvalidAddress

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"')
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_FORBIDDEN = re.compile(r"[\r\n\x00]")

MAX_DOMAIN = 255
MAX_PATH = 256


#: Unicode categories refused in a local part: controls, lone surrogates
#: (no UTF-8 form) and separators (which text tools strip or break lines at,
#: so the address would not survive being written out and parsed again).
_REFUSED_CATEGORIES = frozenset({"Cc", "Cs", "Zs", "Zl", "Zp"})


def _check_controls(value: str, what: str) -> None:
    if _FORBIDDEN.search(value):
        raise InvalidAddress(f"{what} {value!r} contains CR, LF or NUL")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidAddress(f"{what} {value!r} is not encodable as UTF-8") from None


def _check_local(local: str, value: str) -> None:
    """Refuse a local part that could not be kept as given (see above)."""
    if local.isascii():
        return
    for char in local:
        if not char.isascii() and unicodedata.category(char) in _REFUSED_CATEGORIES:
            raise InvalidAddress(f"address {value!r} has the character {char!r} in its local part")


@functools.lru_cache(maxsize=4096)
def parse_domain(value: str) -> str:
    """Return ``value`` as a wire-ready domain: A-labels, or an address literal.

    Accepts ``example.org``, ``bücher.example``, ``[192.0.2.1]`` and
    ``[IPv6:2001:db8::1]``; a trailing dot is dropped.
    """
    _check_controls(value, "domain")
    if value.startswith("["):
        return _address_literal(value)
    name = value[:-1] if value.endswith(".") else value
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise InvalidAddress(f"invalid internationalised domain {value!r}: {exc}") from None
    labels = name.split(".")
    if len(name) > MAX_DOMAIN or not all(_LABEL.fullmatch(label) for label in labels):
        raise InvalidAddress(f"invalid domain {value!r}")
    return name


def _address_literal(value: str) -> str:
    if not value.endswith("]"):
        raise InvalidAddress(f"invalid address literal {value!r}")
    inner = value[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return f"[IPv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
        return f"[{ipaddress.IPv4Address(inner)}]"
    except ValueError:
        raise InvalidAddress(f"invalid address literal {value!r}") from None


def address_literal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The address literal for an IP address, as used in EHLO."""
    if ip.version == 6:
        return f"[IPv6:{ip.compressed}]"
    return f"[{ip}]"


@dataclass(frozen=True, slots=True)
class Mailbox:
    """A mailbox ``local@domain`` (or the special recipient ``Postmaster``).

    :ivar local: the local part as it goes on the wire (quoted if it must be).
    :ivar domain: the domain in A-label or address-literal form, or None for
        ``Postmaster``: what routing uses, and ``str()`` gives.
    :ivar utf8_domain: the domain as it was given, when it was given in
        U-labels (``bücher.example``): an SMTPUTF8 transaction sends it so
        (RFC 6531 keeps the envelope as received), any other the A-labels.
        Two mailboxes that differ only in it are equal.
    """

    local: str
    domain: str | None
    utf8_domain: str | None = field(default=None, compare=False)

    @classmethod
    @functools.lru_cache(maxsize=4096)
    def parse(cls, value: str) -> Mailbox:
        """Parse ``local@domain``, ``<local@domain>`` or ``Postmaster``.

        :raises InvalidAddress: anything else.
        """
        _check_controls(value, "address")
        # Only ASCII blanks are trimmed: str.strip() would also take Unicode
        # separators off a local part, so parsing a mailbox's own wire form
        # could give another mailbox.
        text = value.strip(" \t")
        if text.startswith("<") and text.endswith(">"):
            text = text[1:-1]
        if text.lower() == "postmaster":
            return cls("Postmaster", None)
        at = text.rfind("@")
        if at <= 0:
            raise InvalidAddress(f"address {value!r} has no local part and domain")
        local, domain = text[:at], text[at + 1 :]
        if not (_DOT_STRING.fullmatch(local) or _QUOTED.fullmatch(local)):
            raise InvalidAddress(f"invalid local part in address {value!r}")
        _check_local(local, value)
        utf8: str | None
        try:
            wire = parse_domain(domain)
        except InvalidAddress:
            if domain.isascii():
                raise
            wire, utf8 = _beyond_idna2008(domain, value)
        else:
            utf8 = _u_labels(domain) if not domain.isascii() and not wire.startswith("[") else None
        mailbox = cls(local, wire, utf8)
        if len(str(mailbox).encode("utf-8")) + 2 > MAX_PATH:
            raise InvalidAddress(f"address {value!r} is longer than {MAX_PATH} octets")
        return mailbox

    @property
    def needs_smtputf8(self) -> bool:
        """True when the local part is not ASCII (RFC 6531)."""
        return not self.local.isascii()

    def __str__(self) -> str:
        return self.local if self.domain is None else f"{self.local}@{self.domain}"

    def utf8(self) -> str:
        """The mailbox with its domain as given: what an SMTPUTF8 transaction sends."""
        if self.utf8_domain is None:
            return str(self)
        return f"{self.local}@{self.utf8_domain}"


def _beyond_idna2008(domain: str, value: str) -> tuple[str, str]:
    """A non-ASCII domain IDNA 2008 refuses but an SMTPUTF8 envelope may carry
    (RFC 6531 keeps it as received; ``☃.example``): its IDNA 2003 A-labels for
    routing and for a next hop without SMTPUTF8, and the domain as given.
    Refused unless the A-labels give the very domain back (IDNA 2003 maps some
    characters away: that would be another domain)."""
    name = unicodedata.normalize("NFC", domain[:-1] if domain.endswith(".") else domain).lower()
    try:
        ace = name.encode("idna").decode("ascii")
        back = ace.encode("ascii").decode("idna")
    except (UnicodeError, ValueError):
        raise InvalidAddress(f"invalid internationalised domain in {value!r}") from None
    if back != name:
        raise InvalidAddress(f"invalid internationalised domain in {value!r}")
    return parse_domain(ace), name


def _u_labels(domain: str) -> str:
    """A domain given in U-labels, as the wire keeps it: its A-labels decoded
    again (NFC, lower case, no trailing dot), so one domain has one form."""
    name = domain[:-1] if domain.endswith(".") else domain
    return str(idna.decode(parse_domain(name)))


def parse_sender(value: str | Mailbox | None) -> Mailbox | None:
    """A reverse-path: a mailbox, or None for the null path ``<>``."""
    if value is None or isinstance(value, Mailbox):
        return value
    if value.strip(" \t") in ("", "<>"):
        _check_controls(value, "address")
        return None
    mailbox = Mailbox.parse(value)
    if mailbox.domain is None:
        raise InvalidAddress("Postmaster without a domain is only valid as a recipient")
    return mailbox


def parse_recipient(value: str | Mailbox) -> Mailbox:
    """A forward-path: a mailbox or ``Postmaster``."""
    return value if isinstance(value, Mailbox) else Mailbox.parse(value)


def path(mailbox: Mailbox | None, *, utf8: bool = False) -> str:
    """The angle-bracketed path for MAIL FROM / RCPT TO; with ``utf8`` (an
    SMTPUTF8 transaction), the domain as it was given."""
    if mailbox is None:
        return "<>"
    return f"<{mailbox.utf8() if utf8 else mailbox}>"
