"""The ``txcolombe`` command: send one message from the command line.

    python -m txcolombe send --server smtp.example.com --mode submit --port 587 \\
        --from alice@example.com --to bob@example.org --user alice \\
        --password-file ~/.smtp-password --body message.eml

The message (headers and body, as it should arrive) is read as bytes from
``--body`` or standard input and streamed to the server as it is read. The
password is never taken from the command line: it comes from the first line
of ``--password-file`` or, when standard input is a terminal, from a prompt.

Exit status: 0 when every recipient accepted the message; 3 when the message
was delivered to some recipients and refused for others; 1 on a permanent
error; 75 (``EX_TEMPFAIL``) on a temporary error (retrying later may work);
2 on a usage error (bad options, unreadable file, malformed address).
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, NoReturn, cast

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogBeginner,
)
from twisted.python.failure import Failure
from zope.interface import provider

from txcolombe.client.api import SMTP_PORT, SUBMISSION_PORT, SUBMISSIONS_PORT, sendmail, submit
from txcolombe.client.connect import IOpenSSLTrustRoot
from txcolombe.client.options import Timeouts
from txcolombe.client.receipt import Receipt
from txcolombe.codec.address import parse_domain, parse_recipient, parse_sender
from txcolombe.codec.errors import (
    InvalidAddress,
    RecipientsRefused,
    SMTPError,
    TLSFailure,
    UsageError,
)
from txcolombe.codec.reply import Reply
from txcolombe.codec.sasl import Authentication, Mechanism
from txcolombe.progress import CountingFile, ProgressDisplay

__all__ = [
    "EXIT_OK",
    "EXIT_PARTIAL",
    "EXIT_PERMANENT",
    "EXIT_TEMPORARY",
    "EXIT_USAGE",
    "build_parser",
    "describe_error",
    "main",
    "start_logging",
]

EXIT_OK = 0
EXIT_PERMANENT = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_TEMPORARY = 75  # sysexits.h EX_TEMPFAIL
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

_EPILOG = """\
exit status:
  0   the message was accepted for every recipient
  3   the message was accepted for some recipients and refused for others
      (each refused recipient is listed with the server's reply)
  1   permanent error: retrying will fail again
  75  temporary error (EX_TEMPFAIL): retrying later may succeed
  2   usage error: bad options, unreadable file, malformed address or message
  130 interrupted (Ctrl-C)

The message is read as bytes (headers, blank line, body) and streamed.
The password is read from the first line of --password-file, or prompted
for when standard input is a terminal; it is never taken from the command
line. -v shows the SMTP conversation with credentials masked.
"""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors name the command and exit with 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``txcolombe`` argument parser (one sub-command: ``send``)."""
    parser = _Parser(
        prog="txcolombe",
        description="Send email over SMTP with txcolombe.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    send = commands.add_parser(
        "send",
        help="send one message",
        description="Send one message, straight to a server (sendmail) or "
        "through a submission server (submit).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    where = send.add_argument_group("server")
    where.add_argument(
        "--server", required=True, metavar="HOST", help="host name or IP address of the SMTP server"
    )
    where.add_argument(
        "--port",
        type=_port,
        metavar="N",
        help=f"TCP port (default: {SMTP_PORT} for sendmail, {SUBMISSIONS_PORT} for submit)",
    )
    where.add_argument(
        "--mode",
        choices=("sendmail", "submit"),
        default="sendmail",
        help="sendmail: deliver directly, STARTTLS when offered (default); "
        f"submit: TLS required, implicit TLS unless port {SUBMISSION_PORT} "
        "or --starttls",
    )
    where.add_argument(
        "--starttls",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="sendmail: --no-starttls stays in plaintext; submit: "
        "--starttls uses (required) STARTTLS instead of implicit TLS",
    )
    where.add_argument(
        "--ca-file",
        type=Path,
        metavar="PEM",
        help="verify the server's certificate against the CA "
        "certificates in this PEM file (default: the system's)",
    )
    where.add_argument(
        "--helo", metavar="NAME", help="the name given in EHLO (default: this host's FQDN)"
    )
    where.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        help="seconds to wait at each step: connect, each reply, each body write"
        " (default: RFC 5321's, 30 s to connect and up to 10 minutes a reply)",
    )

    envelope = send.add_argument_group("message")
    envelope.add_argument(
        "--from",
        dest="sender",
        required=True,
        metavar="ADDR",
        help='the envelope sender; "" for the null sender <>',
    )
    envelope.add_argument(
        "--to",
        dest="recipients",
        action="append",
        required=True,
        metavar="ADDR",
        help="an envelope recipient (repeatable)",
    )
    envelope.add_argument(
        "--body",
        default="-",
        metavar="PATH",
        help='the message file, or "-" for standard input (default)',
    )
    envelope.add_argument(
        "--all-or-nothing",
        action="store_true",
        help="send nothing unless every recipient is accepted",
    )

    auth = send.add_argument_group("authentication")
    auth.add_argument("--user", metavar="NAME", help="authenticate as NAME (only over TLS)")
    auth.add_argument(
        "--password-file",
        type=Path,
        metavar="PATH",
        help="read the password from the first line of PATH "
        "(default: prompt, if standard input is a terminal)",
    )
    auth.add_argument(
        "--mechanism",
        type=str.upper,
        choices=[m.value for m in Mechanism if not m.uses_token],
        default=None,
        help="SASL mechanism (default: the strongest the server offers:"
        " SCRAM-SHA-256, then PLAIN, then LOGIN)",
    )

    send.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show the bytes sent and the rate on standard error"
        " (default: when standard error is a terminal)",
    )
    send.add_argument(
        "-v", "--verbose", action="store_true", help="show the SMTP conversation on standard error"
    )
    return parser


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port out of range: {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("the timeout must be positive")
    return value


# -- reading the options --------------------------------------------------------


class _Invalid(Exception):
    """A usage error found after parsing (file, password, address)."""


def _read_password(args: argparse.Namespace) -> str:
    path: Path | None = args.password_file
    if path is not None:
        try:
            with path.open("rb") as file:
                line: bytes = file.readline()
        except OSError as error:
            raise _Invalid(f"cannot read the password file: {error}") from None
        try:
            password = line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise _Invalid("the password file is not UTF-8") from None
        if not password:
            raise _Invalid(f"the first line of {path} is empty")
        return password
    if not sys.stdin.isatty():
        raise _Invalid(
            "--user needs --password-file when standard input is not a terminal "
            "(the password is never taken from the command line)"
        )
    try:
        return getpass.getpass(f"Password for {args.user} at {args.server}: ")
    except (EOFError, KeyboardInterrupt):
        raise _Invalid("no password given") from None


def _read_trust_root(path: Path) -> IOpenSSLTrustRoot:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise _Invalid(f"cannot read the CA file: {error}") from None
    marker = b"-----BEGIN CERTIFICATE-----"
    blocks = [marker + block for block in data.split(marker)[1:]]
    if not blocks:
        raise _Invalid(f"{path} holds no PEM certificate")
    try:
        certificates = [Certificate.loadPEM(block) for block in blocks]
    except Exception as error:  # OpenSSL's errors have no common useful base
        raise _Invalid(f"{path} holds an invalid certificate: {error}") from None
    if len(certificates) == 1:
        single: Any = certificates[0]  # a Certificate is an IOpenSSLTrustRoot
        return cast(IOpenSSLTrustRoot, single)
    several: Any = trustRootFromCertificates(certificates)  # type: ignore[no-untyped-call]
    return cast(IOpenSSLTrustRoot, several)


def _open_body(spec: str) -> IO[bytes]:
    if spec == "-":
        return sys.stdin.buffer
    try:
        return Path(spec).open("rb")
    except OSError as error:
        raise _Invalid(f"cannot open the message: {error}") from None


def _prepare(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments for sendmail/submit; raises _Invalid."""
    try:
        parse_sender(args.sender)
        for recipient in args.recipients:
            parse_recipient(recipient)
        if args.helo is not None:
            parse_domain(args.helo)
    except InvalidAddress as error:
        raise _Invalid(error.message) from None
    options: dict[str, Any] = {"all_or_nothing": args.all_or_nothing}
    if args.port is not None:
        options["port"] = args.port
    if args.helo is not None:
        options["domain"] = args.helo
    if args.timeout is not None:
        options["timeouts"] = _timeouts(args.timeout)
    if args.starttls is not None:
        options["starttls"] = args.starttls
    if args.mode == "sendmail" and args.starttls is False and args.user is not None:
        raise _Invalid("--user needs TLS: it cannot go with --no-starttls in sendmail mode")
    if args.password_file is not None and args.user is None:
        raise _Invalid("--password-file needs --user")
    if args.ca_file is not None:
        options["trust_root"] = _read_trust_root(args.ca_file)
    if args.user is not None:
        try:
            options["authentication"] = Authentication(
                args.user,
                _read_password(args),
                Mechanism(args.mechanism) if args.mechanism else None,
            )
        except UsageError as error:
            raise _Invalid(error.message) from None
    return options


def _timeouts(seconds: float) -> Timeouts:
    """``--timeout`` for every step, so a silent server cannot hang the command;
    the QUIT grace is never longer than its default."""
    every = {field.name: seconds for field in dataclasses.fields(Timeouts)}
    every["quit"] = min(seconds, Timeouts.quit)
    return Timeouts(**every)


# -- output ----------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " / ".join(part for part in text.splitlines() if part) or text


def describe_error(error: BaseException) -> str:
    """One line: class, step, code and enhanced status, and the server's text."""
    name = type(error).__name__
    if not isinstance(error, SMTPError):
        return f"{name}: {error}"
    where = f" at {error.step.value}" if error.step is not None else ""
    if error.code is not None:
        parts = [str(error.code)]
        if error.enhanced_status is not None:
            parts.append(".".join(map(str, error.enhanced_status)))
        if error.text:
            parts.append(_one_line(error.text))
        detail = " ".join(parts)
    else:
        detail = _one_line(error.message)
    return f"{name}{where}: {detail}"


def _reply_line(reply: Reply) -> str:
    return _one_line(str(reply))


def _print_receipt(receipt: Receipt, out: IO[str]) -> None:
    for recipient, reply in receipt.accepted.items():
        print(f"accepted <{recipient}>: {_reply_line(reply)}", file=out)
    for recipient, reply in receipt.refused.items():
        print(f"refused <{recipient}>: {_reply_line(reply)}", file=out)
    print(f"message: {_reply_line(receipt.reply)}", file=out)
    print(f"queue id: {receipt.queue_id or '(none given)'}", file=out)
    if receipt.tls is None:
        print("tls: none (plaintext)", file=out)
    else:
        how = "implicit TLS" if receipt.tls.implicit else "STARTTLS"
        print(f"tls: {receipt.tls.version} {receipt.tls.cipher} ({how})", file=out)


def _exit_code(error: BaseException) -> int:
    if isinstance(error, UsageError):
        return EXIT_USAGE
    if isinstance(error, TLSFailure) and "certificate" in error.message:
        # An untrusted or mismatched certificate stays so until someone acts.
        return EXIT_PERMANENT
    if isinstance(error, SMTPError) and error.temporary:
        return EXIT_TEMPORARY
    return EXIT_PERMANENT


# -- logging -------------------------------------------------------------------------


def start_logging(verbose: bool, *, out: IO[str] | None = None, indent: str = "") -> None:
    """Print Twisted's log: errors from anywhere, and txcolombe's debug events
    (the SMTP conversation, credentials masked) when ``verbose``.

    :param out: where to print (default: standard error).
    :param indent: put before each line.
    """

    @provider(ILogObserver)
    def show(event: LogEvent) -> None:
        text = formatEvent(event)
        failure = event.get("log_failure")
        if isinstance(failure, Failure) and verbose:
            text = f"{text}\n{failure.getTraceback()}"
        namespace = str(event.get("log_namespace", ""))
        prefix = "" if namespace.startswith("txcolombe") else f"[{namespace}] "
        print(f"{indent}{prefix}{text}", file=out or sys.stderr, flush=True)

    levels = LogLevelFilterPredicate(defaultLogLevel=LogLevel.error)
    if verbose:
        levels.setLogLevelForNamespace("txcolombe", LogLevel.debug)

    observer = FilteringLogObserver(show, [levels])
    globalLogBeginner.beginLoggingTo([observer], discardBuffer=True, redirectStandardIO=False)


# -- running -------------------------------------------------------------------------


async def _send(
    reactor: IReactorThreads, args: argparse.Namespace, options: dict[str, Any], body: IO[bytes]
) -> None:
    function = submit if args.mode == "submit" else sendmail
    display = None
    if args.progress:
        counting = CountingFile(body)
        body = cast(IO[bytes], counting)
        clock = cast(IReactorTime, reactor)  # react() gives the whole reactor
        display = ProgressDisplay(counting, sys.stderr, clock, terminal=sys.stderr.isatty())
        display.start()
    sending = function(args.server, args.sender, args.recipients, body, reactor=reactor, **options)
    interrupted = False

    def interrupt(signum: int, frame: object) -> None:
        nonlocal interrupted
        interrupted = True
        reactor.callFromThread(sending.cancel)

    signal.signal(signal.SIGINT, interrupt)
    try:
        receipt = await sending
    except CancelledError:
        if not interrupted:
            raise
        print(
            "error: interrupted before the server confirmed the message",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as error:
        if isinstance(error, RecipientsRefused):
            for recipient, reply in error.refused.items():
                print(f"refused <{recipient}>: {_reply_line(reply)}", flush=True)
        if args.verbose and not isinstance(error, SMTPError):
            traceback.print_exc(file=sys.stderr)
        print(f"error: {describe_error(error)}", file=sys.stderr, flush=True)
        if isinstance(error, TLSFailure) and "wrong version number" in error.message:
            # Implicit TLS met a server that speaks plaintext first.
            print(
                "hint: this port seems to expect STARTTLS, not implicit TLS:"
                " add --starttls (or use port 587)",
                file=sys.stderr,
                flush=True,
            )
        raise SystemExit(_exit_code(error)) from None
    finally:
        if display is not None:
            display.stop()
        if args.body != "-":
            body.close()
    _print_receipt(receipt, sys.stdout)
    sys.stdout.flush()
    if receipt.refused:
        raise SystemExit(EXIT_PARTIAL)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line; always ends the process with its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = _prepare(args)
        body = _open_body(args.body)
    except _Invalid as error:
        print(f"txcolombe send: error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    if body is sys.stdin.buffer and sys.stdin.isatty():
        print("reading the message from the terminal; end it with Ctrl-D", file=sys.stderr)
    if args.progress is None:
        args.progress = sys.stderr.isatty()
    start_logging(args.verbose)

    from twisted.internet.task import react

    react(_send, (args, options, body))
