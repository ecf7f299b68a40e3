"""
Which tables a write statement changes, for the ``unsynchronized_write`` check.

Pure functions over SQL text and SQLAlchemy statements: no session, no logging.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["dml_of", "text_dml_tables"]

# Leading comments, then a statement; or a WITH clause whose CTEs or main
# statement write (PostgreSQL's data-modifying CTEs).
_COMMENTS = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*", re.DOTALL)
_TABLE = r"([`\"\[]?[\w$]+[`\"\]]?(?:\.[`\"\[]?[\w$]+[`\"\]]?)?)"
_WRITE_AT_START = re.compile(
    r"(?:update\s+(?:only\s+)?|delete\s+from\s+(?:only\s+)?"
    r"|insert\s+(?:or\s+\w+\s+)?into\s+|replace\s+into\s+)" + _TABLE,
    re.IGNORECASE,
)
_WRITE_ANYWHERE = re.compile(
    r"(?<![\w$])(?:update\s+(?:only\s+)?|delete\s+from\s+(?:only\s+)?"
    r"|insert\s+(?:or\s+\w+\s+)?into\s+)" + _TABLE,
    re.IGNORECASE,
)
_WITH = re.compile(r"with\b", re.IGNORECASE)
_STRINGS = re.compile(r"'(?:[^']|'')*'")


def _bare(name: str) -> str:
    return name.rsplit(".", 1)[-1].strip('`"[]')


def text_dml_tables(sql: str) -> tuple[str, ...]:
    """
    The tables a textual statement writes to, unqualified; empty for a read.

    Understands leading ``--`` and ``/* */`` comments and ``WITH`` clauses
    (the write may be the main statement or a data-modifying CTE). String
    literals are blanked first, so a quoted ``'update x'`` is not a write.
    """
    start = _COMMENTS.match(sql)
    body = sql[start.end() :] if start is not None else sql
    match = _WRITE_AT_START.match(body)
    if match is not None:
        return (_bare(match.group(1)),)
    if not _WITH.match(body):
        return ()
    unquoted = _STRINGS.sub("''", body)
    return tuple(
        dict.fromkeys(_bare(m.group(1)) for m in _WRITE_ANYWHERE.finditer(unquoted))
    )


def dml_of(statement: Any) -> Any:
    """
    The DML statement behind *statement*, or None when it does not write.

    Sees through lambda statements (``lambda_stmt()``) and ORM
    ``select(...).from_statement(dml)``.
    """
    resolved = getattr(statement, "_resolved", statement)
    if not getattr(resolved, "is_dml", False):
        return None
    # A FromStatement says is_dml for the DML it wraps: return that.
    element = getattr(resolved, "element", None)
    return element if getattr(element, "is_dml", False) else resolved
