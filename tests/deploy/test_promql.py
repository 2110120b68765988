"""The PromQL scanner finds metric names and grouping labels, and nothing else."""

from __future__ import annotations

from tests.deploy.promql import grouping_labels, metric_names


def test_quantile_over_rate_of_buckets() -> None:
    expr = "histogram_quantile(0.95, sum by (le) (rate(mmgpt_ttft_bucket[1m])))"
    assert metric_names(expr) == {"mmgpt_ttft_bucket"}
    assert grouping_labels(expr) == {"le"}


def test_ratio_with_matchers_strings_and_offset() -> None:
    expr = (
        'sum(rate(a_total{endpoint="caption", route=~"/v1/.*"}[5m] offset 1m)) '
        "/ on (job) sum without (instance) (rate(b_total[5m]))"
    )
    assert metric_names(expr) == {"a_total", "b_total"}
    assert grouping_labels(expr) == set()


def test_bare_selector_and_numbers() -> None:
    assert metric_names("mmgpt_num_requests_running * 100 + 1e3") == {"mmgpt_num_requests_running"}
    assert metric_names("max by (instance, job) (up)") == {"up"}
    assert grouping_labels("max by (instance, job) (up)") == {"instance", "job"}


def test_names_that_look_like_keywords_inside_a_metric() -> None:
    assert metric_names("sum(rate(summary_count_total[1m]))") == {"summary_count_total"}
