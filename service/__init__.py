"""StrokeGate: the acute-stroke imaging microservice (research use only, not for diagnosis)."""

from importlib.metadata import version

__version__ = version("strokegate")  # pyproject.toml's, the one place it is written
