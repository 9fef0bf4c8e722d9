"""Grafana dashboards for the registry (DESIGN §5), built from Python with grafana-foundation-sdk."""
