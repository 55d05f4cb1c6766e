"""The options of ``twistd smtprelay``, from the command line or a TOML file.

Every option may also be given in the file named by ``--config`` (keys as
the long option names, with ``-`` or ``_``); the command line wins. The
file's ``[shaping]`` section (traffic shaping, docs/shaping.md) has no
command-line form: it becomes ``options["shaping"]``, a
:class:`~txcolombe.delivery.shaping.config.ShapingSettings` (None without it).
"""

from __future__ import annotations

import ipaddress
import socket
import sys
import tomllib
from pathlib import Path
from typing import Any, ClassVar

from OpenSSL import SSL, crypto
from twisted.internet import endpoints
from twisted.python import usage

from txcolombe.delivery.shaping.config import ShapingConfigError, ShapingSettings, parse_shaping
from txcolombe.relay.signing import load_keys, parse_spec, parse_specs

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
        self["shaping"] = None
        self["dkim"] = []
        #: The options given on the command line: they win over the file.
        self._given: set[str] = set()
        for name in [p[0] for p in self.optParameters] + [f[0] for f in self.optFlags]:
            self._dispatch[name] = _Recorder(self._dispatch[name], name, self._given)

    def opt_listen(self, description: str) -> None:
        """Listen on this endpoint description (repeatable; tcp: plain+STARTTLS, ssl: implicit TLS; default tcp:port=10025:interface=127.0.0.1)."""  # noqa: E501
        self["listen"].append(description)

    def opt_relay_network(self, network: str) -> None:
        """Clients of this CIDR network may relay without AUTH (repeatable; default 127.0.0.0/8 and ::1/128)."""  # noqa: E501
        self["relay-network"].append(network)

    def opt_dkim(self, spec: str) -> None:
        """DKIM-sign mail from DOMAIN (From: header) of authenticated or relay-network clients with KEYFILE, published at SELECTOR (DOMAIN:SELECTOR:KEYFILE; repeatable; RSA or Ed25519 PEM)."""  # noqa: E501
        self["dkim"].append(parse_spec(spec))
        self._given.add("dkim")

    def parseOptions(self, options: list[str] | None = None) -> None:
        """Parse, and keep the arguments: a reload (SIGHUP) parses them again."""
        self.argv = list(sys.argv[1:] if options is None else options)
        super().parseOptions(self.argv)  # type: ignore[no-untyped-call]

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
        self._check_values()

    def _check_values(self) -> None:
        """Everything make_service would trip on later, as one usage error now."""
        if self["tls-cert"]:
            check_tls(self["tls-cert"], self["tls-key"])
        if self["users"]:
            check_users(self["users"])
        if self["smarthost-ca"]:
            _check_ca(self["smarthost-ca"])
        if self["smarthost"]:
            parse_host_port(self["smarthost"], 587, "--smarthost")
        if self["dns-server"]:
            parse_host_port(self["dns-server"], 53, "--dns-server")
        if self["mx-port"] is not None:
            _check_port(self["mx-port"], "--mx-port")
        for network in self["relay-network"]:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as error:
                raise usage.UsageError(f"--relay-network {network}: {error}") from None
        for name in ("max-size", "max-recipients", "concurrency"):
            if self[name] < 1:
                raise usage.UsageError(f"--{name} must be at least 1")
        for description in self["listen"]:
            check_endpoint(listen_description(self, description), "--listen")
        if self["metrics"]:
            check_endpoint(self["metrics"], "--metrics")
        load_keys(self["dkim"])

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
            if key == "shaping":
                self["shaping"] = _shaping(path, value)
            elif key == "dkim":
                specs = parse_specs(path, value)
                if "dkim" not in self._given:
                    self["dkim"] = specs
            elif key in MULTI:
                values = value if isinstance(value, list) else [value]
                if not all(isinstance(v, str) for v in values):
                    raise usage.UsageError(f"{path}: {raw_key} is a string or a list of strings")
                if not self[key]:
                    self[key] = list(values)
            elif key in flags:
                if not isinstance(value, bool):
                    raise usage.UsageError(f"{path}: {raw_key} is true or false")
                if key not in self._given:
                    self[key] = value
            elif key in defaults and key != "config":
                kind = coerce.get(key)
                if kind is None and not isinstance(value, str):
                    raise usage.UsageError(f"{path}: {raw_key} is a string")
                if kind is not None and (
                    isinstance(value, bool) or not isinstance(value, (int, float))
                ):
                    raise usage.UsageError(f"{path}: {raw_key} is a number")
                if key not in self._given:
                    self[key] = _coerced(value, kind)
            else:
                raise usage.UsageError(f"{path}: unknown option {raw_key!r}")


def _shaping(path: str, section: Any) -> ShapingSettings:
    try:
        return parse_shaping(section)
    except ShapingConfigError as error:
        raise usage.UsageError(f"{path}: {error}") from None


def check_tls(cert: str, key: str) -> None:
    """A PEM certificate (chain) and the private key that matches it."""
    try:
        context = SSL.Context(SSL.TLS_METHOD)
        context.use_certificate_chain_file(cert)
    except (SSL.Error, crypto.Error):
        raise usage.UsageError(f"--tls-cert {cert}: not a PEM certificate") from None
    try:
        context.use_privatekey_file(key)
    except (SSL.Error, crypto.Error):
        raise usage.UsageError(f"--tls-key {key}: not a PEM private key") from None
    try:
        context.check_privatekey()
    except SSL.Error:
        raise usage.UsageError(f"--tls-key {key} does not match --tls-cert {cert}") from None


