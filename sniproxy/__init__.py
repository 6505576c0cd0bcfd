"""sniproxy: a TLS SNI proxy with an eBPF data plane."""

__version__ = "0.1.0"
