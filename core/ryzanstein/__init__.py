"""Ryzanstein core: the headless engine and service. Never imports Qt or the desktop app.

Heavy libraries (torch, transformers) are imported where they are used so that `ryzanstein --help` is fast.
"""

import os

# torch's OpenMP workers (GNU libgomp) spin for ~300,000 iterations after every parallel region before they
# sleep. Between native decode steps the engine runs small torch ops (a batch's argmax, sampling), and those
# spinning workers then take the cores the native step's own pool needs: 8 concurrent requests ran at
# 506-574 tokens/s instead of 762-810 (default model, 2 cores). 10,000 spins keep back-to-back torch regions
# (the transformers path, training) as fast as before (plain decode loop 37.0-38.7 vs 38.4-40.6 tokens/s).
# Read by libgomp when it loads, so it is set before anything imports torch; a value the user set wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

__version__ = "0.1.0"
