"""Errors of the device package, one base class so callers can catch them together."""


class DeviceError(Exception):
    """Base class of every error the device package raises on purpose."""


class ArtifactError(DeviceError):
    """A model artifact cannot be loaded or does not match its manifest."""


class InvalidSamplesError(DeviceError, ValueError):
    """Private samples or labels that do not fit the model (shape, count or class range)."""


class PrivacyStateError(DeviceError):
    """The privacy accountant's state file is unreadable or inconsistent."""


class NotEnoughSamplesError(DeviceError):
    """RD was asked to report from fewer labelled samples than `min_samples`."""


class PrivacyBudgetExhaustedError(DeviceError):
    """Sending another report would spend more privacy than the device's budget allows."""
