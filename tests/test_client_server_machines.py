"""The client machine and the server machine joined directly: bytes out of one into the other.

As h11 tests its two ends against each other: no Twisted, no transport, no
clock. :class:`Link` moves what each machine writes into the other and acts
on their events the way their drivers do (the server's stores each message
and checks credentials from a dict; the client's sends the queued body). TLS
stops at the point where the handshake would start: both machines must have
asked for it; ``pretend_tls`` then tells both that it is up, which lets AUTH
(only ever sent under TLS) be tested too.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txcolombe.client import machine as client
from txcolombe.client.machine import BDAT_CHUNK, ClientMachine, TLSMode
from txcolombe.codec.address import Mailbox, parse_recipient, parse_sender
from txcolombe.codec.dsn import DSN, Notify, RecipientOptions, Return
from txcolombe.codec.errors import (
    AuthenticationFailed,
    RecipientsRefused,
    Step,
    UTF8Unsupported,
)
from txcolombe.codec.reply import Reply
from txcolombe.codec.sasl import Authentication, Mechanism
from txcolombe.server import events as server
from txcolombe.server.machine import END_OF_DATA, GREETING, ServerConfig, ServerMachine

CONFIG = ServerConfig(hostname="mx.example.org", error_sleep=0.0)
CHUNKING = ServerConfig(hostname="mx.example.org", chunking=True, error_sleep=0.0)


class Link:
    """A :class:`ClientMachine` and a :class:`ServerMachine` on one wire.

    :ivar sent: each write of the client, as the server got it.
    :ivar replied: each write of the server, as the client got it.
    :ivar stored: every message the server received.
    :ivar answers: (``intercept``) verb → the bytes that answer it instead,
        without effect; any other verb proceeds.
    """

    def __init__(
        self,
        config: ServerConfig = CONFIG,
        *,
        users: dict[str, str] | None = None,
        relay_allowed: bool = True,
        answers: dict[str, bytes] | None = None,
        pretend_tls: bool = False,
        cut: int | None = None,
        **options: Any,
    ) -> None:
        options.setdefault("tls", TLSMode.NONE)
        self.server = ServerMachine(
            config,
            client_address="192.0.2.1",
            relay_allowed=relay_allowed,
            intercept=answers is not None,
        )
        self.client = ClientMachine("client.example", **options)
        self.users = users or {}
        self.answers = answers or {}
        self.pretend_tls = pretend_tls
        self.cut = cut
        self.sent: list[bytes] = []
        self.replied: list[bytes] = []
        self.stored: list[server.MessageReceived] = []
        self.client_events: list[client.Event] = []
        self.server_events: list[server.ServerEvent] = []
        self.bodies: deque[list[bytes]] = deque()
        self._body: deque[bytes] | None = None
        self.tls_asked = {"client": False, "server": False}

    def run(self) -> Link:
        """Move bytes and act on events until neither machine has anything more."""
        moved = True
        while moved:
            moved = False
            out = self.server.data_to_send()
            if out:
                moved = True
                self.replied.append(out)
                self.client.receive_data(out)
            while (event := self.server.next_event()) is not None:
                moved = True
                self._server_event(event)
            out = self.client.data_to_send()
            if out:
                moved = True
                self.sent.append(out)
                step = self.cut or len(out)
                for start in range(0, len(out), step):  # bytes as they may arrive
                    self.server.receive_data(out[start : start + step])
            while (reply_event := self.client.next_event()) is not None:
                moved = True
                self._client_event(reply_event)
            if self._body is not None:
                moved = True
                self._next_chunk()
        return self

    def _next_chunk(self) -> None:
        """One chunk of the body per round, as a producer gives it: the
        server's replies come in between (a refused BDAT stops the body)."""
        body = self._body
        assert body is not None
        if body:
            self.client.send_body(body.popleft())
        else:
            self._body = None
            self.client.end_body()

    def _server_event(self, event: server.ServerEvent) -> None:
        self.server_events.append(event)
        machine = self.server
        if isinstance(event, server.AuthRequest):
            machine.auth_result(self.users.get(event.username) == event.password)
        elif isinstance(event, server.MessageReceived):
            self.stored.append(event)
            machine.message_result(Reply.of(250, f"2.0.0 Ok: queued as Q{len(self.stored)}"))
        elif isinstance(event, server.CommandRead):
            answer = self.answers.get(event.verb)
            if answer is None:
                machine.proceed()
            else:
                machine.override(answer, effective=False)
        elif isinstance(event, server.ServerStartTLS):
            self.tls_asked["server"] = True
            self._maybe_tls()

    def _client_event(self, event: client.Event) -> None:
        self.client_events.append(event)
        if isinstance(event, client.BodyWanted):
            # A send split over several transactions wants its body again.
            chunks = self.bodies[0] if event.again else self.bodies.popleft()
            self._body = deque(chunks)
        elif isinstance(event, client.BodyRefused):
            self._body = None  # the machine has ended the transaction with RSET
        elif isinstance(event, client.StartTLS):
            self.tls_asked["client"] = True
            self._maybe_tls()

    def _maybe_tls(self) -> None:
        if self.pretend_tls and all(self.tls_asked.values()):
            self.server.tls_started()
            self.client.tls_started()

    def send(self, envelope: client.Envelope, *chunks: bytes) -> Link:
        """Start a transaction whose body is ``chunks``; run."""
        self.bodies.append(list(chunks))
        self.client.start_transaction(envelope)
        return self.run()

    def events(self, kind: type[client.Event]) -> list[Any]:
        return [e for e in self.client_events if isinstance(e, kind)]


