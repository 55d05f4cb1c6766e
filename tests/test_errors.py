"""The exception hierarchy and the reply-to-exception mapping."""

from __future__ import annotations

import pytest

from txcolombe.codec import errors
from txcolombe.codec.errors import Step, error_for_reply
from txcolombe.codec.reply import Reply

NON_AUTH_STEPS = [s for s in Step if s not in (Step.AUTH, Step.STARTTLS)]


@pytest.mark.parametrize(
    ("code", "cls", "temporary"),
    [
        (450, errors.MailboxBusy, True),
        (451, errors.ProcessingError, True),
        (452, errors.InsufficientStorage, True),
        (455, errors.ParametersNotAccommodated, True),
        (500, errors.CommandRejected, False),
        (501, errors.CommandRejected, False),
        (502, errors.CommandRejected, False),
        (503, errors.CommandRejected, False),
        (504, errors.CommandRejected, False),
        (550, errors.MailboxUnavailable, False),
        (551, errors.UserNotLocal, False),
        (552, errors.StorageExceeded, False),
        (553, errors.MailboxNameInvalid, False),
        (554, errors.TransactionFailed, False),
        (555, errors.ParametersNotRecognized, False),
        (530, errors.AuthenticationRequired, False),
        (421, errors.ServiceUnavailable, True),
        (454, errors.TemporaryFailure, True),
        (471, errors.TemporaryFailure, True),
        (535, errors.PermanentFailure, False),
        (599, errors.PermanentFailure, False),
    ],
)
@pytest.mark.parametrize("step", NON_AUTH_STEPS)
def test_reply_mapping(code: int, cls: type[errors.SMTPError], temporary: bool, step: Step) -> None:
    reply = Reply.of(code, "x.y.z text")
    error = error_for_reply(reply, step)
    assert type(error) is cls
    assert error.reply is reply
    assert error.code == code
    assert error.step is step
    assert error.temporary is temporary


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (501, errors.AuthenticationRejected),
        (504, errors.UnsupportedMechanism),
        (530, errors.AuthenticationRequired),
        (534, errors.WeakMechanism),
        (535, errors.AuthenticationFailed),
        (538, errors.EncryptionRequired),
    ],
)
def test_auth_mapping(code: int, cls: type[errors.SMTPError]) -> None:
    error = error_for_reply(Reply.of(code, "no"), Step.AUTH)
    assert type(error) is cls
    assert isinstance(error, errors.AuthenticationError)
    assert error.step is Step.AUTH
    assert not error.temporary


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (421, errors.ServiceUnavailable),
        (454, errors.TemporaryFailure),
        (550, errors.MailboxUnavailable),
        (554, errors.TransactionFailed),
    ],
)
def test_auth_step_other_codes(code: int, cls: type[errors.SMTPError]) -> None:
    assert type(error_for_reply(Reply.of(code), Step.AUTH)) is cls


@pytest.mark.parametrize("code", [454, 501, 502, 554])
def test_starttls_mapping(code: int) -> None:
    error = error_for_reply(Reply.of(code, "no TLS"), Step.STARTTLS)
    assert type(error) is errors.STARTTLSRefused
    assert isinstance(error, errors.TLSError)
    assert error.temporary
    assert error.step is Step.STARTTLS


def test_starttls_421_is_service_unavailable() -> None:
    assert type(error_for_reply(Reply.of(421), Step.STARTTLS)) is errors.ServiceUnavailable


@pytest.mark.parametrize("code", [250, 220, 354, 334])
def test_positive_reply_is_unexpected(code: int) -> None:
    error = error_for_reply(Reply.of(code, "ok"), Step.MAIL)
    assert type(error) is errors.UnexpectedResponse
    assert isinstance(error, errors.ProtocolError)
    assert error.code == code


def test_custom_message() -> None:
    error = error_for_reply(Reply.of(550, "5.1.1 unknown"), Step.RCPT, "recipient refused")
    assert error.message == "recipient refused"
    assert str(error).startswith("recipient refused")


def test_default_message_names_the_step() -> None:
    error = error_for_reply(Reply.of(550, "no"), Step.MAIL)
    assert "MAIL" in error.message


def test_str_contains_code_step_and_text() -> None:
    error = error_for_reply(Reply.of(552, "5.3.4 message too big"), Step.DATA_END)
    text = str(error)
    assert "552" in text
    assert "end of data" in text
    assert "message too big" in text


