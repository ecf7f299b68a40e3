"""The shipped Grafana dashboard, its PromQL, and a workload that feeds every panel."""

from __future__ import annotations

import json
import pathlib
import re
from typing import TYPE_CHECKING, Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from sessionguard import request_context

from .models import User

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from sqlalchemy import Engine

DASHBOARD_PATH = (
    pathlib.Path(__file__).parent.parent / "docs" / "dashboards" / "sessionguard.json"
)

# What Grafana puts in place of its built-in variables when it sends a query.
BUILTIN_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "10m",
}

_STRING = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'""")
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"
)
_FUNCTION = re.compile(r"\b[A-Za-z_]\w*\s*(?=\()")
_IDENTIFIER = re.compile(r"(?<![\w.])[A-Za-z_:][\w:]*")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}
    | {"by", "without", "on", "ignoring", "group_left", "group_right"}
)
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def load_dashboard() -> dict[str, Any]:
    """The dashboard JSON shipped in docs/dashboards/."""
    return json.loads(DASHBOARD_PATH.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that shows data (rows skipped, collapsed rows' panels included)."""
    found = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title and refId, PromQL) for every target of every panel."""
    return [
        (f"{panel['title']} [{target['refId']}]", target["expr"])
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
    ]


def substitute(expr: str, dashboard: dict[str, Any]) -> str:
    """The query Grafana would send with every template variable set to "All"."""
    values = dict(BUILTIN_VARIABLES)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            values[variable["name"]] = variable["allValue"]

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"unknown dashboard variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(value, expr)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    stripped = _STRING.sub('""', expr)
    for pattern in (_MATCHERS, _RANGE, _GROUPING, _FUNCTION):
        stripped = pattern.sub(" ", stripped)
    return {
        name for name in _IDENTIFIER.findall(stripped) if name.lower() not in _KEYWORDS
    }


def exposed_names(registry: CollectorRegistry) -> set[str]:
    """The sample names a Prometheus scrape of the registry would get."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    text = generate_latest(registry).decode("utf-8")
    return {
        sample.name
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class Workload:
    """One long-lived session on a guarded engine that reads stale rows.

    The session outlives each request context (the classic bug). Every phase
    commits, reads ``User`` 1 stale ``stale_reads`` times, rolls back, and from
    the second phase on starts with an enforced ``expire_all`` (reason
    ``request``), so each phase moves every metric of the guard. Needs the
    ``seed`` user.
    """

    def __init__(self, engine: Engine, writer: Engine) -> None:
        self.session = Session(engine, expire_on_commit=False)
        self.writer = writer
        self.phases = 0

    def phase(self, stale_reads: int) -> None:
        self.phases += 1
        with request_context():
            user = self.session.get(User, 1)
            self.session.commit()
            for read in range(stale_reads):
                with Session(self.writer) as other:
                    other.execute(
                        update(User).values(name=f"renamed-{self.phases}-{read}")
                    )
                    other.commit()
                assert self.session.get(User, 1) is user
            self.session.add(User(id=100 + self.phases, name="rolled back"))
            self.session.flush()
            self.session.rollback()

    def close(self) -> None:
        self.session.close()
