"""SASL client mechanisms (RFC 4954), as pure challenge/response steps.

A mechanism object knows nothing of sockets: :meth:`SASLClient.auth_command`
gives the AUTH line (with the initial response when it fits),
:meth:`SASLClient.respond` answers each 334 challenge and
:meth:`SASLClient.check_success` vets the final 235. Credentials are validated
when :class:`Authentication` is made, never sent on a line with CR, LF or NUL.

Mechanisms: SCRAM-SHA-256 (RFC 5802, RFC 7677; the server's signature is
verified; the messages, keys and SASLprep are :mod:`scramp`'s), PLAIN
(RFC 4616), LOGIN, CRAM-MD5 (RFC 2195; only when named), XOAUTH2 and
OAUTHBEARER (RFC 7628) with a bearer token. With no mechanism named,
:func:`choose_mechanism` takes the strongest the server offers.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import hashlib
import hmac
import inspect
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import scramp
import scramp.utils

from txcolombe.codec.errors import InvalidChallenge, InvalidCredentials, Step, UsageError

__all__ = [
    "COMMAND_LINE_LIMIT",
    "MAX_SCRAM_ITERATIONS",
    "MIN_SCRAM_ITERATIONS",
    "Authentication",
    "Mechanism",
    "SASLClient",
    "TokenProvider",
    "choose_mechanism",
    "decode_base64",
    "decode_challenge",
    "encode_initial",
    "encode_response",
    "refuse_without_tls",
    "resolve_token",
    "saslprep",
]

#: A bearer token, or what gives one: called once per connection, it may
#: return the token or an awaitable of it (a Twisted Deferred, a coroutine).
TokenProvider: TypeAlias = Callable[[], str | Awaitable[str]]

#: RFC 7677 §4: a server's iteration count SHOULD be at least 4096; fewer
#: would make a proof captured by an impostor cheap to attack offline
#: (:mod:`scramp` refuses fewer in any case).
MIN_SCRAM_ITERATIONS = 4096
#: Above this the key derivation would block for too long (about 0.3 s per
#: million iterations): a server asking for more is refused.
MAX_SCRAM_ITERATIONS = 1_000_000

#: RFC 5321 §4.5.3.1.4: a command line is at most 512 octets with its CRLF.
COMMAND_LINE_LIMIT = 512


class Mechanism(enum.Enum):
    """The SASL mechanisms txcolombe speaks."""

    SCRAM_SHA_256 = "SCRAM-SHA-256"
    PLAIN = "PLAIN"
    LOGIN = "LOGIN"
    CRAM_MD5 = "CRAM-MD5"
    XOAUTH2 = "XOAUTH2"
    OAUTHBEARER = "OAUTHBEARER"

    @property
    def uses_token(self) -> bool:
        """True for the OAuth 2 mechanisms, which take a bearer token, not a password."""
        return self in (Mechanism.XOAUTH2, Mechanism.OAUTHBEARER)


# Strongest first. CRAM-MD5 is never chosen unless named: it needs the password
# stored in clear on the server and its MD5 challenge-response is weak.
_PASSWORD_PREFERENCE: tuple[Mechanism, ...] = (
    Mechanism.SCRAM_SHA_256,
    Mechanism.PLAIN,
    Mechanism.LOGIN,
)
# One-message mechanisms that repeat their initial response once should the
# server ask for it with an empty challenge after the AUTH line carried it.
_REPEATABLE = frozenset({Mechanism.PLAIN, Mechanism.XOAUTH2, Mechanism.OAUTHBEARER})
_TOKEN_PREFERENCE: tuple[Mechanism, ...] = (Mechanism.OAUTHBEARER, Mechanism.XOAUTH2)


@dataclass(frozen=True)
class Authentication:
    """Credentials for AUTH; sent only over TLS. Text is encoded as UTF-8.

    Give a *password*, or a bearer *token* (keyword only) for XOAUTH2 and
    OAUTHBEARER: a str, or a :data:`TokenProvider` that :func:`resolve_token`
    calls before each connection. With ``mechanism=None`` the strongest
    mechanism the server offers is used (see :func:`choose_mechanism`).
    """

    username: str
    password: str | None = field(default=None, repr=False)
    mechanism: Mechanism | None = None
    token: str | TokenProvider | None = field(default=None, repr=False, kw_only=True)

    def __post_init__(self) -> None:
        if not isinstance(self.username, str):
            raise InvalidCredentials(
                f"the username must be a str, not {type(self.username).__name__}"
            )
        if self.password is not None and not isinstance(self.password, str):
            raise InvalidCredentials(
                f"the password must be a str, not {type(self.password).__name__}"
            )
        _check_line("username", self.username)
        if not self.username:
            raise InvalidCredentials("the username is empty")
        if self.password is not None:
            _check_line("password", self.password)
        if (self.password is None) == (self.token is None):
            raise InvalidCredentials(
                "give a password or a token"
                if self.password is None
                else "give a password or a token, not both"
            )
        mechanism = self.mechanism
        if self.token is not None:
            if isinstance(self.token, str):
                _check_token(self.token)
            elif not callable(self.token):
                raise InvalidCredentials("the token is neither a str nor a callable")
            if "\x01" in self.username:
                raise InvalidCredentials("the username contains a ^A (0x01) character")
            if mechanism is not None and not mechanism.uses_token:
                raise InvalidCredentials(f"{mechanism.value} needs a password, not a token")
        elif mechanism is not None and mechanism.uses_token:
            raise InvalidCredentials(f"{mechanism.value} needs a token, not a password")
        if mechanism is Mechanism.SCRAM_SHA_256:
            _scram_credentials(self, strict=True)

    @property
    def token_provider(self) -> TokenProvider | None:
        """The callable that gives the token, if one was given instead of a str."""
        return None if self.token is None or isinstance(self.token, str) else self.token


def _check_line(name: str, value: str) -> None:
    if any(c in value for c in "\r\n\x00"):
        raise InvalidCredentials(f"the {name} contains CR, LF or NUL")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidCredentials(f"the {name} is not valid Unicode (a lone surrogate)") from None


def _check_token(token: str) -> None:
    # RFC 6750 §2.1 b64token is narrower; any visible ASCII keeps the framing
    # of both OAuth mechanisms intact (no space, no ^A, no CR/LF/NUL).
    if not token:
        raise InvalidCredentials("the token is empty")
    if not all("\x21" <= c <= "\x7e" for c in token):
        raise InvalidCredentials("the token holds a character other than visible ASCII")


def refuse_without_tls(authentication: Authentication | None, tls_ruled_out_by: str | None) -> None:
    """The one rule that credentials are never sent without TLS, checked up front.

    :param tls_ruled_out_by: the caller's setting that rules TLS out, named in
        the error (e.g. ``"tls_policy='none'"``); None when TLS may be used.
        (The client machine still refuses AUTH on a connection that did not
        get TLS, whatever the settings.)
    :raises UsageError: credentials given with TLS ruled out.
    """
    if authentication is not None and tls_ruled_out_by is not None:
        raise UsageError(f"authentication is never sent without TLS ({tls_ruled_out_by})")


async def resolve_token(authentication: Authentication) -> Authentication:
    """The same credentials with the token as a str, calling the provider once.

    The provider may return the token or an awaitable of it; awaiting a
    Twisted Deferred works when this coroutine runs under
    ``Deferred.fromCoroutine``. Credentials without a provider come back as
    they are.

    :raises InvalidCredentials: the provider gave something that is not a usable token.
    """
    provider = authentication.token_provider
    if provider is None:
        return authentication
    result = provider()
    if inspect.isawaitable(result):
        result = await result
    if not isinstance(result, str):
        raise InvalidCredentials(
            f"the token provider returned a {type(result).__name__}, not a str"
        )
    _check_token(result)
    return dataclasses.replace(authentication, token=result)


def choose_mechanism(authentication: Authentication, offered: frozenset[str]) -> Mechanism | None:
    """The mechanism to use with these credentials among those *offered*.

    A named mechanism is used if offered. Otherwise, with a password, the
    strongest of SCRAM-SHA-256, PLAIN, LOGIN (SCRAM only when SASLprep
    accepts the credentials; CRAM-MD5 never); with a token, OAUTHBEARER then
    XOAUTH2. None when nothing usable is offered.
    """
    names = {name.upper() for name in offered}
    if authentication.mechanism is not None:
        return authentication.mechanism if authentication.mechanism.value in names else None
    preference = _PASSWORD_PREFERENCE if authentication.token is None else _TOKEN_PREFERENCE
    for mechanism in preference:
        if mechanism.value not in names:
            continue
        if mechanism is Mechanism.SCRAM_SHA_256 and not _scram_credentials(authentication):
            continue
        return mechanism
    return None


# -- line encoding (RFC 4954 §4) ------------------------------------------------


def decode_base64(text: str | bytes) -> bytes:
    """Strict base64 (RFC 4648 alphabet, padding checked), the one decoder of SASL lines.

    :raises ValueError: not base64, or not ASCII.
    """
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as error:  # binascii.Error, or a str that is not ASCII
        raise ValueError(f"not valid base64: {error}") from None


def decode_challenge(text: str) -> bytes:
    """The bytes of a 334 challenge.

    :raises InvalidChallenge: not base64.
    """
    try:
        return decode_base64(text.strip())
    except ValueError:
        raise InvalidChallenge(
            f"the server's challenge is not valid base64: {text[:40]!r}", step=Step.AUTH
        ) from None


def encode_initial(data: bytes) -> str:
    """The initial-response argument of AUTH: base64, or ``=`` when empty."""
    return base64.b64encode(data).decode("ascii") or "="


def encode_response(data: bytes) -> str:
    """A response line to a 334: base64; an empty response is an empty line."""
    return base64.b64encode(data).decode("ascii")


# -- SASLprep (RFC 4013) ---------------------------------------------------------


def saslprep(text: str) -> str:
    """*text* prepared with SASLprep (RFC 4013), by :mod:`scramp`.

    Maps non-ASCII spaces to SPACE, drops characters "commonly mapped to
    nothing", normalises to NFKC (Unicode 3.2) and refuses prohibited,
    unassigned and malformed bidirectional text (the profile of a stored
    string, which scramp applies to the username as well).

    :raises ValueError: text that SASLprep prohibits, with scramp's reason.
    """
    try:
        prepared: str = scramp.utils.saslprep(text)
    except scramp.ScramException as error:
        raise ValueError(error.args[0]) from None
    return prepared


def _scram_credentials(authentication: Authentication, *, strict: bool = False) -> bool:
    """Whether SASLprep accepts the username and password for SCRAM.

    :raises InvalidCredentials: with *strict*, what SASLprep refuses and why.
    """

    def refuse(message: str) -> bool:
        if strict:
            raise InvalidCredentials(message)
        return False

    if authentication.password is None:
        return refuse("SCRAM-SHA-256 needs a password")
    try:
        username = saslprep(authentication.username)
    except ValueError as error:
        return refuse(f"the username is not valid for SCRAM: {error}")
    if not username:
        return refuse("the username is empty after SASLprep")
    try:
        saslprep(authentication.password)
    except ValueError as error:
        return refuse(f"the password is not valid for SCRAM: {error}")
    return True


def _saslname(name: str) -> str:
    """RFC 5802 §5.1 / RFC 5801 saslname: ``,`` and ``=`` escaped."""
    return name.replace("=", "=3D").replace(",", "=2C")


def _challenge_error(message: str) -> InvalidChallenge:
    return InvalidChallenge(message, step=Step.AUTH)


# -- the client ------------------------------------------------------------------


class SASLClient:
    """One authentication exchange with one mechanism.

    :param authentication: the credentials; a token must be resolved already
        (see :func:`resolve_token`).
    :param mechanism: the mechanism to run, usually from
        :func:`choose_mechanism`; defaults to ``authentication.mechanism``.
    :param host: the server's host name, sent by OAUTHBEARER (RFC 7628 §3.1).
    :param port: the server's port, sent by OAUTHBEARER.
    :param client_nonce: SCRAM's client nonce (tests only; random by default).
    :param min_iterations: the lowest SCRAM iteration count accepted.
    :param max_iterations: the highest SCRAM iteration count accepted.
    :raises UsageError: no mechanism, credentials that do not suit it, or a
        token provider not resolved yet.

    :ivar server_error: what the server reported inside the exchange before
        refusing it (the JSON of an OAuth error, a SCRAM ``e=`` value), for
        the error message of the refusal that follows; None otherwise.
    """

    def __init__(
        self,
        authentication: Authentication,
        mechanism: Mechanism | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        client_nonce: str | None = None,
        min_iterations: int = MIN_SCRAM_ITERATIONS,
        max_iterations: int = MAX_SCRAM_ITERATIONS,
    ) -> None:
        mechanism = mechanism if mechanism is not None else authentication.mechanism
        if mechanism is None:
            raise UsageError("no SASL mechanism: choose one with choose_mechanism()")
        self.authentication = authentication
        self.mechanism = mechanism
        self.server_error: str | None = None
        self._steps = 0
        self._initial: bytes | None = None
        self._initial_sent = False
        self._may_repeat = False
        self._done = False
        self._verified = False
        if mechanism.uses_token:
            token = authentication.token
            if token is None:
                raise UsageError(f"{mechanism.value} needs a token, not a password")
            if not isinstance(token, str):
                raise UsageError("the token provider must be resolved first (resolve_token)")
            self._token = token
        else:
            if authentication.password is None:
                raise UsageError(f"{mechanism.value} needs a password, not a token")
            self._password = authentication.password.encode("utf-8")
        self._user = authentication.username.encode("utf-8")
        for name, value in (("host", host), ("port", None if port is None else str(port))):
            if value is not None and not all("\x21" <= c <= "\x7e" for c in value):
                raise UsageError(f"the {name} for OAUTHBEARER must be visible ASCII")
        self._host = host
        self._port = port
        if mechanism is Mechanism.SCRAM_SHA_256:
            _scram_credentials(authentication, strict=True)
            if not MIN_SCRAM_ITERATIONS <= min_iterations <= max_iterations:
                raise UsageError(
                    f"SCRAM iteration bounds must satisfy {MIN_SCRAM_ITERATIONS} <= "
                    f"min_iterations <= max_iterations, not {min_iterations}, {max_iterations}"
                )
            nonce = secrets.token_urlsafe(24) if client_nonce is None else client_nonce
            try:
                # scramp prepares the credentials (SASLprep) and escapes the username.
                self._scram: Any = scramp.ScramClient(
                    ["SCRAM-SHA-256"],
                    authentication.username,
                    authentication.password,
                    c_nonce=nonce,
                )
            except scramp.ScramException:
                raise UsageError("a SCRAM nonce is visible ASCII without commas") from None
            self._min_iterations = min_iterations
            self._max_iterations = max_iterations
            self._scram_first: bytes = self._scram.get_client_first().encode("utf-8")

    # -- what the machine calls -------------------------------------------------

    @property
    def done(self) -> bool:
        """True once the client has sent its last response: only 235 or an error may follow."""
        return self._done

    def auth_command(self, limit: int = COMMAND_LINE_LIMIT) -> str:
        """The AUTH command line, without CRLF.

        It carries the initial response when the mechanism has one and the
        line with its CRLF fits in *limit* octets; otherwise (RFC 4954 §4) the
        command goes alone and the initial response answers the server's
        empty 334 challenge (see :meth:`respond`).
        """
        first = self._first()
        if first is not None:
            line = f"AUTH {self.mechanism.value} {encode_initial(first)}"
            if len(line) + 2 <= limit:
                self._mark_initial_sent()
                return line
        return f"AUTH {self.mechanism.value}"

    def initial(self) -> bytes | None:
        """The initial response, to send with AUTH; None for a mechanism the server starts.

        Calling it means the response is sent with the command.
        """
        first = self._first()
        if first is not None:
            self._mark_initial_sent()
        return first

    def respond(self, challenge: bytes) -> bytes:
        """The answer to a decoded 334 challenge (send it with :func:`encode_response`).

        :raises InvalidChallenge: a challenge this mechanism cannot take, or a
            server that failed to prove itself (SCRAM); cancel with ``*``.
        """
        first = self._first()
        if self._may_repeat and not challenge and first is not None:
            # Some servers ignore the initial response on the AUTH line and
            # ask for it with an empty challenge: answer that once.
            self._may_repeat = False
            return first
        self._may_repeat = False
        if self._done:
            raise _challenge_error(
                f"unexpected {self.mechanism.value} challenge after the last response"
            )
        if first is not None and not self._initial_sent:
            # The initial response was left off the AUTH line: the server
            # asks for it with an empty challenge.
            if challenge:
                raise _challenge_error(
                    f"unexpected {self.mechanism.value} challenge {challenge[:40]!r} "
                    "instead of an empty one"
                )
            self._initial_sent = True
            self._done = self.mechanism is Mechanism.PLAIN
            return first
        self._steps += 1
        mechanism = self.mechanism
        if mechanism is Mechanism.SCRAM_SHA_256:
            return self._scram_step(challenge)
        if mechanism is Mechanism.LOGIN:
            return self._login_step(challenge)
        if mechanism is Mechanism.CRAM_MD5:
            return self._cram_md5(challenge)
        if mechanism in (Mechanism.XOAUTH2, Mechanism.OAUTHBEARER):
            # RFC 7628 §3.2.3: the only challenge after the initial response
            # is an error, in JSON; acknowledge it (XOAUTH2 with an empty
            # response, OAUTHBEARER with ^A) and the server then refuses.
            self.server_error = challenge.decode("utf-8", "replace")
            self._done = True
            return b"" if mechanism is Mechanism.XOAUTH2 else b"\x01"
        raise _challenge_error(f"unexpected {mechanism.value} challenge {challenge[:40]!r}")

    def check_success(self) -> None:
        """Vet the server's 235: call it before trusting the session.

        :raises InvalidChallenge: SCRAM ended without the server proving it
            knows the password (no verified ``v=``), or the server reported an
            error in the exchange and then claimed success.
        """
        if self.server_error is not None:
            raise _challenge_error(
                f"the server accepted {self.mechanism.value} after reporting an error: "
                f"{self.server_error[:200]!r}"
            )
        if self.mechanism is Mechanism.SCRAM_SHA_256 and not self._verified:
            raise _challenge_error(
                "the server accepted SCRAM-SHA-256 without proving it knows the password "
                "(no server signature)"
            )

    # -- mechanisms -------------------------------------------------------------------

    def _mark_initial_sent(self) -> None:
        """The initial response went on the AUTH line."""
        self._initial_sent = True
        self._done = self.mechanism is Mechanism.PLAIN
        self._may_repeat = self.mechanism in _REPEATABLE

    def _first(self) -> bytes | None:
        """The initial response of a client-first mechanism (the same each call)."""
        if self._initial is not None:
            return self._initial
        mechanism = self.mechanism
        if mechanism is Mechanism.PLAIN:
            first = b"\x00" + self._user + b"\x00" + self._password
        elif mechanism is Mechanism.SCRAM_SHA_256:
            first = self._scram_first
        elif mechanism is Mechanism.XOAUTH2:
            first = b"user=%s\x01auth=Bearer %s\x01\x01" % (self._user, self._token.encode())
        elif mechanism is Mechanism.OAUTHBEARER:
            pairs = b""
            if self._host is not None:
                pairs += b"host=%s\x01" % self._host.encode("ascii")
            if self._port is not None:
                pairs += b"port=%d\x01" % self._port
            gs2 = b"n,a=%s," % _saslname(self.authentication.username).encode("utf-8")
            first = gs2 + b"\x01" + pairs + b"auth=Bearer %s\x01\x01" % self._token.encode()
        else:
            return None
        self._initial = first
        return first

    def _login_step(self, challenge: bytes) -> bytes:
        # The server asks for the user name, then the password. The prompts
        # are informal ("Username:", "User Name"), so the order decides.
        prompt = challenge.decode("utf-8", "replace").lower()
        if self._steps == 1 and "pass" not in prompt:
            return self._user
        if self._steps == 2 and "user" not in prompt:
            self._done = True
            return self._password
        raise _challenge_error(f"unexpected LOGIN challenge {challenge[:40]!r}")

    def _cram_md5(self, challenge: bytes) -> bytes:
        if not challenge:
            raise _challenge_error("empty CRAM-MD5 challenge")
        self._done = True
        digest = hmac.new(self._password, challenge, hashlib.md5).hexdigest()
        return self._user + b" " + digest.encode("ascii")

    def _scram_step(self, challenge: bytes) -> bytes:
        try:
            text = challenge.decode("utf-8")
        except UnicodeDecodeError:
            raise _challenge_error("a SCRAM challenge that is not UTF-8") from None
        if text.startswith("e="):
            # The server refused (its server-first or server-final is an
            # error): acknowledge so that it sends its 535, and keep its reason.
            self.server_error = text[2:].partition(",")[0]
            self._done = True
            return b""
        which = "server-first" if self._steps == 1 else "server-final"
        try:
            if self._steps == 1:
                self._scram.set_server_first(text)
                self._check_iterations(int(self._scram.iterations))
                final: str = self._scram.get_client_final()
                return final.encode("utf-8")
            self._scram.set_server_final(text)
        except scramp.ScramException as error:
            raise _challenge_error(
                f"the SCRAM {which} message is refused: {error.args[0]} {text[:80]!r}"
            ) from None
        self._verified = True
        self._done = True
        return b""

    def _check_iterations(self, iterations: int) -> None:
        """Our bounds, checked before the (costly) key derivation."""
        if iterations < self._min_iterations:
            raise _challenge_error(
                f"the server's SCRAM iteration count {iterations} is below "
                f"{self._min_iterations} (RFC 7677 §4)"
            )
        if iterations > self._max_iterations:
            raise _challenge_error(
                f"the server's SCRAM iteration count {iterations} is above {self._max_iterations}"
            )