def check_users(path: str) -> dict[str, str]:
    """The users file's entries, or a usage error saying what is wrong with it."""
    from txcolombe.relay.passwords import load_users

    try:
        return load_users(Path(path))
    except UnicodeDecodeError:
        raise usage.UsageError(f"--users {path}: not a text file") from None
    except (OSError, ValueError) as error:
        raise usage.UsageError(f"--users {error}") from None


def _check_ca(path: str) -> None:
    try:
        crypto.load_certificate(crypto.FILETYPE_PEM, Path(path).read_bytes())
    except crypto.Error:
        raise usage.UsageError(f"--smarthost-ca {path}: not a PEM certificate") from None


def _check_port(port: object, what: str) -> int:
    try:
        number = int(str(port))
    except ValueError:
        raise usage.UsageError(f"{what}: port {port!r} is not a number") from None
    if not 0 < number < 65536:
        raise usage.UsageError(f"{what}: port {number} is not between 1 and 65535")
    return number


def parse_host_port(text: str, default_port: int, what: str) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT``, ``[IPv6]`` or ``[IPv6]:PORT``, the port checked."""
    host, port = text, str(default_port)
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise usage.UsageError(f"{what} {text}: expected [ADDRESS]:PORT")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host:
        raise usage.UsageError(f"{what} {text}: no host")
    return host, _check_port(port, f"{what} {text}")


def listen_description(options: Any, description: str) -> str:
    """``description`` with ``--tls-cert``/``--tls-key`` added to an implicit TLS one."""
    if description.split(":")[0] not in ("ssl", "tls") or "privateKey" in description:
        return description
    if not options["tls-cert"]:
        raise usage.UsageError(f"{description}: implicit TLS needs --tls-cert/--tls-key")
    cert, key = _escape(options["tls-cert"]), _escape(options["tls-key"])
    return f"{description}:certKey={cert}:privateKey={key}"


#: The parameters of an ``ssl:`` description that a plain TCP listener also takes.
_TCP_PARAMETERS = ("port", "interface", "backlog")


def implicit_tls_tcp(description: str) -> str | None:
    """The ``tcp:`` description under an implicit-TLS one that takes its
    certificate from ``--tls-cert``/``--tls-key`` (no TLS parameter of its
    own), or None (not implicit TLS, or a certificate of its own).

    Such a listener is made as TCP with TLS on top, so that it serves the
    certificate of the moment: a SIGHUP's new one applies to it too.
    """
    fields = _fields(description)
    if fields[0] not in ("ssl", "tls"):
        return None
    for field in fields[1:]:
        key, sep, _ = field.partition("=")
        if sep and key not in _TCP_PARAMETERS:
            return None
    return ":".join(["tcp", *fields[1:]])


def _fields(description: str) -> list[str]:
    """``description`` split at its unescaped colons (escapes kept)."""
    fields: list[str] = []
    current: list[str] = []
    escaped = False
    for char in description:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields.append("".join(current))
            current = []
            continue
        current.append(char)
    fields.append("".join(current))
    return fields


def _escape(path: str) -> str:
    return path.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def check_endpoint(description: str, what: str) -> None:
    """A server endpoint description twistd can listen on (type, port range)."""
    from twisted.internet import reactor

    try:
        endpoint = endpoints.serverFromString(reactor, description)  # type: ignore[no-untyped-call]
    except Exception as error:
        raise usage.UsageError(f"{what} {description}: {error}") from None
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int):
        _check_port(port, f"{what} {description}")


def check_free(description: str, what: str) -> None:
    """Fail now, before twistd daemonises, if a TCP endpoint's port is taken.

    A probe (bind, then close): a port taken in the instant between this and
    the real listen still fails, but as a logged start-up error.
    """
    from twisted.internet import reactor

    endpoint = endpoints.serverFromString(reactor, description)  # type: ignore[no-untyped-call]
    port, interface = getattr(endpoint, "_port", None), getattr(endpoint, "_interface", None)
    if not isinstance(port, int) or not isinstance(interface, str):
        return
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((interface, port))
        except OSError as error:
            raise usage.UsageError(f"{what} {description}: {error.strerror or error}") from None


def _check_readable(option: str, path: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as error:
        reason = error.strerror or str(error)
        raise usage.UsageError(f"--{option} {path}: cannot read: {reason}") from None


class _Recorder:
    """Wraps one option's handler to note that the command line gave it."""

    def __init__(self, handler: Any, name: str, given: set[str]) -> None:
        self.handler = handler
        self.name = name
        self.given = given

    def __call__(self, name: str, value: Any) -> None:
        self.given.add(self.name)
        if isinstance(self.handler, usage.CoerceParameter):
            self.handler.dispatch(name, value)  # type: ignore[no-untyped-call]
        else:
            self.handler(name, value)


def _coerced(value: Any, kind: Any) -> Any:
    if value is None or kind is None:
        return value
    return kind(value)
