"""MeloFormer: long-context symbolic-music transformers on HID-encoded multi-track MIDI."""

__version__ = "0.1.0"
