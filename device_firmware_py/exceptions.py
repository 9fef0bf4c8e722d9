"""Errors of the device package, one base class so callers can catch them together."""


class DeviceError(Exception):
    """Base class of every error the device package raises on purpose."""


class ArtifactError(DeviceError):
    """A model artifact cannot be loaded or does not match its manifest."""


class NotEnoughSamplesError(DeviceError):
    """RD was asked to report from fewer labelled samples than `min_samples`."""


class PrivacyBudgetExhaustedError(DeviceError):
    """Sending another report would spend more privacy than the device's budget allows."""
