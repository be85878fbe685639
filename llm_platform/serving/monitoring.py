"""The serving dashboard for Grafana: panels over the platform's and vLLM's metrics as Ray exports them."""

from __future__ import annotations

from pathlib import Path

DASHBOARD = Path(__file__).with_name("grafana_dashboard.json")


def dashboard_json_path() -> Path:
    return DASHBOARD
