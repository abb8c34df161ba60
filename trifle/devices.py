"""Device choice shared by training and evaluation (and the benchmarks): one rule for `auto` and `cuda`."""

from __future__ import annotations

import torch

from trifle.errors import ConfigError


def resolve_device(name: str) -> str:
    """`auto` picks CUDA when present; asking for CUDA without it is a clear error, not a crash later."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda: no CUDA device is available on this machine (use device=cpu or auto)")
    return name
