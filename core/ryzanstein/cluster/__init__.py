"""LAN cluster: discovery (zeroconf), PIN pairing (SPAKE2), pinned mutual TLS, and one model split across PCs."""
