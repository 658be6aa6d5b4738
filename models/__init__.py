"""Model folders shipped with MeloFormer (``meloformer-pd-1m/``), as package data."""
