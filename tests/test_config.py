"""GuardConfig validation, the environment variables, and install_from_env."""

from __future__ import annotations

import dataclasses

import pytest

from sessionguard import ConfigError, GuardConfig, install_from_env, install_guard
from sessionguard._config import Mode, parse_mode


def test_defaults_match_the_design():
    """The defaults are the documented ones."""
    config = GuardConfig()
    assert config.detect_stale_reads is True
    assert config.sample_rate == 1.0
    assert config.on_stale == "log"
    assert config.expire == frozenset()
    assert config.log_values is False
    assert config.log_level == "info"
    assert config.max_findings == 1000
    assert config.tracer_provider is None
    assert config.meter_provider is None
    assert config.logger is None
    for name in ("user_password", "api_secret", "refresh_token", "api_key", "pw_hash"):
        assert config.is_redacted(name), name
    assert not config.is_redacted("name")


def test_config_is_frozen_and_keyword_only():
    """GuardConfig cannot be changed after construction or built positionally."""
    config = GuardConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.sample_rate = 0.5  # type: ignore[misc]
    with pytest.raises(TypeError):
        GuardConfig(True)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value", "valid"),
    [
        ("sample_rate", 1.5, "a number from 0.0 to 1.0"),
        ("sample_rate", -0.1, "a number from 0.0 to 1.0"),
        ("sample_rate", "0.5", "a number from 0.0 to 1.0"),
        ("sample_rate", True, "a number from 0.0 to 1.0"),
        ("sample_rate", float("nan"), "a number from 0.0 to 1.0"),
        ("on_stale", "explode", "log, warn, raise"),
        ("expire", {"commit", "never"}, "commit, begin, request (unknown: never)"),
        ("expire", "commit", "a set of commit, begin, request"),
        ("expire", None, "a set of commit, begin, request"),
        ("log_values", "yes", "True, False"),
        ("log_level", "verbose", "debug, info, warning, error"),
        ("log_level", 10, "debug, info, warning, error"),
        ("log_level", "DEBUG", "debug, info, warning, error"),
        ("detect_stale_reads", 1, "True, False"),
        ("max_findings", -1, "an integer >= 0"),
        ("max_findings", 2.5, "an integer >= 0"),
        ("redact", "password", "a tuple of non-empty strings"),
        ("redact", ("password", ""), "a tuple of non-empty strings"),
    ],
)
def test_bad_field_values_name_field_value_and_choices(field, value, valid):
    """Each bad value raises ConfigError naming the field, the value and the choices."""
    with pytest.raises(ConfigError) as info:
        GuardConfig(**{field: value})
    message = str(info.value)
    assert f"GuardConfig.{field}={value!r}" in message
    assert valid in message
    assert isinstance(info.value, ValueError)


def test_overrides_to_install_guard_are_validated_too():
    """install_guard keyword overrides go through the same validation."""
    with pytest.raises(ConfigError, match=r"GuardConfig\.sample_rate=7"):
        install_guard(None, sample_rate=7)


def test_redact_accepts_a_list_or_set_and_keeps_a_tuple():
    """redact may be given as any collection of strings; it is kept as a tuple."""
    assert GuardConfig(redact=["SSN", "iban"]).redact == ("iban", "ssn")
    assert GuardConfig(redact={"pin"}).is_redacted("card_PIN")


def test_expire_accepts_any_collection_and_freezes_it():
    """expire is normalised to a frozenset."""
    assert GuardConfig(expire=["commit", "begin"]).expire == frozenset(
        {"commit", "begin"}
    )
    assert isinstance(GuardConfig(expire={"request"}).expire, frozenset)


def test_from_env_reads_every_variable():
    """Every SESSIONGUARD_* variable of the design table is read."""
    config = GuardConfig.from_env(
        {
            "SESSIONGUARD_SAMPLE_RATE": "0.25",
            "SESSIONGUARD_ON_STALE": "WARN",
            "SESSIONGUARD_EXPIRE": "commit, begin",
            "SESSIONGUARD_LOG_VALUES": "true",
            "SESSIONGUARD_LOG_LEVEL": "Debug",
        }
    )
    assert config.log_level == "debug"
    assert config.sample_rate == 0.25
    assert config.on_stale == "warn"
    assert config.expire == {"commit", "begin"}
    assert config.log_values is True


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("all", {"commit", "begin", "request"}), ("off", set()), ("request", {"request"})],
)
def test_expire_variable_keywords(raw, expected):
    """SESSIONGUARD_EXPIRE takes a comma list, all, or off."""
    assert GuardConfig.from_env({"SESSIONGUARD_EXPIRE": raw}).expire == expected


