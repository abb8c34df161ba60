"""trifle: a declarative reproduction of "A Tractable Inference Perspective of Offline RL"."""

__version__ = "0.1.0"
