"""The kernel interface: op contracts, the registry and per-engine dispatch."""
