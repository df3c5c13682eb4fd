"""Ryzanstein desktop app: a PySide6 front end that talks to the core service only over HTTP."""

__version__ = "0.1.0"
