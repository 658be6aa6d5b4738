"""Model folders shipped with MeloFormer (``meloformer-pd-2m/``), as package data."""
