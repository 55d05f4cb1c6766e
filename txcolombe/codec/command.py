"""SMTP commands as a server reads them (RFC 5321 §4.1): parsing only, no I/O.

:func:`parse_command` turns one command line (without its CRLF) into a
:class:`Command`; :func:`parse_mail` and :func:`parse_rcpt` read the
arguments of MAIL and RCPT into a path and its ESMTP parameters, with the
paths parsed by :mod:`txcolombe.codec.address`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from txcolombe.codec.address import Mailbox, parse_recipient, parse_sender
from txcolombe.codec.errors import InvalidAddress

_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+))?")


class CommandSyntaxError(ValueError):
    """A command line that does not follow the grammar; ``reply`` says why."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


@dataclass(frozen=True, slots=True)
class Command:
    """A command: its verb in upper case and the rest of the line."""

    verb: str
    argument: str = ""


@dataclass(frozen=True, slots=True)
class PathArgument:
    """The argument of MAIL or RCPT: the path (None for ``<>``) and parameters.

    :ivar params: keyword (upper case) to value (None for a bare keyword).
    :ivar text: the path as written, without its angle brackets.
    :ivar words: the parameters as written, in order.
    """

    mailbox: Mailbox | None
    params: dict[str, str | None] = field(default_factory=dict)
    text: str = ""
    words: tuple[str, ...] = ()


def parse_command(line: bytes) -> Command:
    """Split a command line into verb and argument.

    :raises CommandSyntaxError: not UTF-8, or no verb.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandSyntaxError(500, "5.5.2 Command line is not UTF-8") from None
    verb, _, argument = text.strip(" ").partition(" ")
    if not verb or not verb.isascii() or not verb.isalpha():
        raise CommandSyntaxError(500, "5.5.2 Syntax error, command unrecognized")
    return Command(verb.upper(), argument.strip(" "))


def _split_path(argument: str, keyword: str) -> tuple[str, str]:
    head = argument[: len(keyword)]
    if head.upper() != keyword:
        raise CommandSyntaxError(501, f"5.5.4 Syntax: {keyword}<address>")
    rest = argument[len(keyword) :].lstrip(" ")
    if not rest.startswith("<"):
        raise CommandSyntaxError(501, f"5.5.4 Syntax: {keyword}<address>")
    end = rest.find(">")
    if end < 0:
        raise CommandSyntaxError(501, f"5.5.4 Syntax: {keyword}<address>")
    return rest[: end + 1], rest[end + 1 :]


def _params(words: list[str], strict: bool) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for word in words:
        match = _PARAM.fullmatch(word)
        if match is not None:
            params[match.group(1).upper()] = match.group(2)
        elif strict:
            raise CommandSyntaxError(501, f"5.5.4 Invalid parameter {word[:40]!r}")
    return params


def _strip_source_route(path: str) -> str:
    # RFC 5321 §4.1.2: a source route "<@a,@b:user@c>" must be accepted and ignored.
    inner = path[1:-1]
    if inner.startswith("@") and ":" in inner:
        inner = inner.split(":", 1)[1]
    return f"<{inner}>"


def parse_mail(argument: str, *, strict: bool = True) -> PathArgument:
    """The argument of MAIL: ``FROM:<path> [params]``.

    :param strict: refuse a malformed parameter (else it is kept in ``words`` only).
    :raises CommandSyntaxError: bad syntax (501) or a bad address (553).
    """
    path, rest = _split_path(argument, "FROM:")
    try:
        sender = parse_sender(_strip_source_route(path))
    except InvalidAddress:
        raise CommandSyntaxError(553, "5.1.7 Invalid sender address") from None
    words = rest.split()
    return PathArgument(sender, _params(words, strict), path[1:-1], tuple(words))


def parse_rcpt(argument: str, *, strict: bool = True) -> PathArgument:
    """The argument of RCPT: ``TO:<path> [params]``.

    :param strict: refuse a malformed parameter (else it is kept in ``words`` only).
    :raises CommandSyntaxError: bad syntax (501) or a bad address (553).
    """
    path, rest = _split_path(argument, "TO:")
    try:
        recipient = parse_recipient(_strip_source_route(path))
    except InvalidAddress:
        raise CommandSyntaxError(553, "5.1.3 Invalid recipient address") from None
    words = rest.split()
    return PathArgument(recipient, _params(words, strict), path[1:-1], tuple(words))
