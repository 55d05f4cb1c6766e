"""Mailboxes, domains and paths: everything is checked before a byte is sent."""

from __future__ import annotations

import ipaddress

import pytest

from txcolombe.codec.address import (
    MAX_PATH,
    Mailbox,
    address_literal,
    parse_domain,
    parse_recipient,
    parse_sender,
    path,
)
from txcolombe.codec.errors import InvalidAddress, UsageError

# -- valid mailboxes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "local", "domain"),
    [
        ("alice@example.org", "alice", "example.org"),
        ("first.last@sub.example.org", "first.last", "sub.example.org"),
        ("a+tag@example.org", "a+tag", "example.org"),
        ("o'brien@example.org", "o'brien", "example.org"),
        ("!#$%&'*+/=?^_`{|}~-@example.org", "!#$%&'*+/=?^_`{|}~-", "example.org"),
        ("x@a-b.example", "x", "a-b.example"),
        ("x@example.org.", "x", "example.org"),
        ("x@localhost", "x", "localhost"),
        ("x@123.example", "x", "123.example"),
        ('"john doe"@example.org', '"john doe"', "example.org"),
        ('"a@b"@example.org', '"a@b"', "example.org"),
        ('"quote\\"inside"@example.org', '"quote\\"inside"', "example.org"),
        ('""@example.org', '""', "example.org"),
        ("<alice@example.org>", "alice", "example.org"),
        ("  alice@example.org  ", "alice", "example.org"),
        (" <alice@example.org> ", "alice", "example.org"),
        ("u@[192.0.2.1]", "u", "[192.0.2.1]"),
        ("u@[IPv6:2001:db8::1]", "u", "[IPv6:2001:db8::1]"),
        ("u@[ipv6:2001:DB8:0:0:0:0:0:1]", "u", "[IPv6:2001:db8::1]"),
        ("u@bücher.example", "u", "xn--bcher-kva.example"),
        ("u@BÜCHER.example", "u", "xn--bcher-kva.example"),
        ("u@xn--bcher-kva.example", "u", "xn--bcher-kva.example"),
        ("jöran@example.org", "jöran", "example.org"),
        ("用户@例子.广告", "用户", "xn--fsqu00a.xn--4rr70v"),
    ],
)
def test_valid(text: str, local: str, domain: str) -> None:
    mailbox = Mailbox.parse(text)
    assert mailbox.local == local
    assert mailbox.domain == domain
    assert str(mailbox) == f"{local}@{domain}"
    assert path(mailbox) == f"<{local}@{domain}>"


@pytest.mark.parametrize("text", ["Postmaster", "postmaster", "POSTMASTER", "<Postmaster>"])
def test_postmaster(text: str) -> None:
    mailbox = parse_recipient(text)
    assert mailbox == Mailbox("Postmaster", None)
    assert str(mailbox) == "Postmaster"
    assert path(mailbox) == "<Postmaster>"
    assert not mailbox.needs_smtputf8


def test_postmaster_with_domain_is_an_ordinary_mailbox() -> None:
    assert Mailbox.parse("postmaster@example.org") == Mailbox("postmaster", "example.org")


def test_postmaster_is_not_a_sender() -> None:
    with pytest.raises(InvalidAddress):
        parse_sender("Postmaster")


@pytest.mark.parametrize(
    ("text", "needs"),
    [
        ("alice@example.org", False),
        ("alice@bücher.example", False),
        ("jöran@example.org", True),
        ('"jö ran"@example.org', True),
        ("用户@example.org", True),
    ],
)
def test_needs_smtputf8(text: str, needs: bool) -> None:
    assert Mailbox.parse(text).needs_smtputf8 is needs


def test_idn_domain_is_ascii_on_the_wire() -> None:
    mailbox = Mailbox.parse("u@bücher.example")
    assert path(mailbox).isascii()


def test_local_part_keeps_its_case() -> None:
    assert Mailbox.parse("Alice.Smith@Example.ORG").local == "Alice.Smith"


# -- invalid mailboxes ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "alice",
        "alice.example.org",
        "@example.org",
        "alice@",
        "alice@@example.org",
        "Alice <alice@example.org>",
        '"Alice" <alice@example.org>',
        "alice@example.org (Alice)",
        "<alice@example.org",
        "alice@example.org>",
        "<<alice@example.org>>",
        "al ice@example.org",
        ".alice@example.org",
        "alice.@example.org",
        "al..ice@example.org",
        "al(ice@example.org",
        "al,ice@example.org",
        "al\\ice@example.org",
        '"unterminated@example.org',
        '"bad"quote"@example.org',
        '"tab\there"@example.org',
        "alice@-example.org",
        "alice@example-.org",
        "alice@exa_mple.org",
        "alice@.example.org",
        "alice@example..org",
        "alice@example.org..",
        "alice@exa mple.org",
        "alice@" + "a" * 64 + ".example",
        "alice@[192.0.2.1",
        "alice@[300.0.2.1]",
        "alice@[192.0.2]",
        "alice@[IPv6:2001:db8::g]",
        "alice@[IPv6:192.0.2.1]",
        "alice@[]",
        "alice@[example.org]",
        "alice@xn--.example",
    ],
)
def test_invalid(text: str) -> None:
    with pytest.raises(InvalidAddress):
        Mailbox.parse(text)


