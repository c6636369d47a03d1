"""The service's error hierarchy: every failure the service reports is one of these."""


class StrokeGateError(Exception):
    """Base class of all errors raised on purpose by StrokeGate."""


class InputError(StrokeGateError):
    """A study, series or parameter that cannot be analysed; the reason is the message."""


class DeliveryError(StrokeGateError):
    """A result could not be delivered to a destination; the send is retried."""


class ModelError(StrokeGateError):
    """A model file that cannot be used: missing, not matching its card, or its card not matching
    what the service feeds it; or no inference backend that can run it. The reason is the message."""


class SetupError(StrokeGateError):
    """The service cannot run as configured (a port in use, a database it cannot reach, a
    certificate it cannot read): the message is one line saying what is wrong and what to do."""
