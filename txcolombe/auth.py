"""SASL client mechanisms (RFC 4954), as pure challenge/response steps.

A mechanism object knows nothing of sockets: :meth:`SASLClient.initial`
gives the initial response, :meth:`SASLClient.respond` answers each 334
challenge. Credentials are validated when :class:`Authentication` is made,
never sent on a line with CR, LF or NUL.
"""

from __future__ import annotations

import base64
import binascii
import enum
from dataclasses import dataclass, field

from txcolombe.errors import InvalidAddress, InvalidChallenge, Step


class Mechanism(enum.Enum):
    """The SASL mechanisms txcolombe speaks."""

    PLAIN = "PLAIN"
    LOGIN = "LOGIN"


@dataclass(frozen=True)
class Authentication:
    """Credentials for AUTH; sent only over TLS. Text is encoded as UTF-8."""

    username: str
    password: str = field(repr=False)
    mechanism: Mechanism = Mechanism.PLAIN

    def __post_init__(self) -> None:
        for name, value in (("username", self.username), ("password", self.password)):
            if any(c in value for c in "\r\n\x00"):
                raise InvalidAddress(f"the {name} contains CR, LF or NUL")
        if not self.username:
            raise InvalidAddress("the username is empty")


def decode_challenge(text: str) -> bytes:
    """The bytes of a 334 challenge.

    :raises InvalidChallenge: not base64.
    """
    try:
        return base64.b64decode(text.strip().encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise InvalidChallenge(
            f"the server's challenge is not valid base64: {text[:40]!r}", step=Step.AUTH
        ) from None


def encode_response(data: bytes) -> str:
    """A response line: base64, or ``=`` for an empty response (RFC 4954 §4)."""
    return base64.b64encode(data).decode("ascii") or "="


class SASLClient:
    """One authentication exchange with one mechanism."""

    def __init__(self, authentication: Authentication) -> None:
        self.authentication = authentication
        self.mechanism = authentication.mechanism
        self._user = authentication.username.encode("utf-8")
        self._password = authentication.password.encode("utf-8")
        self._steps = 0

    def initial(self) -> bytes | None:
        """The initial response to send with AUTH, or None to wait for a challenge."""
        if self.mechanism is Mechanism.PLAIN:
            return b"\x00" + self._user + b"\x00" + self._password
        return None

    def respond(self, challenge: bytes) -> bytes:
        """The answer to a decoded 334 challenge.

        :raises InvalidChallenge: a challenge this mechanism cannot take.
        """
        self._steps += 1
        if self.mechanism is Mechanism.PLAIN:
            if challenge or self._steps > 1:
                raise InvalidChallenge("unexpected PLAIN challenge", step=Step.AUTH)
            return b"\x00" + self._user + b"\x00" + self._password
        # LOGIN: the server asks for the user name, then the password. The
        # prompts are informal ("Username:", "User Name"), so the order decides.
        prompt = challenge.decode("utf-8", "replace").lower()
        if self._steps == 1 and "pass" not in prompt:
            return self._user
        if self._steps == 2 and "user" not in prompt:
            return self._password
        raise InvalidChallenge(f"unexpected LOGIN challenge {challenge[:40]!r}", step=Step.AUTH)
