"""onsft: on-policy supervised fine-tuning (DDT audit, hinted-decoding rewrite, IDFT training)."""

__version__ = "0.1.0"