def test_from_env_does_not_read_at_import_and_defaults_when_unset():
    """An empty environment gives the defaults."""
    assert GuardConfig.from_env({}) == GuardConfig()


def test_strict_mode_implies_raise_unless_on_stale_is_set():
    """SESSIONGUARD=strict makes on_stale='raise'; SESSIONGUARD_ON_STALE still wins."""
    assert GuardConfig.from_env({"SESSIONGUARD": "strict"}).on_stale == "raise"
    assert GuardConfig.from_env({"SESSIONGUARD": "1"}).on_stale == "raise"
    assert GuardConfig.from_env({"SESSIONGUARD": "report"}).on_stale == "log"
    both = {"SESSIONGUARD": "strict", "SESSIONGUARD_ON_STALE": "warn"}
    assert GuardConfig.from_env(both).on_stale == "warn"


@pytest.mark.parametrize(
    ("variable", "value", "valid"),
    [
        (
            "SESSIONGUARD",
            "maybe",
            "off, 0, false, (empty), report, strict, 1, true, on",
        ),
        ("SESSIONGUARD_SAMPLE_RATE", "lots", "a number from 0.0 to 1.0"),
        ("SESSIONGUARD_SAMPLE_RATE", "2", "a number from 0.0 to 1.0"),
        ("SESSIONGUARD_SAMPLE_RATE", "nan", "a number from 0.0 to 1.0"),
        ("SESSIONGUARD_ON_STALE", "panic", "log, warn, raise"),
        (
            "SESSIONGUARD_EXPIRE",
            "commit,never",
            "commit, begin, request, or all, or off",
        ),
        ("SESSIONGUARD_EXPIRE", ",", "commit, begin, request, or all, or off"),
        ("SESSIONGUARD_LOG_VALUES", "sometimes", "1, true, yes, on, 0, false, no, off"),
        ("SESSIONGUARD_LOG_LEVEL", "loud", "debug, info, warning, error"),
    ],
)
def test_bad_environment_values_name_variable_value_and_choices(variable, value, valid):
    """Each bad variable raises ConfigError naming it, its value and the choices."""
    with pytest.raises(ConfigError) as info:
        GuardConfig.from_env({variable: value})
    message = str(info.value)
    assert f"{variable}={value!r}" in message
    assert valid in message


@pytest.mark.parametrize(
    ("raw", "mode"),
    [
        ("", Mode.OFF),
        ("off", Mode.OFF),
        ("0", Mode.OFF),
        ("false", Mode.OFF),
        ("report", Mode.REPORT),
        ("strict", Mode.STRICT),
        ("1", Mode.STRICT),
        ("TRUE", Mode.STRICT),
        ("on", Mode.STRICT),
    ],
)
def test_mode_aliases(raw, mode):
    """SESSIONGUARD accepts the documented aliases, case-insensitively."""
    assert parse_mode(raw) is mode


def test_install_from_env_off_installs_nothing(sqlite_db):
    """install_from_env returns None when SESSIONGUARD is off or unset."""
    engine = sqlite_db.engine()
    assert install_from_env(engine, environ={}) is None
    assert install_from_env(engine, environ={"SESSIONGUARD": "off"}) is None


def test_install_from_env_installs_a_configured_guard(sqlite_db):
    """install_from_env installs a guard configured from the variables."""
    engine = sqlite_db.engine()
    guard = install_from_env(
        engine, environ={"SESSIONGUARD": "strict", "SESSIONGUARD_EXPIRE": "begin"}
    )
    assert guard is not None
    assert guard.installed
    assert guard.config.on_stale == "raise"
    assert guard.config.expire == {"begin"}


def test_install_from_env_reads_os_environ(sqlite_db, monkeypatch):
    """Without environ=, the process environment is read at call time."""
    monkeypatch.setenv("SESSIONGUARD", "report")
    monkeypatch.setenv("SESSIONGUARD_SAMPLE_RATE", "0.5")
    guard = install_from_env(sqlite_db.engine())
    assert guard is not None
    assert guard.config.sample_rate == 0.5
    monkeypatch.setenv("SESSIONGUARD", "bogus")
    with pytest.raises(ConfigError, match="SESSIONGUARD='bogus'"):
        install_from_env(sqlite_db.engine())
