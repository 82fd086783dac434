"""msit: multi-scenario interest transfer on Ray."""

__version__ = "0.1.0"
