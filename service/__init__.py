"""StrokeGate: the acute-stroke imaging microservice (research use only, not for diagnosis)."""

__version__ = "0.1.0"
