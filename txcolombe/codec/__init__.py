"""Layer 1, the codec: SMTP as a pure description, no I/O and no Twisted.

Addresses (:mod:`~txcolombe.codec.address`), replies (:mod:`~txcolombe.codec.reply`),
commands (:mod:`~txcolombe.codec.command`), the steps of a conversation
(:mod:`~txcolombe.codec.step`), EHLO extensions (:mod:`~txcolombe.codec.extensions`),
DSN parameters (:mod:`~txcolombe.codec.dsn`), SASL mechanisms (:mod:`~txcolombe.codec.sasl`),
DATA encoding and decoding (:mod:`~txcolombe.codec.data`) and the closed set of errors
every layer reports (:mod:`~txcolombe.codec.errors`).

May import: the standard library and other codec modules only.
"""
