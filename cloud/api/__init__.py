"""The operator REST API (DESIGN §5): the app, its dependencies and problems, one router per resource."""
