"""The `diredi` command line."""
