"""Model architectures, one per file, built from layers that call the dispatch table."""
