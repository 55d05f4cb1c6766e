"""The relay's ``[shaping]`` TOML section: settings, and one-line errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.python import usage

from txcolombe.codec.reply import Reply
from txcolombe.delivery.shaping import DEFAULT_LIMITS, Limits, MemoryStore, Rate
from txcolombe.delivery.shaping.config import ShapingConfigError, ShapingSettings, parse_shaping
from txcolombe.relay.options import Options

FULL = r"""
[shaping]
redis = "127.0.0.1:16379"
redis-prefix = "relays:"
backoff_patterns = ['^421 ', '(?i)slow down']
suspend = 120
rate_factor = 0.25
min_rate_factor = 0.05
recover = 900

[shaping.site_patterns]
google = '\.google\.com$'

[shaping.default]
max_connections = 8
message_rate = "100/s"

[shaping.site.google]
connection_rate = "10/min"
messages_per_connection = 50

[shaping.domain."Example.COM"]
max_connections = 2
message_rate = "1000/h"
"""


def test_full_section() -> None:
    settings = parse_shaping(tomllib.loads(FULL)["shaping"])
    assert settings.redis == ("127.0.0.1", 16379)
    assert settings.redis_prefix == "relays:"
    rules = settings.backoff
    assert (rules.suspend, rules.rate_factor, rules.min_rate_factor, rules.recover) == (
        120,
        0.25,
        0.05,
        900,
    )
    assert rules.reason(Reply.of(450, "4.2.0 please SLOW DOWN")) is not None
    assert rules.reason(Reply.of(451, "4.7.1 greylisted")) is None  # defaults replaced
    site = settings.sites.name(["aspmx.l.google.com", "alt1.aspmx.l.google.com"])
    assert site == "google"
    policy = settings.policy
    assert policy.limits("google") == Limits(8, 50, Rate(100, 1), Rate(10, 60))
    assert policy.limits("google", "example.com") == Limits(2, 50, Rate(1000, 3600), Rate(10, 60))
    assert policy.limits("mx.other.net") == Limits(8, None, Rate(100, 1))


def test_empty_section_is_the_defaults() -> None:
    settings = parse_shaping({})
    assert settings == ShapingSettings()
    assert settings.policy.default == DEFAULT_LIMITS
    assert settings.redis is None


def test_in_process_shaper_from_settings() -> None:
    clock = Clock()
    shaper = parse_shaping({"default": {"message_rate": "2/s"}}).shaper(clock)
    assert isinstance(shaper.store, MemoryStore)
    assert shaper.clock is clock
    assert shaper.policy.default.message_rate == Rate(2, 1)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("shaping = 3", "shaping is a table"),
        ("[shaping]\nspeed = 1", "shaping: unknown key 'speed'"),
        (
            "[shaping.default]\nmessage_rate = 'fast'",
            "shaping.default.message_rate: rate 'fast': expected COUNT/UNIT, e.g. 10/s",
        ),
        ("[shaping.default]\nmessage_rate = 10", "shaping.default.message_rate: rate 10 is not"),
        (
            "[shaping.default]\nmax_connections = 0",
            "shaping.default.max_connections: a whole number of at least 1, not 0",
        ),
        ("[shaping.default]\nmax_connections = 1.5", "shaping.default.max_connections: a whole"),
        ("[shaping.default]\nmax_connections = true", "shaping.default.max_connections: a whole"),
        ("[shaping.default]\nburst = 3", "shaping.default: unknown key 'burst'"),
        (
            '[shaping.site."a,b"]\nconnection_rate = "1/fortnight"',
            "shaping.site.\"a,b\".connection_rate: rate '1/fortnight': unknown unit",
        ),
        (
            '[shaping.domain."x.org"]\nmessages_per_connection = -1',
            'shaping.domain."x.org".messages_per_connection: a whole number',
        ),
        ("[shaping]\ndomain = 1", "shaping.domain is a table of tables"),
        ("[shaping]\nsite = {g = 1}", 'shaping.site."g" is a table'),
        ("[shaping]\nredis = 'localhost:port'", "shaping.redis: expected HOST:PORT"),
        ("[shaping]\nredis = ':6379'", "shaping.redis: expected HOST:PORT"),
        ("[shaping]\nredis = '127.0.0.1:70000'", "shaping.redis: expected HOST:PORT"),
        ("[shaping]\nredis = 6379", "shaping.redis: a string, not 6379"),
        ("[shaping]\nsuspend = 'long'", "shaping.suspend: a number, not 'long'"),
        ("[shaping]\nrecover = -5", "shaping.recover: seconds, not negative"),
        ("[shaping]\nrate_factor = 2", "shaping: 0 < min_rate_factor <= rate_factor <= 1"),
        ("[shaping]\nbackoff_patterns = '421'", "shaping.backoff_patterns: a list of"),
        (
            "[shaping]\nbackoff_patterns = ['ok', '(']",
            "shaping.backoff_patterns[1]: bad regular expression '('",
        ),
        ("[shaping.site_patterns]\ng = '['", 'shaping.site_patterns."g": bad regular expression'),
        ("[shaping]\nsite_patterns = ['x']", "shaping.site_patterns: a table of NAME = REGEX"),
    ],
)
def test_mistakes_are_one_line_errors(toml: str, message: str) -> None:
    section = tomllib.loads(toml)["shaping"]
    with pytest.raises(ShapingConfigError) as caught:
        parse_shaping(section)
    text = str(caught.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_relay_options_read_the_section(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text('spool = "s"\n[shaping.default]\nmessage_rate = "5/s"\n')
    options = Options()
    options.parseOptions(["--config", str(config)])
    assert isinstance(options["shaping"], ShapingSettings)
    assert options["shaping"].policy.default.message_rate == Rate(5, 1)
    assert Options()["shaping"] is None


def test_relay_options_report_the_mistake_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text('[shaping.site."mx.example.net"]\nmax_connections = "ten"\n')
    with pytest.raises(usage.UsageError) as caught:
        Options().parseOptions(["--config", str(config)])
    assert str(caught.value) == (
        f'{config}: shaping.site."mx.example.net".max_connections: '
        "a whole number of at least 1, not 'ten'"
    )


def test_twistd_refuses_a_bad_shaping_section_in_one_line(tmp_path: Path) -> None:
    from tests.test_relay_config import assert_one_line_exit_2, run_twistd
    from tools.peers.aiosmtpd_peer import free_port

    config = tmp_path / "relay.toml"
    config.write_text('[shaping.domain."example.org"]\nmessage_rate = "lots"\n')
    result = run_twistd(
        tmp_path, f"--config={config}", f"--listen=tcp:{free_port()}:interface=127.0.0.1",
        f"--spool={tmp_path / 'spool'}",
    )  # fmt: skip
    line = assert_one_line_exit_2(result)
    assert line == (
        f'twistd smtprelay: {config}: shaping.domain."example.org".message_rate: '
        "rate 'lots': expected COUNT/UNIT, e.g. 10/s, 1000/h, 50/min"
    )
