"""Probabilistic circuits (HCLT via pyjuice): construction, CPU/PyTorch execution, EM training, .jpc I/O."""

from .backend import PyjuiceCircuit, circuit_block_size, load_circuit, resolve_backend, save_circuit
from .hclt import build_hclt
from .torch_circuit import TorchCircuit
from .training import em_step, mean_log_likelihood, train_circuit

__all__ = [
    "circuit_block_size",
    "PyjuiceCircuit",
    "TorchCircuit",
    "build_hclt",
    "em_step",
    "load_circuit",
    "mean_log_likelihood",
    "resolve_backend",
    "save_circuit",
    "train_circuit",
]
