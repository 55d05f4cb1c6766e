"""The relay's transports, in memory: both report txcolombe.Outcome; the
smarthost mode is a Pool with a fixed route (pipelined sessions, least
loaded, closed when idle)."""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionRefusedError

from txcolombe import DeliveryStatus, Outcome, Reply, TLSMode
from txcolombe.codec.address import Mailbox, parse_recipient, parse_sender
from txcolombe.relay.queue import relay_name
from txcolombe.relay.transport import PIPELINE_DEPTH, MXTransport, Smarthost, SmarthostTransport
from txcolombe.testing import MemorySMTP, MemorySMTPServer

DATA = b"Subject: relayed\r\n\r\nhello\r\n"
SENDER = parse_sender("a@example.com")


def refusing_nobody(fake: MemorySMTP) -> None:
    def answer(command: str, argument: str) -> Reply | None:
        if command == "RCPT" and "nobody@" in argument:
            return Reply.of(550, "5.1.1 No such user")
        return None

    fake.server.add_responder(answer)


def rcpts(*names: str) -> list[Mailbox]:
    return [parse_recipient(name) for name in names]


def smarthost(fake: MemorySMTP, **options: Any) -> SmarthostTransport:
    host = Smarthost("192.0.2.1", 2525, TLSMode.NONE, domain="relay.example.com")
    return SmarthostTransport(host, reactor=fake.reactor, **options)


def test_smarthost_outcomes_are_the_library_outcome() -> None:
    fake = MemorySMTP(MemorySMTPServer())
    refusing_nobody(fake)
    transport = smarthost(fake)
    recipients = rcpts("b@y.test", "nobody@y.test")
    out = fake.run(transport.send(transport.route(recipients[0]), SENDER, recipients, DATA))
    assert set(out) == {"b@y.test", "nobody@y.test"}
    assert all(isinstance(o, Outcome) for o in out.values())
    ok, refused = out["b@y.test"], out["nobody@y.test"]
    assert ok.delivered and ok.receipt is not None and ok.status_code.startswith("2.")
    assert refused.status is DeliveryStatus.PERMANENT and refused.status_code == "5.1.1"
    assert refused.text == "550 5.1.1 No such user" and refused.local == ""
    assert relay_name(ok) == transport.relay == "192.0.2.1[2525]"
    assert ok.domain == "y.test"


def test_smarthost_refusing_the_connection_defers_as_the_relays_own() -> None:
    fake = MemorySMTP(MemorySMTPServer())
    fake.connect_error = ConnectionRefusedError()
    transport = smarthost(fake)
    out = fake.run(transport.send(transport.relay, SENDER, rcpts("b@y.test"), DATA))
    outcome = out["b@y.test"]
    assert isinstance(outcome, Outcome)
    assert outcome.temporary and outcome.local == "connection"
    assert outcome.status_code == "4.4.1" and relay_name(outcome) == "192.0.2.1[2525]"


def test_smarthost_messages_are_pipelined_over_few_sessions() -> None:
    fake = MemorySMTP(MemorySMTPServer())
    transport = smarthost(fake, concurrency=3)
    count = PIPELINE_DEPTH + 4
    sends = [
        transport.send(transport.relay, SENDER, rcpts(f"r{i}@y.test"), DATA) for i in range(count)
    ]
    assert transport.pool.in_flight == count
    fake.flush()
    results = [fake.run(d) for d in sends]
    assert all(o.delivered for result in results for o in result.values())
    # One session full of PIPELINE_DEPTH messages, the rest on a second one.
    assert len(fake.server.connections) == 2
    assert len(fake.server.transactions) == count
    assert "RSET" not in fake.server.commands
    # Idle sessions QUIT after idle_timeout; close() needs nothing more then.
    fake.advance(31)
    assert fake.server.commands.count("QUIT") == 2
    assert transport.pool.idle_sessions == 0
    fake.run(transport.close())


def test_mx_outcomes_are_the_library_outcome_too() -> None:
    fake = MemorySMTP(MemorySMTPServer())
    refusing_nobody(fake)
    transport = MXTransport(
        reactor=fake.reactor, domain="relay.example.com", resolver=fake.resolver
    )
    recipients = rcpts("b@y.test", "nobody@y.test")
    out = fake.run(transport.send("y.test", SENDER, recipients, DATA))
    assert all(isinstance(o, Outcome) for o in out.values())
    ok, refused = out["b@y.test"], out["nobody@y.test"]
    assert ok.delivered and ok.mx == "mx.example.org" and ok.port == 25
    assert refused.permanent and refused.status_code == "5.1.1"
    assert relay_name(ok) == "mx.example.org[25]"


def test_mx_failure_of_the_relays_own_is_named() -> None:
    fake = MemorySMTP(MemorySMTPServer())
    fake.connect_error = ConnectionRefusedError()
    transport = MXTransport(
        reactor=fake.reactor, domain="relay.example.com", resolver=fake.resolver
    )
    out = fake.run(transport.send("y.test", SENDER, rcpts("b@y.test"), DATA))
    outcome = out["b@y.test"]
    assert outcome.temporary and outcome.local == "connection"
    assert outcome.status_code == "4.4.1"


def test_each_recipient_of_a_split_send_gets_its_own_transactions_reply() -> None:
    from txcolombe.client.receipt import Receipt
    from txcolombe.codec.reply import Reply
    from txcolombe.delivery.outcome import recipient_verdict

    ok = Reply.of(250, "2.1.5 ok")
    first = Receipt({"a@x.test": ok}, {}, Reply.of(250, "2.0.0 Ok: queued as AAA"))
    second = Receipt({"b@x.test": ok}, {}, Reply.of(250, "2.0.0 Ok: queued as BBB"))
    whole = Receipt({"a@x.test": ok, "b@x.test": ok}, {}, first.reply, parts=(first, second))
    verdicts = {r: recipient_verdict(whole, r) for r in ("a@x.test", "b@x.test")}
    assert {r: v.reply.queue_id for r, v in verdicts.items() if v and v.reply} == {
        "a@x.test": "AAA",
        "b@x.test": "BBB",
    }
