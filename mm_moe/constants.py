"""Constants shared across layers of the package."""

IGNORE_INDEX = -100
"""Label of a position without a target (PyTorch cross-entropy's default ignore_index)."""

__all__ = ["IGNORE_INDEX"]
