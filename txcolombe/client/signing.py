"""DKIM-signed bodies: any supported body, with ``DKIM-Signature`` fields in front.

Signing needs the body hash before the first byte is sent, so a body is
read twice: a hash pass, then the send pass. Bodies that can be read again
(bytes, ``email.message.Message``, regular files, ``BytesIO``) are used as
they are; any other is first spooled to a temporary file, as
:func:`txcolombe.delivery.deliver` does (:class:`~txcolombe.client.replay.ReplayableBody`).
Both passes go chunk by chunk, so memory stays bounded whatever the size.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import Any, Union

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IConsumer, IProducer
from twisted.internet.task import Cooperator
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from txcolombe.client.body import Body, body_producer, until_stopped
from txcolombe.client.replay import ReplayableBody
from txcolombe.codec.dkim import DKIMSigner, MessageSigner
from txcolombe.codec.errors import InvalidArgument

__all__ = ["DKIM", "signed_body", "signed_producer", "signed_replayable", "signers"]

#: What ``dkim=`` takes: one signer, several (one signature each), or None.
DKIM = Union[DKIMSigner, Iterable[DKIMSigner], None]  # noqa: UP007


def signers(dkim: DKIM) -> list[DKIMSigner]:
    """The signers ``dkim=`` names, in order.

    :raises InvalidArgument: something that is not a :class:`DKIMSigner`.
    """
    if dkim is None:
        return []
    found = [dkim] if isinstance(dkim, DKIMSigner) else list(dkim)
    for signer in found:
        if not isinstance(signer, DKIMSigner):
            raise InvalidArgument(f"dkim= takes DKIMSigner objects, not {type(signer).__name__}")
    return found


@implementer(IConsumer)
class _HashConsumer:
    """Feeds the hash pass to a :class:`MessageSigner`; can abort it."""

    def __init__(self, message: MessageSigner) -> None:
        self.message = message
        self.stopped = False

    def write(self, data: bytes) -> None:
        if self.stopped:
            raise CancelledError("the signed body was stopped")
        self.message.feed(data)

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


async def signed_replayable(body: Body, dkim: DKIM) -> ReplayableBody:
    """``body`` as a :class:`ReplayableBody`, signed by each of ``dkim``'s signers.

    The caller closes the result (it may own a spool file).

    :raises UsageError: an unsupported body or a wrong ``dkim=``.
    :raises InvalidBody: the body could not be read or has no From field.
    """
    found = signers(dkim)
    replayable = await ReplayableBody.of(body)
    if not found:
        return replayable
    return await _signed(replayable, _HashConsumer(MessageSigner(found)))


async def _signed(replayable: ReplayableBody, consumer: _HashConsumer) -> ReplayableBody:
    """The hash pass over ``replayable``; the result has the signatures in front."""
    producer = replayable.producer()
    try:
        await producer.startProducing(consumer)  # type: ignore[no-untyped-call]
        signatures = consumer.message.finish()
    except BaseException:
        # Cancelled: read no more (a pass that failed by itself may complain).
        with contextlib.suppress(Exception):
            producer.stopProducing()  # type: ignore[no-untyped-call]
        replayable.close()
        raise
    return replayable.with_prefix(signatures)


@implementer(IBodyProducer)
class _ReplayProducer:
    """A :class:`ReplayableBody` as a producer that can be started again."""

    def __init__(self, body: ReplayableBody) -> None:
        self.length = body.length
        self._body = body
        self._current: IBodyProducer | None = None

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._current = self._body.producer()
        done: Deferred[None] = self._current.startProducing(consumer)  # type: ignore[no-untyped-call]
        return done

    def pauseProducing(self) -> None:
        if self._current is not None:
            self._current.pauseProducing()

    def resumeProducing(self) -> None:
        if self._current is not None:
            self._current.resumeProducing()

    def stopProducing(self) -> None:
        if self._current is not None:
            self._current.stopProducing()  # type: ignore[no-untyped-call]


@contextlib.asynccontextmanager
async def signed_body(body: Body, dkim: DKIM) -> AsyncIterator[Body]:
    """``body`` signed (a producer of known length that can be sent again);
    ``body`` itself without signers. Its spool is removed on exit."""
    found = signers(dkim)  # once: dkim may be an iterator
    if not found:
        yield body
        return
    replayable = await signed_replayable(body, found)
    try:
        yield _ReplayProducer(replayable)
    finally:
        replayable.close()


@implementer(IBodyProducer)
class _SigningProducer:
    """Signs when started (hash pass, then send pass): for a send that is
    queued at once, so that its place in the pipeline stays where it was."""

    length: Any = UNKNOWN_LENGTH  # known only once signed

    def __init__(self, body: Body, dkim: list[DKIMSigner]) -> None:
        self._body = body
        self._hashing = _HashConsumer(MessageSigner(dkim))
        self._replayable: ReplayableBody | None = None
        self._current: IBodyProducer | None = None
        self._paused = False
        self._stopped = False

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        return until_stopped(Deferred.fromCoroutine(self._run(consumer)), lambda: self._stopped)

    async def _run(self, consumer: IConsumer) -> None:
        spooled = await ReplayableBody.of(self._body)
        self._replayable = replayable = await _signed(spooled, self._hashing)
        try:
            if self._stopped:
                return
            self._current = replayable.producer()
            sent: Deferred[None] = self._current.startProducing(consumer)  # type: ignore[no-untyped-call]
            if self._paused:
                self._current.pauseProducing()
            await sent
        finally:
            replayable.close()

    def pauseProducing(self) -> None:
        self._paused = True
        if self._current is not None:
            self._current.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        if self._current is not None:
            self._current.resumeProducing()

    def stopProducing(self) -> None:
        self._stopped = True
        self._hashing.stopped = True
        if self._current is not None:
            # A stopped producer never finishes: remove the spool now.
            self._current.stopProducing()  # type: ignore[no-untyped-call]
            assert self._replayable is not None
            self._replayable.close()


def signed_producer(
    body: Body, dkim: DKIM, *, cooperator: Cooperator | None = None
) -> IBodyProducer:
    """``body`` as a producer, signed when it starts if ``dkim`` names signers.

    The signed producer's length is unknown (no SIZE): use
    :func:`signed_body` first where the send can wait for the hash pass.
    """
    found = signers(dkim)
    if not found:
        return body_producer(body, cooperator=cooperator)
    return _SigningProducer(body, found)
