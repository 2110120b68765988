"""The PromQL queries of the Grafana dashboard, in the form Prometheus itself accepts.

Grafana fills in range variables such as $__rate_interval before it sends a query; the
checks that send the dashboard's queries straight to Prometheus (or to promtool) use the
fixed values below instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DASHBOARD_PATH = Path(__file__).resolve().parent / "grafana" / "dashboards" / "mmgpt.json"

# $__rate_interval is at least four scrape intervals (5 s): one minute covers that.
GRAFANA_RANGE_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}


@dataclass(frozen=True)
class PanelQuery:
    """One target of one panel: the expression as the dashboard writes it."""

    panel_title: str
    ref_id: str
    expr: str

    def promql(self) -> str:
        """The expression with Grafana's range variables replaced by fixed durations."""
        text = self.expr
        for variable, duration in GRAFANA_RANGE_VARIABLES.items():
            text = text.replace(variable, duration)
        return text


def load_dashboard(path: Path = DASHBOARD_PATH) -> dict[str, Any]:
    with path.open(encoding="utf-8") as file:
        dashboard: dict[str, Any] = json.load(file)
    return dashboard


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, the ones inside collapsed rows included, rows left out."""
    panels: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            panels.extend(panel.get("panels", []))
        else:
            panels.append(panel)
    return panels


def panel_queries(dashboard: dict[str, Any]) -> list[PanelQuery]:
    return [
        PanelQuery(panel["title"], target["refId"], target["expr"])
        for panel in all_panels(dashboard)
        for target in panel.get("targets", [])
    ]
