"""Errors of the cloud package, under one base class; the CLI turns them into clear messages."""


class CloudError(Exception):
    """Base class of every error the cloud raises on purpose."""


class ScenarioError(CloudError):
    """A scenario file is missing, not JSON, or breaks the format; the text names the field."""


class ExportError(CloudError):
    """An edge model could not be exported, or its int8 accuracy fell too far below float."""


class KnowledgeError(CloudError):
    """Knowledge reports cannot be used: wrong base model, shape, or nothing usable."""