@pytest.mark.parametrize("bad", ["\r", "\n", "\r\n", "\x00"])
@pytest.mark.parametrize(
    "template",
    [
        "{}alice@example.org",
        "al{}ice@example.org",
        "alice{}@example.org",
        "alice@{}example.org",
        "alice@exam{}ple.org",
        "alice@example.org{}",
        '"al{}ice"@example.org',
        "<alice@example.org>{}",
        "Post{}master",
        "Postmaster{}",
    ],
)
def test_control_characters_anywhere(bad: str, template: str) -> None:
    text = template.format(bad)
    with pytest.raises(InvalidAddress, match="CR, LF or NUL"):
        Mailbox.parse(text)
    with pytest.raises(InvalidAddress):
        parse_sender(text)
    with pytest.raises(InvalidAddress):
        parse_recipient(text)


def test_smtp_command_injection_is_refused() -> None:
    with pytest.raises(InvalidAddress):
        parse_recipient("a@example.org>\r\nRCPT TO:<victim@example.org")


def test_invalid_address_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        Mailbox.parse("nope")
    with pytest.raises(ValueError):
        Mailbox.parse("nope")


def test_longest_path_is_accepted() -> None:
    domain = ".".join(["a" * 60] * 3) + ".example"  # 191 octets
    local = "b" * (MAX_PATH - 2 - 1 - len(domain))
    mailbox = Mailbox.parse(f"{local}@{domain}")
    assert len(path(mailbox)) == MAX_PATH


def test_path_too_long() -> None:
    domain = ".".join(["a" * 60] * 3) + ".example"
    local = "b" * (MAX_PATH - 2 - 1 - len(domain) + 1)
    with pytest.raises(InvalidAddress, match="longer than"):
        Mailbox.parse(f"{local}@{domain}")


def test_path_too_long_counts_utf8_octets() -> None:
    domain = ".".join(["a" * 60] * 3) + ".example"
    # Fits in characters, not in octets: each "é" is two octets.
    local = "é" * (MAX_PATH - 2 - 1 - len(domain))
    with pytest.raises(InvalidAddress):
        Mailbox.parse(f"{local}@{domain}")


# -- domains ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "wire"),
    [
        ("example.org", "example.org"),
        ("example.org.", "example.org"),
        ("a" * 63 + ".example", "a" * 63 + ".example"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("[192.0.2.1]", "[192.0.2.1]"),
        ("[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]"),
        ("[IPv6:2001:0db8:0000::0001]", "[IPv6:2001:db8::1]"),
    ],
)
def test_parse_domain(text: str, wire: str) -> None:
    assert parse_domain(text) == wire


@pytest.mark.parametrize(
    "text",
    [
        "",
        ".",
        "a" * 64 + ".example",
        ".".join(["a" * 63] * 4) + ".example",
        "exa mple.org",
        "example.org\r\n",
        "exa\x00mple.org",
        "[192.0.2.1",
        "[192.0.2.256]",
        "[IPv6:::zz]",
        "bad_label.example",
        "ex\u2028ample.org",
    ],
)
def test_invalid_domain(text: str) -> None:
    with pytest.raises(InvalidAddress):
        parse_domain(text)


def test_address_literal() -> None:
    assert address_literal(ipaddress.ip_address("192.0.2.7")) == "[192.0.2.7]"
    assert address_literal(ipaddress.ip_address("2001:db8:0::7")) == "[IPv6:2001:db8::7]"
    assert parse_domain(address_literal(ipaddress.ip_address("::1"))) == "[IPv6:::1]"


# -- senders and the null path --------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "<>", " <> ", "  ", None])
def test_null_sender(value: str | None) -> None:
    assert parse_sender(value) is None
    assert path(parse_sender(value)) == "<>"


def test_sender_mailbox() -> None:
    sender = parse_sender("<bounce@example.org>")
    assert sender == Mailbox("bounce", "example.org")
    assert parse_sender(sender) is sender


def test_recipient_passes_mailbox_through() -> None:
    mailbox = Mailbox("x", "example.org")
    assert parse_recipient(mailbox) is mailbox


@pytest.mark.parametrize("value", ["<>\r\n", "\r\n<>", "<\x00>", "\n"])
def test_null_sender_with_controls(value: str) -> None:
    with pytest.raises(InvalidAddress):
        parse_sender(value)


def test_null_path_is_not_a_recipient() -> None:
    with pytest.raises(InvalidAddress):
        parse_recipient("<>")
    with pytest.raises(InvalidAddress):
        parse_recipient("")


def test_a_unicode_domain_is_kept_as_given_beside_its_a_labels() -> None:
    mailbox = Mailbox.parse("jörg@Bücher.Example.")
    assert str(mailbox) == "jörg@xn--bcher-kva.example"  # routing, keys
    assert mailbox.utf8() == "jörg@bücher.example"  # an SMTPUTF8 envelope
    assert Mailbox.parse(mailbox.utf8()) == mailbox == Mailbox.parse(str(mailbox))
    assert Mailbox.parse(mailbox.utf8()).utf8() == mailbox.utf8()
    # Given as A-labels, it stays A-labels (the envelope as received).
    assert Mailbox.parse("jörg@xn--bcher-kva.example").utf8() == "jörg@xn--bcher-kva.example"
    assert Mailbox.parse("a@[192.0.2.1]").utf8() == "a@[192.0.2.1]"


def test_a_domain_idna_2008_refuses_is_kept_for_smtputf8() -> None:
    # U+2603 is not IDNA 2008, but an SMTPUTF8 envelope may carry it (RFC 6531).
    mailbox = Mailbox.parse("a@☃.example")
    assert str(mailbox) == "a@xn--n3h.example" and mailbox.utf8() == "a@☃.example"
    assert Mailbox.parse(str(mailbox)) == mailbox == Mailbox.parse(mailbox.utf8())
    # What IDNA 2003 would change (a joiner dropped) or cannot hold is refused.
    for bad in ("a@a\u200db.example", "a@ex ample.example", "a@\u3000.example"):
        with pytest.raises(InvalidAddress):
            Mailbox.parse(bad)