def envelope(sender: str | None, *recipients: str, **options: Any) -> client.Envelope:
    return client.Envelope(
        parse_sender(sender), tuple(parse_recipient(r) for r in recipients), **options
    )


def ready(link: Link) -> Link:
    link.run()
    assert link.events(client.Ready), link.client_events
    return link


def codes(data: Iterable[bytes]) -> list[int]:
    return [int(line[:3]) for chunk in data for line in chunk.split(b"\r\n") if line[3:4] == b" "]


# -- a conversation, byte for byte -------------------------------------------------------------


def test_a_plain_send_byte_for_byte() -> None:
    link = ready(Link())
    link.send(envelope("a@example.com", "b@example.org"), b"Subject: hi\r\n\r\n.hello\r\n")
    link.client.quit()
    link.run()
    assert link.sent == [
        b"EHLO client.example\r\n",
        # PIPELINING: MAIL, RCPT and DATA in one write (RFC 2920)
        b"MAIL FROM:<a@example.com> BODY=8BITMIME\r\nRCPT TO:<b@example.org>\r\nDATA\r\n",
        b"Subject: hi\r\n\r\n..hello\r\n",
        b".\r\n",
        b"QUIT\r\n",
    ]
    assert codes(link.replied) == [220, 250, 250, 250, 354, 250, 221]
    [stored] = link.stored
    assert stored.data == b"Subject: hi\r\n\r\n.hello\r\n"
    assert stored.envelope.sender == Mailbox.parse("a@example.com")
    assert stored.envelope.recipients == (Mailbox.parse("b@example.org"),)
    assert stored.envelope.protocol == "ESMTP" and stored.envelope.body_type == "8BITMIME"
    [done] = link.events(client.TransactionDone)
    assert done.reply.queue_id == "Q1" and list(done.accepted) == ["b@example.org"]
    assert isinstance(link.client_events[-1], client.Closed)
    assert isinstance(link.server_events[-1], server.Close)


def test_pipelining_sends_the_next_transaction_with_the_final_dot() -> None:
    link = ready(Link())
    link.bodies.extend([[b"one\r\n"], [b"two\r\n"]])
    link.client.start_transaction(envelope("a@example.com", "b@example.org"))
    link.run()  # the first body leaves; its 250 is not read yet when the second starts
    assert [m.data for m in link.stored] == [b"one\r\n"]
    link.client.start_transaction(envelope("a@example.com", "c@example.org", "d@example.org"))
    link.run()
    assert [m.data for m in link.stored] == [b"one\r\n", b"two\r\n"]
    assert [m.envelope.recipients for m in link.stored][1] == (
        Mailbox.parse("c@example.org"),
        Mailbox.parse("d@example.org"),
    )
    assert len(link.events(client.TransactionDone)) == 2


