"""The options of ``twistd smtprelay``, from the command line or a TOML file.

Every option may also be given in the file named by ``--config`` (keys as
the long option names, with ``-`` or ``_``); the command line wins.
"""

from __future__ import annotations

import tomllib
from typing import Any, ClassVar

from twisted.python import usage

DEFAULT_LISTEN = "tcp:port=10025:interface=127.0.0.1"
DEFAULT_SPOOL = "smtprelay-spool"

#: Options that may be given several times (lists in the config file).
MULTI = ("listen", "relay-network")

#: Options naming a file read at startup: checked in ``postOptions`` so that a
#: missing or unreadable one is a usage error, not a traceback from twistd.
FILES = ("tls-cert", "tls-key", "users", "smarthost-auth", "smarthost-ca")


class Options(usage.Options):
    """twistd smtprelay [options]"""

    synopsis = "[options]"
    longdesc = (
        "A durable SMTP relay: accepts mail (ESMTP, STARTTLS, AUTH under TLS), "
        "spools it with fsync before answering 250, and forwards it to a smarthost "
        "or to the recipients' MX hosts, with retries and RFC 3464 bounces. "
        "With no options it listens on 127.0.0.1 port 10025, spools in "
        "./smtprelay-spool and delivers to the recipients' exchangers."
    )

    optFlags: ClassVar[list[list[Any]]] = [
        ["bounce-full", None, "Attach the whole original message to bounces (default: headers)."],
    ]

    optParameters: ClassVar[list[list[Any]]] = [
        ["config", "c", None, "TOML file with any of these options (the command line wins)."],
        ["hostname", None, None, "Our name in the greeting and Received headers (default: FQDN)."],
        ["tls-cert", None, None, "PEM certificate (chain) for STARTTLS and implicit TLS."],
        ["tls-key", None, None, "PEM private key for --tls-cert."],
        ["users", None, None,
         "AUTH users file (salted scrypt hashes, made with python -m txcolombe.relay.passwords). "
         "AUTH is offered only under TLS."],
        ["spool", None, DEFAULT_SPOOL, "Spool directory (created, mode 0700)."],
        ["smarthost", None, None,
         "Send everything to HOST[:PORT] (default port 587) instead of the recipients' MX."],
        ["smarthost-tls", None, None,
         "TLS to the smarthost: implicit, starttls, opportunistic or none "
         "(default: implicit for port 465, starttls otherwise)."],
        ["smarthost-auth", None, None,
         "File with the smarthost credentials: one line 'user:password' (keep it 0600)."],
        ["smarthost-auth-mechanism", None, None,
         "SASL mechanism for the smarthost (PLAIN, LOGIN, SCRAM-SHA-256...; "
         "default: the strongest it offers)."],
        ["smarthost-ca", None, None, "PEM CA to verify the smarthost with (default: system)."],
        ["postmaster", None, None, "Where undeliverable bounces go (default: kept on hold)."],
        ["max-size", None, 10240000, "Largest message accepted, in octets (SIZE).", int],
        ["max-recipients", None, 100, "Most recipients per message (452 beyond).", int],
        ["min-backoff", None, 300, "First retry after this many seconds.", float],
        ["max-backoff", None, 4000, "Longest wait between retries, in seconds.", float],
        ["queue-lifetime", None, 432000, "Give up (bounce) after this many seconds.", float],
        ["delay-warning", None, 0, "Warn the sender once after this many seconds (0: never).",
         float],
        ["concurrency", None, 10, "Most simultaneous deliveries per destination.", int],
        ["log-format", None, "kv", "Delivery log lines: kv (key=value) or json."],
        ["metrics", None, None,
         "Serve counters as Prometheus text on this endpoint (e.g. tcp:9125:interface=127.0.0.1)."],
        ["idle-timeout", None, 300, "Drop SMTP clients idle this many seconds.", float],
        ["max-connections", None, 100, "Most SMTP clients at once (421 beyond).", int],
        ["max-connections-per-client", None, 50,
         "Most SMTP connections from one address outside --relay-network (421 beyond).", int],
        ["soft-error-limit", None, 10, "Errors after which each error reply waits --error-sleep.",
         int],
        ["hard-error-limit", None, 20, "Errors after which the client is dropped (421).", int],
        ["error-sleep", None, 1.0, "Seconds each error reply waits past --soft-error-limit.",
         float],
        ["queue-minfree", None, 0,
         "Free octets the spool keeps (452 to MAIL below; at least 1.5 x --max-size).", int],
        ["dns-server", None, None,
         "MX mode: ask this DNS server (HOST:PORT) instead of the system's resolvers."],
        ["mx-port", None, None, "MX mode: connect to exchangers on this port (default 25).", int],
    ]  # fmt: skip

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["listen"] = []
        self["relay-network"] = []

    def opt_listen(self, description: str) -> None:
        """Listen on this endpoint description (repeatable; tcp: plain+STARTTLS, ssl: implicit TLS; default tcp:port=10025:interface=127.0.0.1)."""  # noqa: E501
        self["listen"].append(description)

    def opt_relay_network(self, network: str) -> None:
        """Clients of this CIDR network may relay without AUTH (repeatable; default 127.0.0.0/8 and ::1/128)."""  # noqa: E501
        self["relay-network"].append(network)

    def postOptions(self) -> None:
        if self["config"]:
            self._apply_config(self["config"])
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if not self["relay-network"]:
            self["relay-network"] = ["127.0.0.0/8", "::1/128"]
        if self["log-format"] not in ("kv", "json"):
            raise usage.UsageError("--log-format is kv or json")
        if bool(self["tls-cert"]) != bool(self["tls-key"]):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        if self["users"] and not self["tls-cert"]:
            raise usage.UsageError("--users needs TLS (--tls-cert/--tls-key): AUTH is TLS-only")
        if self["smarthost-tls"] not in (None, "implicit", "starttls", "opportunistic", "none"):
            raise usage.UsageError("--smarthost-tls is implicit, starttls, opportunistic or none")
        for option in FILES:
            if self[option]:
                _check_readable(option, self[option])

    def _apply_config(self, path: str) -> None:
        try:
            with open(path, "rb") as f:
                config: dict[str, Any] = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise usage.UsageError(f"cannot read {path}: {error}") from None
        defaults = {p[0]: p[2] for p in self.optParameters}
        coerce = {p[0]: p[4] for p in self.optParameters if len(p) > 4}
        flags = {f[0] for f in self.optFlags}
        for raw_key, value in config.items():
            key = raw_key.replace("_", "-")
            if key in MULTI:
                if not self[key]:
                    self[key] = list(value) if isinstance(value, list) else [str(value)]
            elif key in flags:
                self[key] = self[key] or bool(value)
            elif key in defaults and key != "config":
                if self[key] == _coerced(defaults[key], coerce.get(key)):
                    self[key] = _coerced(value, coerce.get(key))
            else:
                raise usage.UsageError(f"{path}: unknown option {raw_key!r}")


def _check_readable(option: str, path: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as error:
        reason = error.strerror or str(error)
        raise usage.UsageError(f"--{option} {path}: cannot read: {reason}") from None


def _coerced(value: Any, kind: Any) -> Any:
    if value is None or kind is None:
        return value
    return kind(value)
