"""The guard's configuration: a frozen dataclass and pure readers of the environment."""

from __future__ import annotations

import dataclasses
import enum
import math
import os
from collections.abc import Mapping, Set
from typing import TYPE_CHECKING, Any, Literal, cast

from .exceptions import ConfigError

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

__all__ = [
    "EXPIRE_POINTS",
    "LOG_LEVELS",
    "ON_STALE_CHOICES",
    "ExpirePoint",
    "GuardConfig",
    "LogLevel",
    "Mode",
    "OnStale",
    "parse_mode",
]

OnStale = Literal["log", "warn", "raise"]
ExpirePoint = Literal["commit", "begin", "request"]
LogLevel = Literal["debug", "info", "warning", "error"]

ON_STALE_CHOICES: tuple[OnStale, ...] = ("log", "warn", "raise")
EXPIRE_POINTS: tuple[ExpirePoint, ...] = ("commit", "begin", "request")
LOG_LEVELS: dict[LogLevel, int] = {"debug": 10, "info": 20, "warning": 30, "error": 40}
"""The ``log_level`` values and their numbers (those of the stdlib's levels)."""

DEFAULT_REDACT: tuple[str, ...] = ("password", "secret", "token", "key", "hash")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class Mode(enum.Enum):
    """What ``SESSIONGUARD`` (or the pytest option) asks for."""

    OFF = "off"
    REPORT = "report"
    STRICT = "strict"


_MODE_ALIASES: dict[str, Mode] = {
    "": Mode.OFF,
    "off": Mode.OFF,
    "0": Mode.OFF,
    "false": Mode.OFF,
    "report": Mode.REPORT,
    "strict": Mode.STRICT,
    "1": Mode.STRICT,
    "true": Mode.STRICT,
    "on": Mode.STRICT,
}
MODE_CHOICES = "off, 0, false, (empty), report, strict, 1, true, on"


def parse_mode(value: str, source: str = "SESSIONGUARD") -> Mode:
    """
    Read a mode value such as ``"strict"`` or ``"1"``.

    *source* names where the value came from and appears in the error message.
    """
    try:
        return _MODE_ALIASES[value.strip().lower()]
    except KeyError:
        raise ConfigError(
            f"{source}={value!r} is not a valid sessionguard mode; "
            f"valid values: {MODE_CHOICES}"
        ) from None


