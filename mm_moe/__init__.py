"""mm-moe: a BEiT-3-style multimodal encoder whose FFNs can be Mixture-of-Experts layers."""

__version__ = "0.1.0"
