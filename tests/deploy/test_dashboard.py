"""The Grafana dashboard: its queries are valid PromQL over metrics the service exports,
and it has the panels an operator needs."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

from tests.deploy.conftest import DOCKER_DIR, require_tool
from tests.deploy.exported import SERIES_SUFFIXES, exported_series, mmgpt_collectors
from tests.deploy.promql import grouping_labels, metric_names

# Labels that Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"instance", "job"})

# Metric families an operator must see, and the words of the panel that shows each.
REQUIRED_PANELS = {
    "mmgpt_time_to_first_token_seconds_bucket": "time to first token",
    "mmgpt_inter_token_latency_seconds_bucket": "inter-token latency",
    "mmgpt_e2e_request_latency_seconds_bucket": "end-to-end",
    "mmgpt_generation_tokens_total": "tokens per second",
    "mmgpt_request_success_total": "requests per second by endpoint",
    "mmgpt_num_requests_running": "running",
    "mmgpt_num_requests_waiting": "waiting",
    "mmgpt_kv_cache_usage_ratio": "kv cache",
    "mmgpt_prefix_cache_hits_total": "prefix cache hit rate",
    "mmgpt_image_cache_hits_total": "image cache hit rate",
    "mmgpt_num_preemptions_total": "preemptions",
    "mmgpt_request_failure_total": "errors by reason",
    "mmgpt_image_preprocess_seconds_bucket": "image preprocessing",
    "mmgpt_lora_requests_running": "per lora adapter",
    "mmgpt_lora_requests_waiting": "per lora adapter",
}
LATENCY_HISTOGRAMS = (
    "mmgpt_time_to_first_token_seconds_bucket",
    "mmgpt_inter_token_latency_seconds_bucket",
    "mmgpt_e2e_request_latency_seconds_bucket",
    "mmgpt_image_preprocess_seconds_bucket",
)


def test_series_names_follow_what_prometheus_client_exposes() -> None:
    # Where a family has samples, its series names must be the ones the type implies.
    for family in REGISTRY.collect():
        expected = {family.name + suffix for suffix in SERIES_SUFFIXES[family.type]}
        for sample in family.samples:
            assert sample.name in expected, (family.name, family.type, sample.name)
    assert "mmgpt_request_failure_total" in exported_series()
    assert "mmgpt_model_info" in exported_series()
    assert len(mmgpt_collectors()) >= 20


def test_every_query_names_only_exported_metrics(panel_queries: list[Any]) -> None:
    exported = exported_series()
    assert panel_queries, "the dashboard has no queries"
    for query in panel_queries:
        names = metric_names(query.promql())
        assert names, f"{query.panel_title}: {query.expr} selects no metric"
        unknown = names - exported.keys()
        assert not unknown, f"{query.panel_title}: {sorted(unknown)} are not exported"


def test_grouping_labels_exist_on_the_metrics(panel_queries: list[Any]) -> None:
    exported = exported_series()
    for query in panel_queries:
        names = metric_names(query.promql())
        available = set(TARGET_LABELS).union(*(exported[name] for name in names))
        if any(name.endswith("_bucket") for name in names):
            available.add("le")
        missing = grouping_labels(query.expr) - available
        assert not missing, f"{query.panel_title}: no label {sorted(missing)} on {names}"


def test_required_panels_are_there(panel_queries: list[Any]) -> None:
    for metric, panel_words in REQUIRED_PANELS.items():
        titles = [
            query.panel_title.lower()
            for query in panel_queries
            if metric in metric_names(query.promql())
        ]
        assert any(panel_words in title for title in titles), (metric, panel_words, titles)


@pytest.mark.parametrize("histogram", LATENCY_HISTOGRAMS)
def test_latency_panels_show_p50_p95_p99(panel_queries: list[Any], histogram: str) -> None:
    quantiles = {
        query.expr.split("histogram_quantile(")[1].split(",")[0]
        for query in panel_queries
        if histogram in metric_names(query.promql()) and "histogram_quantile(" in query.expr
    }
    assert quantiles == {"0.5", "0.95", "0.99"}


def test_panels_have_unique_ids_and_the_provisioned_datasource(dashboard: dict[str, Any]) -> None:
    datasource_file = DOCKER_DIR / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
    datasource_uid = yaml.safe_load(datasource_file.read_text())["datasources"][0]["uid"]
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] == "mmgpt-overview"
    for panel in panels:
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["description"], panel["title"]
        assert panel["datasource"]["uid"] == datasource_uid, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource_uid, panel["title"]


def write_rule_file(path: Path, exprs: list[str]) -> None:
    rules = [{"record": f"mmgpt_dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))


def promtool_check_rules(tmp_path: Path, exprs: list[str]) -> subprocess.CompletedProcess[str]:
    promtool = require_tool("promtool")
    rule_file = tmp_path / "dashboard-rules.yml"
    write_rule_file(rule_file, exprs)
    command = [promtool, "check", "rules", str(rule_file)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_every_query_is_valid_promql(tmp_path: Path, panel_queries: list[Any]) -> None:
    result = promtool_check_rules(tmp_path, [query.promql() for query in panel_queries])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(panel_queries)} rules found" in result.stdout


def test_promtool_rejects_a_broken_query(tmp_path: Path) -> None:
    result = promtool_check_rules(tmp_path, ["sum(rate(mmgpt_images_total[1m])"])
    assert result.returncode != 0