def test_str_without_reply_or_step() -> None:
    error = errors.SMTPError("plain")
    assert str(error) == "plain"
    assert error.code is None
    assert error.enhanced_status is None
    assert error.text is None
    assert error.step is None


def test_reply_accessors() -> None:
    error = error_for_reply(Reply.of(550, "5.1.1 no such user", "second line"), Step.RCPT)
    assert error.enhanced_status == (5, 1, 1)
    assert error.text == "no such user\nsecond line"


def test_temporary_override() -> None:
    assert errors.SMTPError("x", temporary=True).temporary
    assert not errors.ConnectionLost("x", temporary=False).temporary
    assert errors.ConnectionLost("x").temporary


@pytest.mark.parametrize(
    ("cls", "temporary"),
    [
        (errors.UsageError, False),
        (errors.InvalidAddress, False),
        (errors.InvalidBody, False),
        (errors.EightBitUnsupported, False),
        (errors.UTF8Unsupported, False),
        (errors.MessageTooLarge, False),
        (errors.ConnectionFailed, True),
        (errors.NameResolutionFailed, True),
        (errors.ConnectionRefused, True),
        (errors.ConnectTimeout, True),
        (errors.ConnectionLost, True),
        (errors.ResponseTimeout, True),
        (errors.ProtocolError, True),
        (errors.MalformedReply, True),
        (errors.ReplyTooLong, True),
        (errors.UnexpectedResponse, True),
        (errors.TLSFailure, True),
        (errors.STARTTLSUnavailable, True),
        (errors.STARTTLSRefused, True),
        (errors.AuthenticationUnavailable, False),
        (errors.InvalidChallenge, True),
        (errors.AuthenticationFailed, False),
        (errors.TemporaryFailure, True),
        (errors.ServiceUnavailable, True),
        (errors.PermanentFailure, False),
        (errors.StorageExceeded, False),
    ],
)
def test_class_temporary_flags(cls: type[errors.SMTPError], temporary: bool) -> None:
    assert cls("x").temporary is temporary


def test_hierarchy() -> None:
    assert issubclass(errors.UsageError, ValueError)
    assert issubclass(errors.ReplyTooLong, errors.MalformedReply)
    assert issubclass(errors.ConnectionLost, errors.ConnectionFailed)
    assert issubclass(errors.ResponseTimeout, errors.ConnectionFailed)
    assert issubclass(errors.RecipientsRefused, errors.ReplyError)
    for name in errors.__all__:
        obj = getattr(errors, name)
        if isinstance(obj, type) and name != "Step":
            assert issubclass(obj, errors.SMTPError), name


def test_connection_lost_maybe_delivered_defaults_false() -> None:
    assert errors.ConnectionLost("x").maybe_delivered is False


# -- RecipientsRefused ------------------------------------------------------------------


def test_recipients_refused_all_temporary() -> None:
    error = errors.RecipientsRefused(
        "none accepted",
        {"a@x.example": Reply.of(450, "4.2.1 busy"), "b@x.example": Reply.of(451, "later")},
    )
    assert error.temporary
    assert error.step is Step.RCPT
    assert error.code is None


def test_recipients_refused_mixed_is_permanent() -> None:
    error = errors.RecipientsRefused(
        "none accepted",
        {"a@x.example": Reply.of(450, "busy"), "b@x.example": Reply.of(550, "unknown")},
    )
    assert not error.temporary


def test_recipients_refused_all_permanent() -> None:
    error = errors.RecipientsRefused("none", {"a@x.example": Reply.of(550, "unknown")})
    assert not error.temporary


def test_recipients_refused_empty_is_not_temporary() -> None:
    assert not errors.RecipientsRefused("none", {}).temporary


def test_recipients_refused_lists_each() -> None:
    refused = {
        "a@x.example": Reply.of(550, "5.1.1 unknown a"),
        "b@x.example": Reply.of(553, "bad b"),
    }
    error = errors.RecipientsRefused("no recipient was accepted", refused)
    text = str(error)
    assert "<a@x.example>: 550 5.1.1 unknown a" in text
    assert "<b@x.example>: 553 bad b" in text
    assert "RCPT" in text
    assert error.refused == refused
    assert error.refused is not refused  # a copy


def test_recipients_refused_step_override() -> None:
    error = errors.RecipientsRefused("x", {"a@x.example": Reply.of(550)}, step=Step.DATA)
    assert error.step is Step.DATA
