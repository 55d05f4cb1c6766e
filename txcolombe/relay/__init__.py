"""``twistd smtprelay``: a durable SMTP relay built on txcolombe.

Modules: :mod:`~txcolombe.relay.spool` (durable queue files, group commit),
:mod:`~txcolombe.relay.committer` (the spool's file work, in a child process;
started by :mod:`~txcolombe.relay.child`),
:mod:`~txcolombe.relay.queue` (per-recipient state, retries, bounces),
:mod:`~txcolombe.relay.transport` (smarthost and MX delivery),
:mod:`~txcolombe.relay.bounce` (RFC 3464 reports),
:mod:`~txcolombe.relay.passwords` (salted password hashes),
:mod:`~txcolombe.relay.options` and :mod:`~txcolombe.relay.service` (the plugin),
:mod:`~txcolombe.relay.control` (queue commands).
"""
