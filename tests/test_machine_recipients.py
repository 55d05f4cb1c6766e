"""Large recipient lists in the machine: one send, several transactions, exact bytes.

RFC 5321 §4.5.3.1.8 (at least 100 recipients per transaction), §4.5.3.1.10
(452, or 552, "too many recipients": the rest go in the next transaction)
and RFC 9422 (LIMITS RCPTMAX, RCPTDOMAINMAX).
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from tests.test_machine import (
    DATA,
    QUIT,
    RSET,
    Conversation,
    envelope,
    only,
    refused_before_sending,
    send_message,
    session,
)
from txcolombe.client.machine import (
    BodyWanted,
    SessionFailed,
    State,
    TransactionDone,
    TransactionRefused,
)
from txcolombe.client.recipients import server_limits, too_many_recipients
from txcolombe.codec import errors
from txcolombe.codec.extensions import Extensions
from txcolombe.codec.reply import Reply

MAIL = b"MAIL FROM:<from@example.org>\r\n"
OK = b"250 ok\r\n"
GO = b"354 go\r\n"


def names(count: int, domain: str = "example.net") -> list[str]:
    return [f"r{i}@{domain}" for i in range(count)]


def rcpts(*addresses: str) -> bytes:
    return b"".join(b"RCPT TO:<%s>\r\n" % a.encode() for a in addresses)


def done_of(events: Sequence[object]) -> TransactionDone:
    done = events[-1]
    assert isinstance(done, TransactionDone), events
    return done


# -- splitting by count -------------------------------------------------------------------


def test_more_than_100_recipients_go_in_several_pipelined_transactions() -> None:
    conv = session("PIPELINING")
    people = names(250)
    handle = conv.machine.start_transaction(envelope(*people))
    sent, _ = conv.flush()
    assert sent == MAIL + rcpts(*people[:100]) + DATA
    sent, events = conv.feed(OK * 101 + GO)
    assert (sent, events) == (b"", [BodyWanted(handle, again=True)])
    send_message(conv, b"hi\r\n")
    # The next transaction leaves with the final dot, in the same write.
    sent, _ = conv.flush()
    assert sent == b"hi\r\n.\r\n" + MAIL + rcpts(*people[100:200]) + DATA
    sent, events = conv.feed(b"250 queued as ONE\r\n" + OK * 101 + GO)
    assert (sent, events) == (b"", [BodyWanted(handle, again=True)])
    send_message(conv, b"hi\r\n")
    sent, _ = conv.flush()
    assert sent == b"hi\r\n.\r\n" + MAIL + rcpts(*people[200:]) + DATA
    _, events = conv.feed(b"250 queued as TWO\r\n" + OK * 51 + GO)
    assert events == [BodyWanted(handle, again=False)]  # the last one
    send_message(conv, b"hi\r\n")
    conv.flush()
    _, events = conv.feed(b"250 queued as THREE\r\n")
    done = done_of(events)
    assert len(events) == 1
    assert done.handle == handle
    assert list(done.accepted) == people
    assert done.refused == {}
    assert done.reply.queue_id == "ONE"
    assert [part.reply.queue_id for part in done.parts] == ["ONE", "TWO", "THREE"]
    assert [len(part.accepted) for part in done.parts] == [100, 100, 50]
    assert conv.state is State.READY


def test_exactly_100_recipients_is_one_transaction() -> None:
    conv = session("PIPELINING")
    handle = conv.machine.start_transaction(envelope(*names(100)))
    conv.flush()
    _, events = conv.feed(OK * 101 + GO)
    assert events == [BodyWanted(handle, again=False)]
    send_message(conv)
    conv.flush()
    done = done_of(conv.feed(OK)[1])
    assert done.parts == ()
    assert len(done.accepted) == 100


def test_lock_step_split() -> None:
    conv = session(max_recipients=2)
    people = names(3)
    conv.machine.start_transaction(envelope(*people))
    assert conv.flush()[0] == MAIL
    assert conv.feed(OK) == (rcpts(people[0]), [])
    assert conv.feed(OK) == (rcpts(people[1]), [])
    assert conv.feed(OK)[0] == DATA
    conv.feed(GO)
    send_message(conv, b"x\r\n")
    assert conv.flush()[0] == b"x\r\n.\r\n"
    # No PIPELINING: the next MAIL waits for the end of data's reply.
    assert conv.feed(OK)[0] == MAIL
    assert conv.feed(OK) == (rcpts(people[2]), [])
    assert conv.feed(OK)[0] == DATA
    conv.feed(GO)
    send_message(conv, b"x\r\n")
    conv.flush()
    done = done_of(conv.feed(OK)[1])
    assert list(done.accepted) == people
    assert len(done.parts) == 2


def test_no_limit_of_ours() -> None:
    conv = session("PIPELINING", max_recipients=None)
    people = names(150)
    conv.machine.start_transaction(envelope(*people))
    assert conv.flush()[0] == MAIL + rcpts(*people) + DATA


def test_max_recipients_must_be_positive() -> None:
    with pytest.raises(errors.UsageError):
        Conversation(max_recipients=0)


def test_all_or_nothing_is_never_split() -> None:
    conv = session("PIPELINING")
    people = names(120)
    conv.machine.start_transaction(envelope(*people, all_or_nothing=True))
    assert conv.flush()[0] == MAIL + rcpts(*people)


# -- LIMITS (RFC 9422) -------------------------------------------------------------------


def test_server_limits_are_read_from_ehlo() -> None:
    reply = Reply.of(250, "mx", "LIMITS RCPTMAX=20 MAILMAX=5 RCPTDOMAINMAX=x FOO=0 BAR")
    assert server_limits(Extensions.from_reply(reply)) == {"RCPTMAX": 20, "MAILMAX": 5}
    assert server_limits(Extensions()) == {}


def test_rcptmax_lowers_the_limit() -> None:
    conv = session("PIPELINING", "LIMITS RCPTMAX=3")
    people = names(5)
    conv.machine.start_transaction(envelope(*people))
    assert conv.flush()[0] == MAIL + rcpts(*people[:3]) + DATA
    conv.feed(OK * 4 + GO)
    send_message(conv)
    assert conv.flush()[0].endswith(b".\r\n" + MAIL + rcpts(*people[3:]) + DATA)


def test_rcptmax_above_our_limit_does_not_raise_it() -> None:
    conv = session("PIPELINING", "LIMITS RCPTMAX=500", max_recipients=4)
    people = names(5)
    conv.machine.start_transaction(envelope(*people))
    assert conv.flush()[0] == MAIL + rcpts(*people[:4]) + DATA


def test_rcptdomainmax_groups_recipients_by_domain() -> None:
    conv = session("PIPELINING", "LIMITS RCPTDOMAINMAX=2")
    people = ["a@one.example", "b@two.example", "c@three.example", "d@one.example"]
    conv.machine.start_transaction(envelope(*people))
    # c@three.example would be a third domain: it waits for the next transaction.
    assert conv.flush()[0] == MAIL + rcpts("a@one.example", "b@two.example", "d@one.example") + DATA
    conv.feed(OK * 4 + GO)
    send_message(conv)
    assert conv.flush()[0].endswith(b".\r\n" + MAIL + rcpts("c@three.example") + DATA)


# -- "too many recipients" replies ---------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (Reply.of(452, "4.5.3 Error: too many recipients"), True),
        (Reply.of(552, "5.5.3 too many recipients"), True),
        (Reply.of(452, "Too many recipients"), True),
        (Reply.of(452, "4.3.1 Insufficient system storage"), False),
        (Reply.of(552, "5.2.2 mailbox full"), False),
        (Reply.of(550, "5.5.3 too many recipients"), False),
        (Reply.of(452, "try later"), False),
    ],
)
def test_too_many_recipients(reply: Reply, expected: bool) -> None:
    assert too_many_recipients(reply) is expected


@pytest.mark.parametrize("refusal", [b"452 4.5.3 too many recipients", b"552 5.5.3 too many"])
def test_the_recipients_over_the_servers_limit_go_in_the_next_transaction(refusal: bytes) -> None:
    conv = session("PIPELINING")
    people = names(7)
    conv.machine.start_transaction(envelope(*people))
    conv.flush()
    # The server takes 3 per transaction.
    sent, events = conv.feed(OK * 4 + (refusal + b"\r\n") * 4 + GO)
    assert sent == b""
    assert events == [BodyWanted(1, again=True)]
    send_message(conv, b"x\r\n")
    # Those refused as too many, first, and no more than the server took.
    assert conv.flush()[0] == b"x\r\n.\r\n" + MAIL + rcpts(*people[3:6]) + DATA
    conv.feed(OK + OK * 4 + GO)
    send_message(conv, b"x\r\n")
    assert conv.flush()[0] == b"x\r\n.\r\n" + MAIL + rcpts(people[6]) + DATA
    conv.feed(OK + OK * 2 + GO)
    send_message(conv, b"x\r\n")
    conv.flush()
    done = done_of(conv.feed(OK)[1])
    assert sorted(done.accepted) == sorted(people)
    assert done.refused == {}  # none bounced, none even refused
    assert len(done.parts) == 3


def test_too_many_recipients_in_lock_step_stops_the_rcpts() -> None:
    conv = session()
    people = names(4)
    conv.machine.start_transaction(envelope(*people))
    conv.flush()
    conv.feed(OK)
    conv.feed(OK)
    conv.feed(OK)
    # The third is refused as too many: the fourth is not even asked, DATA follows.
    assert conv.feed(b"552 5.5.3 too many recipients\r\n")[0] == DATA
    conv.feed(GO)
    send_message(conv, b"x\r\n")
    conv.flush()
    assert conv.feed(OK)[0] == MAIL
    assert conv.feed(OK)[0] == rcpts(people[2])
    assert conv.feed(OK)[0] == rcpts(people[3])
    assert conv.feed(OK)[0] == DATA
    conv.feed(GO)
    send_message(conv, b"x\r\n")
    conv.flush()
    done = done_of(conv.feed(OK)[1])
    assert list(done.accepted) == [people[0], people[1], people[2], people[3]]


@pytest.mark.parametrize("refusal", [b"452 4.5.3 too many recipients", b"552 5.5.3 too many"])
def test_too_many_with_none_accepted_is_a_temporary_refusal(refusal: bytes) -> None:
    conv = session("PIPELINING")
    conv.machine.start_transaction(envelope(*names(2)))
    conv.flush()
    assert conv.feed(OK + (refusal + b"\r\n") * 2 + b"503 no recipients\r\n") == (RSET, [])
    failed = only(conv.feed(OK)[1], TransactionRefused)
    assert isinstance(failed, TransactionRefused)
    assert isinstance(failed.error, errors.RecipientsRefused)
    assert failed.error.temporary  # RFC 5321 §4.5.3.1.10: a 552 here is temporary too
    assert {reply.code for reply in failed.error.refused.values()} == {452}
    assert b"MAIL" not in conv.sent.split(RSET)[-1]  # nothing retried on this connection


def test_out_of_storage_is_an_ordinary_refusal() -> None:
    conv = session("PIPELINING")
    people = names(2)
    conv.machine.start_transaction(envelope(*people))
    conv.flush()
    conv.feed(OK + OK + b"452 4.3.1 out of storage\r\n" + GO)
    send_message(conv)
    conv.flush()
    _, events = conv.feed(OK)
    done = done_of(events)
    assert list(done.refused) == [people[1]]
    assert conv.flush() == (b"", [])  # no second transaction


# -- one result from several transactions -------------------------------------------------


def test_a_later_transaction_refused_keeps_the_earlier_delivery() -> None:
    conv = session("PIPELINING", max_recipients=2)
    people = names(4)
    conv.machine.start_transaction(envelope(*people))
    conv.flush()
    conv.feed(OK * 3 + GO)
    send_message(conv)
    conv.flush()
    # The second transaction: every recipient refused, its DATA answered 503.
    sent, events = conv.feed(OK + OK + b"550 no\r\n550 no\r\n503 no valid recipients\r\n")
    assert (sent, events) == (RSET, [])
    done = done_of(conv.feed(OK)[1])
    assert list(done.accepted) == people[:2]
    assert list(done.refused) == people[2:]
    assert len(done.parts) == 1


def test_a_message_refused_as_a_whole_is_not_tried_again() -> None:
    conv = session(max_recipients=1)
    conv.machine.start_transaction(envelope(*names(3)))
    conv.flush()
    assert conv.feed(b"550 5.7.1 sender blocked\r\n") == (RSET, [])
    failed = only(conv.feed(OK)[1], TransactionRefused)
    assert isinstance(failed, TransactionRefused)
    assert isinstance(failed.error, errors.MailboxUnavailable)
    assert conv.sent.count(b"MAIL") == 1


def test_a_failure_after_a_delivery_reports_each_recipient() -> None:
    conv = session(max_recipients=1)
    people = names(3)
    conv.machine.start_transaction(envelope(*people))
    for first in (True, False):
        conv.flush()
        conv.feed(OK)
        conv.feed(OK)
        conv.feed(GO)
        send_message(conv)
        conv.flush()
        if first:
            assert conv.feed(OK)[0] == MAIL
    # The second message is refused at its end of data: no third transaction.
    sent, events = conv.feed(b"554 5.6.0 content refused\r\n")
    assert sent == b""
    done = done_of(events)
    assert list(done.accepted) == people[:1]
    assert done.refused[people[1]].code == 554
    assert people[2] not in done.refused  # never tried
    assert conv.sent.count(b"MAIL") == 2


def test_nothing_accepted_in_any_transaction() -> None:
    conv = session(max_recipients=1)
    people = names(2)
    conv.machine.start_transaction(envelope(*people))
    conv.flush()
    conv.feed(OK)
    assert conv.feed(b"550 no such user\r\n")[0] == RSET
    assert conv.feed(OK)[0] == MAIL
    conv.feed(OK)
    assert conv.feed(b"450 mailbox busy\r\n")[0] == RSET
    failed = only(conv.feed(OK)[1], TransactionRefused)
    assert isinstance(failed, TransactionRefused)
    assert isinstance(failed.error, errors.RecipientsRefused)
    assert {name: r.code for name, r in failed.error.refused.items()} == {
        people[0]: 550,
        people[1]: 450,
    }


def test_the_session_failing_keeps_what_was_delivered() -> None:
    conv = session("PIPELINING", max_recipients=2)
    people = names(3)
    handle = conv.machine.start_transaction(envelope(*people))
    conv.flush()
    conv.feed(OK * 3 + GO)
    send_message(conv)
    conv.flush()
    _, events = conv.feed(b"250 queued\r\n421 4.3.2 going down\r\n")
    assert [type(e) for e in events[:2]] == [TransactionDone, SessionFailed]
    done = done_of(events[:1])
    assert done.handle == handle
    assert list(done.accepted) == people[:2]
    assert people[2] not in done.refused  # not tried: the caller may try it elsewhere


def test_quit_waits_for_every_transaction_of_a_split_send() -> None:
    conv = session("PIPELINING", max_recipients=1)
    conv.machine.start_transaction(envelope(*names(2)))
    conv.flush()
    conv.machine.quit()
    conv.feed(OK + OK + GO)
    send_message(conv)
    assert QUIT not in conv.flush()[0]
    conv.feed(OK + OK + OK + GO)
    send_message(conv)
    assert conv.flush()[0].endswith(b".\r\n" + QUIT)  # with the last final dot
    sent, events = conv.feed(OK)
    assert sent == b""
    assert len(done_of(events).parts) == 2


def test_a_second_send_waits_for_the_first_ones_transactions() -> None:
    conv = session("PIPELINING", max_recipients=1)
    first = conv.machine.start_transaction(envelope("a@example.net", "b@example.net"))
    second = conv.machine.start_transaction(envelope("c@example.net"))
    assert conv.flush()[0] == MAIL + rcpts("a@example.net") + DATA
    conv.feed(OK * 2 + GO)
    send_message(conv)
    assert conv.flush()[0].endswith(MAIL + rcpts("b@example.net") + DATA)
    _, events = conv.feed(OK + OK * 2 + GO)
    assert events == [BodyWanted(first, again=False)]
    send_message(conv)
    assert conv.flush()[0].endswith(MAIL + rcpts("c@example.net") + DATA)
    _, events = conv.feed(OK + OK * 2 + GO)
    assert done_of(events[:1]).handle == first
    assert events[1:] == [BodyWanted(second, again=False)]


def test_cancel_between_transactions_drops_the_rest() -> None:
    conv = session(max_recipients=1)
    handle = conv.machine.start_transaction(envelope(*names(2)))
    conv.flush()
    conv.feed(OK)
    conv.feed(OK)
    conv.feed(GO)
    send_message(conv)
    conv.flush()
    assert not conv.machine.cancel(handle)  # the body has left: only an abort stops it
    sent, _ = conv.feed(OK)
    assert sent == MAIL
    assert conv.machine.cancel(handle)  # before its DATA: ends with RSET
    assert conv.feed(OK) == (RSET, [])
    # What the first transaction delivered is still reported.
    done = only(conv.feed(OK)[1], TransactionDone)
    assert isinstance(done, TransactionDone)
    assert len(done.accepted) == 1
    assert conv.sent.count(b"RCPT") == 1
    assert conv.state is State.READY


def test_mailmax_refuses_a_send_beyond_it_for_now() -> None:
    conv = session("PIPELINING", "LIMITS MAILMAX=2")
    for _ in range(2):
        conv.machine.start_transaction(envelope("a@example.net"))
        assert conv.flush()[0] == MAIL + rcpts("a@example.net") + DATA
        conv.feed(OK * 2 + GO)
        send_message(conv)
        conv.flush()
        assert isinstance(only(conv.feed(OK)[1], TransactionDone), TransactionDone)
    assert conv.machine.exhausted
    error = refused_before_sending(conv, envelope("a@example.net"))
    assert error.temporary and "MAILMAX" in str(error)


def test_a_split_send_that_reaches_mailmax_keeps_its_untried_recipients_pending() -> None:
    conv = session("PIPELINING", "LIMITS MAILMAX=1", max_recipients=2)
    people = names(3)
    conv.machine.start_transaction(envelope(*people))
    assert conv.flush()[0] == MAIL + rcpts(*people[:2]) + DATA
    conv.feed(OK * 3 + GO)
    send_message(conv)
    conv.flush()
    done = done_of(conv.feed(OK)[1])
    assert sorted(done.accepted) == people[:2]
    assert people[2] not in done.accepted and people[2] not in done.refused
    assert conv.machine.exhausted
