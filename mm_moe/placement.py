"""Where the MoE layers go: the grammar of `model.moe_layers` and the layers it names (checked when a config
loads, used when the encoder is built)."""

from __future__ import annotations

from mm_moe.errors import ConfigError


def moe_layer_ids(depth: int, placement: str) -> set[int]:
    """Which layers get MoE FFNs: "none", "all", "every_other" (layers 1, 3, 5, ...: torchscale's moe_freq=2, the
    MH-MoE code), "every_other_even" (0, 2, 4, ...: the CartesianMoE code's GShard formation), "top<N>" (the
    last N), or an explicit comma-separated list of layer indices ("0,5,11")."""
    if placement == "none":
        return set()
    if placement == "all":
        return set(range(depth))
    if placement == "every_other":
        return set(range(1, depth, 2))
    if placement == "every_other_even":
        return set(range(0, depth, 2))
    if placement.startswith("top") and placement[3:].isdigit() and 0 < int(placement[3:]) <= depth:
        return set(range(depth - int(placement[3:]), depth))
    parts = [p.strip() for p in placement.split(",")]
    if all(p.isdigit() for p in parts) and all(int(p) < depth for p in parts) and len(set(parts)) == len(parts):
        return {int(p) for p in parts}
    raise ConfigError(f"moe_layers: expected none, all, every_other, every_other_even, top<N> with N <= depth={depth}, "
                      f"or distinct layer indices below {depth} like '1,3,5', got {placement!r}")


__all__ = ["moe_layer_ids"]
