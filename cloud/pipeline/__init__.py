"""The pipeline: services that run the ML of `cloud.ml` and record what it made in the registry."""
