"""Errors of the device package, one base class so callers can catch them together."""

from wire.errors import ContractError


class DeviceError(Exception):
    """Base class of every error the device package raises on purpose."""


class ClockNotSetError(DeviceError, ContractError):
    """A signed document cannot be judged yet: the device's clock is not set (before NTP answered);
    it is to be applied again once it is."""


class ArtifactError(DeviceError):
    """A model artifact cannot be loaded or does not match its manifest."""


class InvalidSamplesError(DeviceError, ValueError):
    """Private samples or labels that do not fit the model (shape, count or class range)."""


class ImageError(DeviceError, ValueError):
    """An image file that cannot be the model's input: unreadable, too large, or for a model that does
    not take images; the text names the file."""


class PrivacyStateError(DeviceError):
    """The privacy accountant's state file is unreadable or inconsistent."""


class NotEnoughSamplesError(DeviceError):
    """RD was asked to report from fewer labelled samples than `min_samples`."""


class PrivacyBudgetExhaustedError(DeviceError):
    """Sending another report would spend more privacy than the device's budget allows."""


class SpoolError(DeviceError):
    """The on-disk spool cannot be opened (corrupt, not a spool) or written (disk full, I/O error)."""


class SpoolFullError(SpoolError):
    """Adding a message would take the spool past its `max_bytes`; nothing already spooled is dropped."""


class FeedbackError(DeviceError, ValueError):
    """A labelled sample that cannot be stored: wrong shape, non-finite values, bad label, bad file."""


class FeedbackFullError(FeedbackError):
    """The private feedback store already holds its `max_samples`."""


class FeedbackStoreError(DeviceError):
    """The private feedback store on disk is unreadable, corrupt or was made for another input shape."""


class SlotError(DeviceError):
    """The A/B model slots cannot do what was asked (nothing staged, unreadable pointer, disk error)."""


class DownloadError(DeviceError):
    """An artifact download was refused or failed; the text names the check (oversized, truncated, HTTP
    status, network) so it can go into a model ack as is."""


class DownloadBusy(DownloadError):
    """The server asked to try again later (429 or 503); `retry_after` seconds, as it said."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DownloadCancelled(DeviceError):
    """A download stopped because the daemon is shutting down; not a failed install, nothing to ack."""


class ConfigError(DeviceError):
    """The configuration file is missing, unreadable or invalid; the message names the key."""


class SourceError(DeviceError):
    """An input source cannot be opened (its file or directory is missing or malformed)."""


class EnrolmentError(DeviceError):
    """The cloud refused the device's enrolment for good (refused, enrolled already, a bad request)."""