def test_pipelined_commands_sent_together_are_answered_in_order() -> None:
    link = ready(Link())
    link.bodies.append([b"one\r\n"])
    link.client.start_transaction(envelope("a@example.com", "b@example.org"))
    # Before the replies come, both writes are in the server's input at once.
    out = link.client.data_to_send()
    link.server.receive_data(out)
    assert codes([link.server.data_to_send()]) == [250, 250, 354]
    link.client.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
    link.run()
    assert [m.data for m in link.stored] == [b"one\r\n"]


def test_without_pipelining_each_command_waits_for_its_reply() -> None:
    config = ServerConfig(hostname="mx.example.org", extensions=("8BITMIME", "SIZE 1000"))
    link = ready(Link(config))
    link.send(envelope("a@example.com", "b@example.org", "c@example.org"), b"x\r\n")
    assert link.sent[1:5] == [
        b"MAIL FROM:<a@example.com> BODY=8BITMIME\r\n",
        b"RCPT TO:<b@example.org>\r\n",
        b"RCPT TO:<c@example.org>\r\n",
        b"DATA\r\n",
    ]
    assert [m.data for m in link.stored] == [b"x\r\n"]


# -- BDAT (RFC 3030) ---------------------------------------------------------------------------


def test_bdat_carries_the_body_unstuffed_in_chunks() -> None:
    link = ready(Link(CHUNKING))
    body = b"".join(b".line %d\r\n" % i for i in range(60_000))  # over two BDAT_CHUNKs
    assert len(body) > 2 * BDAT_CHUNK
    pieces = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    link.send(envelope("a@example.com", "b@example.org"), *pieces)
    [stored] = link.stored
    assert stored.data == body
    chunks = [w.split(b"\r\n")[0] for w in link.sent if w.startswith(b"BDAT ")]
    assert len(chunks) == 3 and chunks[-1].endswith(b" LAST"), chunks
    assert not any(b"DATA\r\n" in w for w in link.sent)
    assert codes(link.replied)[-3:] == [250, 250, 250]


def test_bdat_binarymime_takes_the_octets_as_they_are() -> None:
    config = ServerConfig(
        hostname="mx.example.org",
        extensions=("PIPELINING", "CHUNKING", "BINARYMIME", "8BITMIME"),
    )
    link = ready(Link(config))
    body = bytes(range(256)) * 4 + b"no final line break"
    link.send(envelope("a@example.com", "b@example.org", binary=True), body)
    [stored] = link.stored
    assert stored.data == body and stored.envelope.body_type == "BINARYMIME"
    assert link.sent[1].startswith(b"MAIL FROM:<a@example.com> BODY=BINARYMIME\r\n")


def test_a_refused_bdat_chunk_ends_the_transaction_with_rset() -> None:
    # The server's limit is reached in the first chunk (no SIZE was declared):
    # the chunks already sent are read and refused, the client stops the
    # body, sends RSET, and the session goes on.
    config = ServerConfig(hostname="mx.example.org", chunking=True, max_size=BDAT_CHUNK)
    link = ready(Link(config))
    body = b"y" * 900 + b"\r\n"
    link.send(envelope("a@example.com", "b@example.org"), *[body] * 700)
    assert link.stored == []
    [failed] = link.events(client.TransactionRefused)
    assert failed.error.code == 552 and failed.error.step is Step.BODY
    assert link.sent[-1] == b"RSET\r\n"
    assert b" LAST\r\n" not in b"".join(link.sent)
    assert codes(link.replied)[-2:] == [552, 250]
    link.send(envelope("a@example.com", "b@example.org"), b"small\r\n")
    assert len(link.stored) == 1 and link.events(client.TransactionDone)


def test_after_a_refused_bdat_chunk_the_next_message_is_whole() -> None:
    config = ServerConfig(hostname="mx.example.org", chunking=True, max_size=BDAT_CHUNK)
    link = ready(Link(config))
    link.send(envelope("a@example.com", "b@example.org"), *[b"y" * 900 + b"\r\n"] * 700)
    link.send(envelope("a@example.com", "b@example.org"), b"small\r\n")
    assert [m.data for m in link.stored] == [b"small\r\n"]


