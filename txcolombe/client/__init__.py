"""Layer 2, the client: one SMTP conversation and the sends that ride on it.

The sans-I/O state machine (:mod:`~txcolombe.client.machine`, with its events
:mod:`~txcolombe.client.events`, state table :mod:`~txcolombe.client.states`, envelope
checks :mod:`~txcolombe.client.envelope` and recipient splits
:mod:`~txcolombe.client.recipients`), its Twisted driver
(:mod:`~txcolombe.client.protocol`), body producers (:mod:`~txcolombe.client.body`),
endpoints and TLS (:mod:`~txcolombe.client.connect`), sessions and the pool
(:mod:`~txcolombe.client.session`, :mod:`~txcolombe.client.pool`), what a send returns
(:mod:`~txcolombe.client.receipt`), the caller's options (:mod:`~txcolombe.client.options`)
and the ``sendmail``/``submit`` facade (:mod:`~txcolombe.client.api`).

May import: :mod:`txcolombe.codec`, Twisted. Never delivery, server, relay or testing.
Those five import no Twisted at all.
"""
