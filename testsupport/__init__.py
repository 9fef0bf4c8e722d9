"""What the tests and the benchmarks share and the product never imports (an import-linter contract):
servers of one's own on loopback (PostgreSQL databases, redis-server, mosquitto)."""
