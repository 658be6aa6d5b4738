"""The bundled demo corpus (``midi/``, sources in ``SOURCES.md``), shipped as package data."""