def test_a_refused_last_chunk_fails_the_transaction_only() -> None:
    link = ready(Link(CHUNKING, answers={END_OF_DATA: b"554 5.7.1 spam\r\n"}))
    link.send(envelope("a@example.com", "b@example.org"), b"buy now\r\n")
    [failed] = link.events(client.TransactionRefused)
    assert failed.error.code == 554 and failed.error.step is Step.DATA_END
    assert link.stored == [] and not link.events(client.SessionFailed)


def test_bdat_without_chunking_is_not_sent() -> None:
    link = ready(Link(CONFIG))
    link.send(envelope("a@example.com", "b@example.org"), b"x\r\n")
    assert not any(w.startswith(b"BDAT") for w in link.sent)
    link.client.start_transaction(envelope("a@example.com", "b@example.org", chunking=True))
    link.run()
    [refused] = link.events(client.TransactionRefused)
    assert "CHUNKING" in str(refused.error)
    assert link.sent[-1] == b".\r\n"  # nothing more was sent for it


# -- STARTTLS and AUTH -------------------------------------------------------------------------


TLS = ServerConfig(hostname="mx.example.org", tls_available=True, auth_enabled=True)


def test_starttls_up_to_the_handshake() -> None:
    link = Link(TLS, tls=TLSMode.REQUIRED).run()
    assert link.sent == [b"EHLO client.example\r\n", b"STARTTLS\r\n"]
    assert link.tls_asked == {"client": True, "server": True}
    assert link.server.state.name == "WAIT_TLS" and link.client.state.name == "TLS_WAIT"
    # Nothing read in plaintext after STARTTLS counts, on either side.
    link.server.receive_data(b"MAIL FROM:<a@example.com>\r\n")
    link.client.receive_data(b"250 forged\r\n")
    assert link.server.data_to_send() == b"" and link.client.data_to_send() == b""
    ehlo = link.replied[1].decode()
    assert "STARTTLS" in ehlo and "AUTH" not in ehlo  # AUTH only under TLS


def test_after_tls_the_session_starts_over() -> None:
    link = ready(Link(TLS, tls=TLSMode.REQUIRED, pretend_tls=True))
    assert link.sent[2] == b"EHLO client.example\r\n"
    [ready_event] = link.events(client.Ready)
    assert ready_event.tls and "STARTTLS" not in ready_event.extensions
    assert ready_event.extensions.auth_mechanisms == {"PLAIN", "LOGIN"}
    link.send(envelope("a@example.com", "b@example.org"), b"x\r\n")
    assert link.stored[0].envelope.protocol == "ESMTPS"


def test_a_server_without_starttls_fails_a_client_that_requires_it() -> None:
    link = Link(CONFIG, tls=TLSMode.REQUIRED).run()
    [failed] = link.events(client.SessionFailed)
    assert failed.error.step is Step.STARTTLS
    assert link.sent[-1] == b"QUIT\r\n"


@pytest.mark.parametrize("mechanism", [Mechanism.PLAIN, Mechanism.LOGIN])
def test_auth(mechanism: Mechanism) -> None:
    credentials = Authentication("alice", "s3cret", mechanism=mechanism)
    link = Link(
        TLS,
        users={"alice": "s3cret"},
        relay_allowed=False,
        pretend_tls=True,
        tls=TLSMode.REQUIRED,
        authentication=credentials,
    )
    ready(link)
    requests = [e for e in link.server_events if isinstance(e, server.AuthRequest)]
    assert [(r.mechanism, r.username, r.password) for r in requests] == [
        (mechanism.value, "alice", "s3cret")
    ]
    assert link.server.authenticated == "alice"
    # AUTH lets the client relay: a domain that is not local is accepted.
    link.send(envelope("alice@example.com", "b@example.org"), b"x\r\n")
    assert link.stored[0].envelope.authenticated == "alice"
    assert link.stored[0].envelope.protocol == "ESMTPSA"


