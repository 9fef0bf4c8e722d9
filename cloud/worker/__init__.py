"""The pipeline's Celery workers: thin tasks over `cloud.pipeline`, the job leases in the registry."""