def _fail(field: str, value: object, valid: str) -> ConfigError:
    return ConfigError(
        f"GuardConfig.{field}={value!r} is invalid; valid values: {valid}"
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class GuardConfig:
    """
    Everything a :class:`~sessionguard.Guard` can be told.

    Every field is validated when the object is made; a bad value raises
    :class:`~sessionguard.ConfigError` naming the field, the value and what is
    accepted. Keyword arguments of :func:`~sessionguard.install_guard` are
    fields of this class.
    """

    detect_stale_reads: bool = True
    """Check objects served from the identity map against the database."""

    sample_rate: float = 1.0
    """Fraction of ORM statements and identity lookups that are checked, 0.0-1.0."""

    on_stale: OnStale = "log"
    """``"log"``, ``"warn"`` (also a Python warning) or ``"raise"`` (StaleReadError)."""

    expire: Set[ExpirePoint] = frozenset()
    """Where ``expire_all()`` is enforced: ``"commit"``, ``"begin"``, ``"request"``."""

    log_values: bool = False
    """Put attribute values into findings and logs (never for :attr:`redact` names)."""

    log_level: LogLevel = "info"
    """Least level emitted: ``"info"`` (findings and errors only), ``"debug"``
    (also the per-transaction lines), ``"warning"`` or ``"error"``."""

    redact: tuple[str, ...] = DEFAULT_REDACT
    """Case-insensitive substrings: attributes whose name contains one stay masked."""

    max_findings: int = 1000
    """How many findings :attr:`Guard.findings` keeps (oldest dropped first)."""

    tracer_provider: TracerProvider | None = None
    """OpenTelemetry tracer provider; ``None`` means the global one at install time."""

    meter_provider: MeterProvider | None = None
    """OpenTelemetry meter provider; ``None`` means the global one at install time."""

    logger: Any = None
    """A structlog-style logger; ``None``: ``structlog.get_logger("sessionguard")``."""

    def __post_init__(self) -> None:
        for name in ("detect_stale_reads", "log_values"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise _fail(name, value, "True, False")

        rate = self.sample_rate
        if (
            isinstance(rate, bool)
            or not isinstance(rate, (int, float))
            or math.isnan(rate)
            or not 0.0 <= rate <= 1.0
        ):
            raise _fail("sample_rate", rate, "a number from 0.0 to 1.0")
        object.__setattr__(self, "sample_rate", float(rate))

        if self.on_stale not in ON_STALE_CHOICES:
            raise _fail("on_stale", self.on_stale, ", ".join(ON_STALE_CHOICES))

        object.__setattr__(self, "expire", _check_expire(self.expire))

        if not isinstance(self.log_level, str) or self.log_level not in LOG_LEVELS:
            raise _fail("log_level", self.log_level, ", ".join(LOG_LEVELS))

        redact = self.redact
        if not isinstance(redact, (tuple, list, Set)) or not all(
            isinstance(p, str) and p for p in redact
        ):
            raise _fail("redact", redact, "a tuple of non-empty strings")
        # A list or set is accepted too; kept as a tuple so the config hashes.
        object.__setattr__(
            self, "redact", tuple(sorted({p.lower() for p in redact}, key=str))
        )

        if (
            isinstance(self.max_findings, bool)
            or not isinstance(self.max_findings, int)
            or self.max_findings < 0
        ):
            raise _fail("max_findings", self.max_findings, "an integer >= 0")

    def is_redacted(self, attribute: str) -> bool:
        """Whether values of *attribute* must stay masked even with ``log_values``."""
        lowered = attribute.lower()
        return any(pattern in lowered for pattern in self.redact)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> GuardConfig:
        """
        Read the ``SESSIONGUARD_*`` variables of *environ* (default ``os.environ``).

        ``SESSIONGUARD=strict`` makes ``on_stale="raise"`` the default;
        ``SESSIONGUARD_ON_STALE`` still wins when set. *overrides* are
        fields that are set in code and win over the environment.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}

        mode = parse_mode(env.get("SESSIONGUARD", ""), "SESSIONGUARD")
        if mode is Mode.STRICT:
            values["on_stale"] = "raise"

        raw = env.get("SESSIONGUARD_SAMPLE_RATE", "").strip()
        if raw:
            try:
                rate = float(raw)
            except ValueError:
                rate = math.nan
            if math.isnan(rate) or not 0.0 <= rate <= 1.0:
                raise ConfigError(
                    f"SESSIONGUARD_SAMPLE_RATE={raw!r} is invalid; "
                    "valid values: a number from 0.0 to 1.0"
                )
            values["sample_rate"] = rate

        raw = env.get("SESSIONGUARD_ON_STALE", "").strip()
        if raw:
            if raw.lower() not in ON_STALE_CHOICES:
                raise ConfigError(
                    f"SESSIONGUARD_ON_STALE={raw!r} is invalid; "
                    f"valid values: {', '.join(ON_STALE_CHOICES)}"
                )
            values["on_stale"] = raw.lower()

        raw = env.get("SESSIONGUARD_EXPIRE", "").strip()
        if raw:
            values["expire"] = _parse_expire_env(raw)

        raw = env.get("SESSIONGUARD_LOG_VALUES", "").strip()
        if raw:
            if raw.lower() in _TRUE:
                values["log_values"] = True
            elif raw.lower() in _FALSE:
                values["log_values"] = False
            else:
                raise ConfigError(
                    f"SESSIONGUARD_LOG_VALUES={raw!r} is invalid; "
                    f"valid values: {', '.join(_TRUE + _FALSE)}"
                )

        raw = env.get("SESSIONGUARD_LOG_LEVEL", "").strip()
        if raw:
            if raw.lower() not in LOG_LEVELS:
                raise ConfigError(
                    f"SESSIONGUARD_LOG_LEVEL={raw!r} is invalid; "
                    f"valid values: {', '.join(LOG_LEVELS)}"
                )
            values["log_level"] = raw.lower()

        values.update(overrides)
        return cls(**values)


def _check_expire(value: object) -> frozenset[ExpirePoint]:
    valid = ", ".join(EXPIRE_POINTS)
    if isinstance(value, str) or not isinstance(value, (Set, list, tuple)):
        raise _fail("expire", value, f"a set of {valid}, e.g. {{'commit'}}")
    unknown = sorted(str(v) for v in value if v not in EXPIRE_POINTS)
    if unknown:
        raise _fail(
            "expire", value, f"a set of {valid} (unknown: {', '.join(unknown)})"
        )
    return cast("frozenset[ExpirePoint]", frozenset(value))


def _parse_expire_env(raw: str) -> frozenset[ExpirePoint]:
    lowered = raw.lower()
    if lowered == "all":
        return frozenset(EXPIRE_POINTS)
    if lowered in ("off", "none"):
        return frozenset()
    items = [item.strip() for item in lowered.split(",") if item.strip()]
    unknown = [item for item in items if item not in EXPIRE_POINTS]
    if unknown or not items:
        raise ConfigError(
            f"SESSIONGUARD_EXPIRE={raw!r} is invalid; valid values: a comma list of "
            f"{', '.join(EXPIRE_POINTS)}, or all, or off"
        )
    return cast("frozenset[ExpirePoint]", frozenset(items))
