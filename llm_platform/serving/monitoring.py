"""The serving dashboard for Grafana: the platform's and vLLM's metrics, as Ray exports them.

Ray writes the Grafana dashboards of its own metrics under the session folder
(``<session>/metrics/grafana/dashboards/``); ``llmp serve`` writes this one beside them
(:func:`write_dashboard`), so a Grafana provisioned from Ray's folder shows it too, and it
can be imported by hand (Dashboards > New > Import). Every panel is a PromQL query over
Ray's Prometheus export; the test suite runs each against a real Prometheus.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

FILE_NAME = "llmp_serving_grafana_dashboard.json"
UID = "llmp-serving"


@dataclass(frozen=True)
class Panel:
    title: str
    exprs: tuple[tuple[str, str], ...]
    """(PromQL, legend) pairs."""
    unit: str = "short"


def _quantiles(metric: str, by: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket[1m])))", f"p{int(q * 100)} {{{{{by}}}}}")
                 for q in (0.5, 0.99))


PANELS = (
    Panel("Requests per second by model and status",
          (("sum by (model, status) (rate(ray_llmp_requests_total[1m]))", "{{model}} {{status}}"),), "reqps"),
    Panel("Requests per second by adapter",
          (('sum by (model, adapter) (rate(ray_llmp_requests_total{adapter!=""}[1m]))', "{{model}}:{{adapter}}"),),
          "reqps"),
    Panel("HTTP errors per second (Serve proxy, 503 = overloaded or replica replaced)",
          (("sum by (error_code) (rate(ray_serve_num_http_error_requests_total[1m]))", "{{error_code}}"),), "reqps"),
    Panel("Time to first token (platform)", _quantiles("ray_llmp_time_to_first_token_seconds", "model"), "s"),
    Panel("End-to-end request latency (platform)", _quantiles("ray_llmp_request_seconds", "model"), "s"),
    Panel("End-to-end request latency (vLLM engine)",
          _quantiles("ray_vllm_e2e_request_latency_seconds", "model_name"), "s"),
    Panel("Inter-token latency (vLLM)", _quantiles("ray_vllm_inter_token_latency_seconds", "model_name"), "s"),
    Panel("Queue time before scheduling (vLLM)", _quantiles("ray_vllm_request_queue_time_seconds", "model_name"),
          "s"),
    Panel("Prompt and generated tokens per second (vLLM)",
          (("sum by (model_name) (rate(ray_vllm_prompt_tokens_total[1m]))", "prompt {{model_name}}"),
           ("sum by (model_name) (rate(ray_vllm_generation_tokens_total[1m]))", "generated {{model_name}}")), "short"),
    Panel("Requests in the engine (vLLM running / waiting)",
          (("sum by (model_name) (ray_vllm_num_requests_running)", "running {{model_name}}"),
           ("sum by (model_name) (ray_vllm_num_requests_waiting)", "waiting {{model_name}}")), "short"),
    Panel("KV cache use (vLLM)", (("max by (model_name) (ray_vllm_kv_cache_usage_perc)", "{{model_name}}"),),
          "percentunit"),
    Panel("Adapter loads, evictions and cache hits",
          (("sum by (model, event) (increase(ray_llmp_adapter_events_total[5m]))", "{{model}} {{event}}"),), "short"),
)


def dashboard() -> dict:
    """The Grafana dashboard (schema 39), with a Prometheus data-source variable as Ray's own dashboards have."""
    panels = []
    for i, panel in enumerate(PANELS):
        panels.append({
            "id": i + 1, "type": "timeseries", "title": panel.title,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
            "targets": [{"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend,
                         "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                        for j, (expr, legend) in enumerate(panel.exprs)],
        })
    return {
        "uid": UID, "title": "LLM platform: serving", "schemaVersion": 39, "version": 1, "editable": True,
        "time": {"from": "now-30m", "to": "now"}, "refresh": "10s", "tags": ["llm-platform", "ray", "vllm"],
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Data source", "current": {}, "hide": 0}]},
        "panels": panels,
    }


def dashboard_json_path(folder: str | Path | None = None) -> Path:
    """Where :func:`write_dashboard` puts the JSON: Ray's dashboards folder of the current session by default."""
    if folder is None:
        folder = ray_dashboards_folder()
    return Path(folder) / FILE_NAME


def ray_dashboards_folder() -> Path:
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    return session / "metrics" / "grafana" / "dashboards"


def write_dashboard(folder: str | Path | None = None) -> Path:
    path = dashboard_json_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dashboard(), indent=1) + "\n")
    return path
