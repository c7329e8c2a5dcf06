"""Writes grafana/dashboards/relay.json: the relay dashboard, panels as data.

Run ``python monitoring/dashboard.py`` after editing PANELS; a test checks the JSON is current
and a real Prometheus checks every expression returns data.
"""
from __future__ import annotations

import json
from pathlib import Path

RATE = "$__rate_interval"
API = 'route=~"chat|embeddings"'

# (title, unit, [(legend, expr)], width)
PANELS = [
    ("Relay overhead (p50, p99)", "s", [
        ("p50", f"histogram_quantile(0.5, sum by (le) (rate(relay_overhead_seconds_bucket[{RATE}])))"),
        ("p99", f"histogram_quantile(0.99, sum by (le) (rate(relay_overhead_seconds_bucket[{RATE}])))"),
    ], 12),
    ("Upstream time to first byte (p50, p99) by upstream", "s", [
        ("p50 {{upstream}}",
         f"histogram_quantile(0.5, sum by (le, upstream) (rate(relay_upstream_ttfb_seconds_bucket[{RATE}])))"),
        ("p99 {{upstream}}",
         f"histogram_quantile(0.99, sum by (le, upstream) (rate(relay_upstream_ttfb_seconds_bucket[{RATE}])))"),
    ], 12),
    ("Request rate by status", "reqps", [
        ("{{status_class}}", f"sum by (status_class) (rate(relay_requests_total{{{API}}}[{RATE}]))"),
    ], 8),
    ("Error ratio (5xx)", "percentunit", [
        ("5xx ratio", f'sum(rate(relay_requests_total{{{API},status_class="5xx"}}[{RATE}])) '
                      f"/ sum(rate(relay_requests_total{{{API}}}[{RATE}]))"),
    ], 8),
    ("Request duration p99 by model", "s", [
        ("{{model}}", f"histogram_quantile(0.99, sum by (le, model) "
                      f"(rate(relay_request_duration_seconds_bucket{{{API}}}[{RATE}])))"),
    ], 8),
    ("Retries and failovers by reason", "ops", [
        ("retry {{reason}}", f"sum by (reason) (rate(relay_retries_total[{RATE}]))"),
        ("failover {{reason}}", f"sum by (reason) (rate(relay_failovers_total[{RATE}]))"),
    ], 8),
    ("Upstream attempts by outcome", "ops", [
        ("{{upstream}} {{outcome}}", f"sum by (upstream, outcome) (rate(relay_upstream_attempts_total[{RATE}]))"),
    ], 8),
    ("Endpoint states", "short", [
        ("{{upstream}} {{state}}", "sum by (upstream, state) (relay_endpoint_state)"),
    ], 8),
    ("Available endpoints by model", "short", [
        ("{{model}}", "min by (model) (relay_model_available_endpoints)"),
    ], 8),
    ("Tokens by model", "short", [
        ("{{model}} {{kind}}", f"sum by (model, kind) (rate(relay_tokens_total[{RATE}]))"),
    ], 8),
    ("Quota spend by model (units/s)", "short", [
        ("{{model}}", f"sum by (model) (rate(relay_quota_units_charged_total[{RATE}]))"),
    ], 8),
    ("Quota rejections and requests in flight", "short", [
        ("quota rejections/s", f"sum(rate(relay_quota_rejections_total[{RATE}]))"),
        ("in flight", "sum(relay_requests_in_flight)"),
    ], 12),
    ("Store operation latency p99", "s", [
        ("{{op}}", f"histogram_quantile(0.99, sum by (le, op) (rate(relay_store_operation_seconds_bucket[{RATE}])))"),
    ], 12),
    # Cached prompt tokens are billed at the model's cached_input price: the higher, the cheaper.
    ("Prompt cache hit ratio by model (cached / prompt tokens), affinity first choice", "percentunit", [
        ("{{model}}", f'sum by (model) (rate(relay_tokens_total{{kind="cached"}}[{RATE}])) '
                      f'/ sum by (model) (rate(relay_tokens_total{{kind="prompt"}}[{RATE}]))'),
        ("affinity first choice", f'sum(rate(relay_affinity_total{{outcome="first_choice"}}[{RATE}])) '
                                  f"/ sum(rate(relay_affinity_total[{RATE}]))"),
    ], 12),
]


def dashboard() -> dict:
    panels, x, y = [], 0, 0
    for i, (title, unit, targets, width) in enumerate(PANELS):
        if x + width > 24:
            x, y = 0, y + 8
        panels.append({
            "id": i + 1, "type": "timeseries", "title": title,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": width, "x": x, "y": y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(65 + j), "expr": expr, "legendFormat": legend}
                        for j, (legend, expr) in enumerate(targets)],
        })
        x += width
    return {
        "uid": "relay", "title": "relay", "schemaVersion": 39, "version": 1, "editable": True,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "30s", "tags": ["relay"],
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus"}]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    out = Path(__file__).parent / "grafana" / "dashboards" / "relay.json"
    out.write_text(render())
    print(f"wrote {out}")
