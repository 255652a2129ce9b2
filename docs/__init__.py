"""Documentation sources; `docs/examples/` holds every snippet as a tested module."""
