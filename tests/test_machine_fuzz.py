"""The client machine under random drivers: sends, bodies, cancels, quits and replies.

Seeded and bounded like ``tests/test_fuzz.py``. A driver that only does what
the machine's events allow must never get an exception, every move must be
one of :data:`~txcolombe.client.states.TRANSITIONS`, and every send must end
exactly once: with its own :class:`TransactionDone` or
:class:`TransactionRefused`, with a :class:`SessionFailed` of the session,
or cancelled while still queued.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from tests.test_machine import envelope
from txcolombe.client.machine import (
    BDAT_CHUNK,
    TRANSITIONS,
    BodyRefused,
    BodyWanted,
    ClientMachine,
    Closed,
    Handle,
    SessionFailed,
    State,
    TLSMode,
    TransactionDone,
    TransactionRefused,
)
from txcolombe.codec.errors import Step, UsageError

FUZZ = settings(
    max_examples=200,
    deadline=timedelta(milliseconds=500),
    database=DirectoryBasedExampleDatabase(str(Path(__file__).parent / "fuzz_examples")),
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=False,
)

#: A body chunk big enough to send a BDAT chunk before the end of the body.
BIG = (b"y" * 900 + b"\r\n") * (BDAT_CHUNK // 902 + 1)

EHLO_REPLIES = [
    b"250-mx.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 8BITMIME\r\n",
    b"250-mx.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n",
    b"250-mx.test\r\n250-PIPELINING\r\n250 LIMITS RCPTMAX=2 RCPTDOMAINMAX=1\r\n",
    b"250 mx.test\r\n",
]

#: Replies a transaction needs, and the refusals it may meet.
REPLIES = [
    b"250 ok\r\n",
    b"354 go\r\n",
    b"452 4.5.3 too many recipients\r\n",
    b"552 5.5.3 too many recipients\r\n",
    b"452 4.3.1 out of storage\r\n",
    b"550 no\r\n",
    b"554 refused\r\n",
    b"503 bad sequence\r\n",
]

#: What ends a session: rare, or no transaction would ever run.
ENDINGS = [
    ("say", b"421 bye\r\n"),
    ("say", b"221 bye\r\n"),
    ("say", b"220 mx.test ESMTP\r\n"),
    ("say", b"250-mx.test\r\n250 PIPELINING\r\n"),
    ("quit", None),
    ("timeout", None),
    ("lost", None),
]

#: The reply a willing server gives to each step.
POSITIVE = {
    Step.GREETING: b"220 mx.test\r\n",
    Step.RSET: b"250 ok\r\n",
    Step.MAIL: b"250 ok\r\n",
    Step.RCPT: b"250 ok\r\n",
    Step.DATA: b"354 go\r\n",
    Step.BODY: b"250 chunk ok\r\n",
    Step.DATA_END: b"250 queued\r\n",
    Step.QUIT: b"221 bye\r\n",
}

actions = st.lists(
    st.one_of(
        st.tuples(st.just("yes"), st.integers(1, 8)),  # accept that many commands
        st.tuples(st.just("reply"), st.sampled_from(REPLIES)),
        st.tuples(st.just("send"), st.integers(1, 5), st.booleans()),
        st.tuples(st.just("chunk"), st.sampled_from([BIG, BIG, b"x\r\n", b"\xe9\r\n"])),
        st.tuples(st.just("end"), st.none()),
        st.tuples(st.just("cancel"), st.integers(0, 6)),
        st.tuples(st.just("end?"), st.integers(0, 7), st.sampled_from(ENDINGS)),
    ),
    min_size=10,
    max_size=60,
)


class Driver:
    """Does only what the machine's events allow, and checks how sends end."""

    def __init__(self) -> None:
        self.machine = ClientMachine("client.test", tls=TLSMode.NONE, max_recipients=2)
        self.open: set[Handle] = set()  # sends not ended yet
        self.handles: list[Handle] = []
        self.body: Handle | None = None
        self.quitting = False
        self.closed = False

    def drain(self) -> None:
        self.machine.data_to_send()
        partial = None
        while (event := self.machine.next_event()) is not None:
            assert not self.closed, f"{event} after Closed"
            if isinstance(event, BodyWanted):
                assert event.handle in self.open
                assert self.body is None
                self.body = event.handle
            elif isinstance(event, BodyRefused):
                assert event.handle == self.body
                self.body = None
            elif isinstance(event, TransactionDone | TransactionRefused):
                assert event.handle in self.open, f"{event} ends a send twice"
                if event.handle == self.body:
                    # Only what a split send delivered, as the session fails mid-body.
                    assert isinstance(event, TransactionDone)
                    partial = event.handle
                self.open.discard(event.handle)
            elif isinstance(event, SessionFailed):
                self.open.clear()
                self.body = partial = None
            elif isinstance(event, Closed):
                self.closed = True
                self.body = None
        assert partial is None, "a send reported done while its body was still wanted"
        assert self.machine.state in {state for state, _ in TRANSITIONS} | {State.CLOSED}

    def act(self, action: str, arg: object, *more: object) -> None:
        machine = self.machine
        if action == "end?":  # one time in eight
            if arg == 0:
                ending = more[0]
                assert isinstance(ending, tuple)
                self.act(*ending)
            return
        if action == "reply":
            assert isinstance(arg, bytes)
            if machine._pending:  # a server answers commands (ENDINGS also speak unasked)
                machine.receive_data(arg)
        elif action == "send":
            assert isinstance(arg, int)
            people = [f"r{i}@d{i % 2}.example" for i in range(arg)]
            env = envelope(*people, all_or_nothing=more[0])
            if self.quitting or machine.state in (State.QUITTING, State.CLOSED):
                try:
                    machine.start_transaction(env)
                except UsageError:
                    return
                raise AssertionError("a send accepted while closing")
            handle = machine.start_transaction(env)
            self.handles.append(handle)
            self.open.add(handle)
        elif action == "chunk" and self.body is not None:
            assert isinstance(arg, bytes)
            machine.send_body(arg)
        elif action == "end" and self.body is not None:
            machine.end_body()
            self.body = None
        elif action == "cancel" and self.handles:
            assert isinstance(arg, int)
            handle = self.handles[arg % len(self.handles)]
            queued = handle in self.open and handle != self.body
            if machine.cancel(handle) and queued and not self._running(handle):
                self.open.discard(handle)  # dropped from the queue: no event
        elif action == "yes":
            assert isinstance(arg, int)
            for _ in range(arg):
                if machine._pending and machine.state is not State.CLOSED:
                    machine.receive_data(POSITIVE[machine._pending[0][0]])
                    self.drain()
        elif action == "say":
            assert isinstance(arg, bytes)
            machine.receive_data(arg)
        elif action == "quit":
            machine.quit()
            self.quitting = True
        elif action == "timeout":
            machine.timed_out()
        elif action == "lost":
            machine.connection_lost()
        self.drain()

    def _running(self, handle: Handle) -> bool:
        return any(txn.send.handle == handle for txn in self.machine._txns)


@seed(9422)
@FUZZ
@given(st.sampled_from([b"220 mx.test\r\n" + reply for reply in EHLO_REPLIES]), actions)
def test_every_send_ends_once_whatever_the_server_says(
    opening: bytes, steps: list[tuple[object, ...]]
) -> None:
    driver = Driver()
    driver.act("say", opening)  # a session set up, to reach transactions
    for action, arg, *more in steps:
        assert isinstance(action, str)
        driver.act(action, arg, *more)
    driver.machine.connection_lost()
    driver.drain()
    assert driver.closed
    assert not driver.open, f"sends never ended: {driver.open}"
