"""Ryzanstein core: the headless engine and service. Never imports Qt or the desktop app.

Heavy libraries (torch, transformers) are imported where they are used so that `ryzanstein --help` is fast.
"""

__version__ = "0.1.0"
