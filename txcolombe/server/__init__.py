"""Layer 2, the server side of SMTP, beside the client.

A sans-I/O server state machine (:mod:`~txcolombe.server.machine`), its Twisted protocol
(:mod:`~txcolombe.server.protocol`) and the ``Received:`` trace line
(:mod:`~txcolombe.server.received`). Commands are parsed by :mod:`txcolombe.codec.command`.

May import: :mod:`txcolombe.codec`, Twisted. Never client, delivery, relay or testing.
The machine imports no Twisted at all.
"""
