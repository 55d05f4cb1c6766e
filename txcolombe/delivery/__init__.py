"""Layer 3, delivery: mail to the recipients' own exchangers.

MX routing (:mod:`~txcolombe.delivery.routing`, :mod:`~txcolombe.delivery.dns`), the TLS
policy (:mod:`~txcolombe.delivery.tlspolicy`, :mod:`~txcolombe.delivery.mtasts`), bodies
per-recipient
results (:mod:`~txcolombe.delivery.outcome`) and :func:`~txcolombe.delivery.deliver.deliver`.

May import: :mod:`txcolombe.codec`, :mod:`txcolombe.client`, Twisted.
Never server, relay or testing.
"""