def test_auth_with_a_wrong_password() -> None:
    credentials = Authentication("alice", "wrong", mechanism=Mechanism.PLAIN)
    link = Link(
        TLS,
        users={"alice": "s3cret"},
        pretend_tls=True,
        tls=TLSMode.REQUIRED,
        authentication=credentials,
    ).run()
    [failed] = link.events(client.SessionFailed)
    assert isinstance(failed.error, AuthenticationFailed) and failed.error.code == 535
    assert link.server.authenticated is None


# -- DSN and SMTPUTF8 --------------------------------------------------------------------------


def test_dsn_parameters_reach_the_server() -> None:
    config = ServerConfig(hostname="mx.example.org", extensions=("PIPELINING", "8BITMIME", "DSN"))
    link = ready(Link(config))
    dsn = DSN(ret=Return.HDRS, envid="order-17")
    options = (
        RecipientOptions(frozenset({Notify.FAILURE, Notify.DELAY}), "b@example.org"),
        RecipientOptions(frozenset({Notify.NEVER})),
    )
    link.send(
        envelope("a@example.com", "b@example.org", "c@example.org", dsn=dsn, rcpt_options=options),
        b"x\r\n",
    )
    [stored] = link.stored
    assert stored.envelope.mail_parameters == ("BODY=8BITMIME", "RET=HDRS", "ENVID=order-17")
    (notify, orcpt), second = stored.envelope.rcpt_parameters
    assert set(notify.removeprefix("NOTIFY=").split(",")) == {"FAILURE", "DELAY"}
    assert orcpt == "ORCPT=rfc822;b@example.org"
    assert second == ("NOTIFY=NEVER",)


def test_dsn_parameters_are_refused_by_a_server_without_dsn() -> None:
    link = ready(Link(CONFIG))
    link.server.receive_data(b"MAIL FROM:<a@example.com> RET=FULL\r\n")
    assert codes([link.server.data_to_send()]) == [555]


def test_smtputf8() -> None:
    link = ready(Link())
    link.send(envelope("jürgen@example.com", "zoë@exämple.org"), "Grüße\r\n".encode())
    [stored] = link.stored
    assert stored.envelope.smtputf8 and stored.envelope.protocol == "UTF8SMTP"
    assert stored.envelope.sender == Mailbox.parse("jürgen@example.com")
    assert link.sent[1].startswith("MAIL FROM:<jürgen@example.com> SMTPUTF8".encode())
    no_utf8 = ServerConfig(hostname="mx.example.org", extensions=("PIPELINING", "8BITMIME"))
    link = ready(Link(no_utf8))
    link.client.start_transaction(envelope("jürgen@example.com", "b@example.org"))
    link.run()
    [refused] = link.events(client.TransactionRefused)
    assert isinstance(refused.error, UTF8Unsupported)
    assert not any(w.startswith(b"MAIL") for w in link.sent)


# -- refusals at each step ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("verb", "step"),
    [
        (GREETING, Step.GREETING),
        ("EHLO", Step.EHLO),
        ("HELO", Step.HELO),  # after a 502 to EHLO, the client falls back to HELO
        ("MAIL", Step.MAIL),
        ("DATA", Step.DATA),
        (END_OF_DATA, Step.DATA_END),
    ],
)
def test_a_refusal_at_each_step(verb: str, step: Step) -> None:
    answers = {verb: b"554 5.7.1 no\r\n"}
    if verb == "HELO":
        answers["EHLO"] = b"502 5.5.1 what?\r\n"
    link = Link(answers=answers).run()
    if link.events(client.Ready):
        link.send(envelope("a@example.com", "b@example.org"), b"x\r\n")
    errors = [e.error for e in link.client_events if hasattr(e, "error")]
    assert errors and errors[0].code == 554 and errors[0].step is step
    assert link.stored == []


