"""Tests of the Grafana dashboards: validity, provisioning, and every panel's SQL on PostgreSQL."""
