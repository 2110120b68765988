"""What a PromQL expression names: its metrics and the labels it groups by.

A small scanner, not a parser: enough for dashboard expressions, whose syntax promtool
checks separately.
"""

from __future__ import annotations

import re

AGGREGATIONS_AND_KEYWORDS = frozenset(
    {
        "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
        "bottomk", "topk", "quantile", "limitk", "limit_ratio",
        "by", "without", "on", "ignoring", "group_left", "group_right",
        "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan",
    }
)  # fmt: skip

_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_LABEL_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENTIFIER = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")


def _strip_literals(expr: str) -> str:
    for pattern in (_STRINGS, _LABEL_MATCHERS, _RANGES):
        expr = pattern.sub(" ", expr)
    return expr


def metric_names(expr: str) -> set[str]:
    """Names of the series an expression selects (functions and keywords left out)."""
    text = _GROUPING.sub(" ", _strip_literals(expr))
    names = {match.group(1) for match in _IDENTIFIER.finditer(text)}
    return {name for name in names if name.lower() not in AGGREGATIONS_AND_KEYWORDS}


def grouping_labels(expr: str) -> set[str]:
    """Labels named in `by (...)` clauses: the ones a panel's legend relies on."""
    text = _strip_literals(expr)
    return {
        label.strip()
        for match in _GROUPING.finditer(text)
        if match.group(1) == "by"
        for label in match.group(2).split(",")
        if label.strip()
    }
