"""`diredi sim`: the DiReDi loop run in-process on a scenario, measured honestly with int8 models."""
