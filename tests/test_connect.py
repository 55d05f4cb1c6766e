"""TLS client options: made once per server name and trust root, then reused."""

from __future__ import annotations

from twisted.internet.ssl import optionsForClientTLS, trustRootFromCertificates

from txcolombe.client.connect import Host, tls_options


def test_verified_options_are_reused_for_the_same_name_and_trust_root() -> None:
    host = Host.parse("mx.example.org")
    first = tls_options(host)
    assert tls_options(Host.parse("mx.example.org")) is first
    assert tls_options(Host.parse("mx2.example.org")) is not first


def test_each_trust_root_has_its_own_options() -> None:
    host = Host.parse("mx.example.org")
    root = trustRootFromCertificates([])
    with_root = tls_options(host, trust_root=root)
    assert with_root is not tls_options(host)
    assert tls_options(host, trust_root=root) is with_root
    assert tls_options(host, trust_root=trustRootFromCertificates([])) is not with_root


def test_given_options_are_used_as_they_are() -> None:
    given = optionsForClientTLS("other.example.org")
    assert tls_options(Host.parse("mx.example.org"), tls=given) is given