def test_recipient_refusals() -> None:
    config = ServerConfig(
        hostname="mx.example.org", max_recipients=2, local_domains=frozenset({"example.org"})
    )
    link = ready(Link(config, relay_allowed=False))
    link.send(
        envelope(
            "a@example.com",
            "b@example.org",
            "c@elsewhere.example",
            "d@example.org",
            "e@example.org",
        ),
        b"x\r\n",
    )
    # 452 "too many recipients" sends the rest in a second transaction
    # (RFC 5321 §4.5.3.1.10): one result for the send.
    [done] = link.events(client.TransactionDone)
    assert sorted(done.accepted) == ["b@example.org", "d@example.org", "e@example.org"]
    assert {k: r.code for k, r in done.refused.items()} == {
        "c@elsewhere.example": 554,  # relay access denied
    }
    assert [m.envelope.recipients for m in link.stored] == [
        (Mailbox.parse("b@example.org"), Mailbox.parse("d@example.org")),
        (Mailbox.parse("e@example.org"),),
    ]
    link.send(envelope("a@example.com", "c@elsewhere.example"), b"x\r\n")
    [failed] = link.events(client.TransactionRefused)
    assert isinstance(failed.error, RecipientsRefused)
    assert len(link.stored) == 2


def test_a_body_the_server_refuses() -> None:
    link = ready(Link())
    link.send(
        envelope("a@example.com", "b@example.org"), b"Received: x\r\n" * 100 + b"\r\nloop\r\n"
    )
    [failed] = link.events(client.TransactionRefused)
    assert failed.error.code == 554 and failed.error.step is Step.DATA_END
    assert link.stored == []


# -- what the client sends is what the server receives -----------------------------------------

_LOCAL = st.text("abcxyz0.-_+ü", min_size=1, max_size=8).filter(
    lambda s: not (s.startswith(".") or s.endswith(".") or ".." in s)
)
_DOMAIN = st.sampled_from(["example.org", "example.com", "bü.example", "[192.0.2.7]"])
_ADDRESS = st.builds(lambda local, domain: f"{local}@{domain}", _LOCAL, _DOMAIN)
_LINE = st.one_of(
    st.sampled_from([b"", b".", b"..", b".x", b"\r", b"\n", b"\xff\xfe"]),
    st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
)
_BREAK = st.sampled_from([b"\r\n", b"\n", b"\r", b""])


@st.composite
def _body(draw: st.DrawFn) -> bytes:
    parts = draw(st.lists(st.tuples(_LINE, _BREAK), max_size=15))
    return b"".join(line + brk for line, brk in parts)


def _sent_as(body: bytes) -> bytes:
    """The body as the client puts it on the wire, unstuffed: CRLF lines, the last ended."""
    normal = re.sub(rb"\r\n|\r|\n", b"\r\n", body)
    return normal if not normal or normal.endswith(b"\r\n") else normal + b"\r\n"


@settings(max_examples=150, deadline=None)
@given(
    sender=st.one_of(st.none(), _ADDRESS),
    recipients=st.lists(_ADDRESS, min_size=1, max_size=4),
    body=_body(),
    pieces=st.integers(min_value=1, max_value=5),
    chunking=st.booleans(),
    pipelining=st.booleans(),
    cut=st.one_of(st.none(), st.integers(min_value=1, max_value=7)),
)
def test_the_server_receives_what_the_client_sends(
    sender: str | None,
    recipients: list[str],
    body: bytes,
    pieces: int,
    chunking: bool,
    pipelining: bool,
    cut: int | None,
) -> None:
    extensions = ["8BITMIME", "SMTPUTF8", "SIZE 100000"]
    extensions += ["PIPELINING"] if pipelining else []
    extensions += ["CHUNKING"] if chunking else []
    config = ServerConfig(hostname="mx.example.org", extensions=tuple(extensions))
    commands: list[str] = []  # what the client sent, as its trace names it: not the body
    link = ready(Link(config, cut=cut, trace=lambda way, line: commands.append(way + line)))
    size = len(body) // pieces + 1
    chunks = [body[i : i + size] for i in range(0, len(body), size)]
    sent = envelope(sender, *recipients, size=len(body))
    link.send(sent, *chunks)
    [stored] = link.stored
    assert stored.envelope.sender == sent.sender
    assert stored.envelope.recipients == sent.recipients
    assert stored.data == _sent_as(body)
    bdat = any(line.startswith(">BDAT ") for line in commands)
    assert bdat == (chunking and pipelining)
    assert (">DATA" in commands) == (not bdat)
    [done] = link.events(client.TransactionDone)
    assert done.reply.queue_id == "Q1"
