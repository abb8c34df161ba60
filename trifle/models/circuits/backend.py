"""Choosing the execution backend, and saving/loading circuits as pyjuice ``.jpc`` files.

"torch" runs :class:`TorchCircuit` (any device, the only choice without CUDA); "pyjuice" runs
pyjuice's compiled Triton ``TensorCircuit`` (CUDA only). Both read and write the same .jpc files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from trifle.errors import CheckpointError, ConfigError, DataError, TrifleError
from trifle.io import atomic_path

from .torch_circuit import TorchCircuit

BACKENDS = ("auto", "torch", "pyjuice")
# pyjuice 2.6.3 dispatches the backward pass of a sum layer whose node blocks hold 2 nodes (an HCLT whose
# num_latents is 2 times an odd number: pyjuice blocks by the largest power of two dividing it) to its
# block-sparse kernel, which then fails its own assertion
# ("TILE_SIZE_K should be greater than 4"); conditionals and EM both run that pass. Seen on an H200.
PYJUICE_MIN_BLOCK = 4


def resolve_backend(name: str, block_size: int | None = None) -> str:
    """Map a backend name to the one that will run: "auto" picks pyjuice on CUDA, torch otherwise.

    ``block_size`` (the circuit's node-block size, when known: :func:`circuit_block_size`) rules
    pyjuice out for blocks its backward kernels cannot run (:data:`PYJUICE_MIN_BLOCK`): "auto" then
    picks torch, and an explicit "pyjuice" is an error.
    """
    pyjuice_fits = block_size is None or block_size == 1 or block_size >= PYJUICE_MIN_BLOCK
    if name == "auto":
        return "pyjuice" if torch.cuda.is_available() and pyjuice_fits else "torch"
    if name == "torch":
        return "torch"
    if name == "pyjuice":
        if not torch.cuda.is_available():
            raise ConfigError(
                "backend='pyjuice' needs a CUDA GPU: pyjuice's kernels are Triton GPU kernels and this "
                "machine has no CUDA device; use backend='torch' or 'auto'"
            )
        if not pyjuice_fits:
            raise ConfigError(
                f"backend='pyjuice' cannot run this circuit: its node blocks hold {block_size} nodes and "
                f"pyjuice 2.6's backward kernels need 1 or at least {PYJUICE_MIN_BLOCK} (pyjuice blocks "
                "pc.num_latents by its largest power-of-two divisor); use backend='torch' or 'auto', or "
                "a num_latents divisible by 4"
            )
        return "pyjuice"
    raise ConfigError(f"backend: unknown name {name!r}; valid names are {', '.join(BACKENDS)}")


def save_circuit(root_ns_or_circuit, path: str | Path) -> None:
    """Write a pyjuice node set, a TorchCircuit or a PyjuiceCircuit to ``path`` (.jpc), atomically."""
    import pyjuice as juice

    path = Path(path)
    if path.suffix != ".jpc":
        raise ConfigError(f"{path}: circuit files must end in .jpc (pyjuice's format)")
    obj = root_ns_or_circuit
    if isinstance(obj, TorchCircuit):
        obj.write_to_nodes(obj.root_ns)
        obj = obj.root_ns
    elif isinstance(obj, PyjuiceCircuit):
        obj = obj.pc
    elif not isinstance(obj, juice.nodes.CircuitNodes):
        raise ConfigError(
            f"save_circuit: expected pyjuice nodes or a circuit object, got {type(obj).__name__}"
        )
    with atomic_path(path) as tmp:
        juice.io.save(str(tmp), obj)


def load_circuit(
    path: str | Path,
    *,
    backend: str = "auto",
    device: str | torch.device | None = None,
    expect_num_vars: int | None = None,
    expect_num_cats: int | None = None,
):
    """Load a .jpc file into an object with ``log_prob``/``conditional`` (TorchCircuit or PyjuiceCircuit)."""
    import pyjuice as juice

    resolve_backend(backend)  # a bad name or a missing GPU fails before the file is read
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: circuit file not found")
    if path.suffix != ".jpc":
        raise CheckpointError(f"{path}: expected a pyjuice .jpc circuit file")
    try:
        root_ns = juice.io.load(str(path))
    except Exception as exc:  # pickle and pyjuice raise many types for truncated/corrupt files
        raise CheckpointError(
            f"{path}: cannot read the circuit file, it is corrupt or not a .jpc ({exc})"
        ) from exc
    backend = resolve_backend(backend, circuit_block_size(root_ns))
    try:
        if backend == "torch":
            circuit = TorchCircuit.from_nodes(root_ns, device=device or "cpu")
        else:
            circuit = PyjuiceCircuit(root_ns, device=device or "cuda")
    except TrifleError as exc:
        raise CheckpointError(f"{path}: unsupported circuit ({exc})") from exc
    _check_expected(path, "num_vars", expect_num_vars, circuit.num_vars)
    _check_expected(path, "num_cats", expect_num_cats, circuit.num_cats)
    return circuit


def _check_expected(path: Path, what: str, expected: int | None, found: int) -> None:
    if expected is not None and expected != found:
        raise CheckpointError(f"{path}: expected a circuit with {what}={expected}, found {what}={found}")


def circuit_block_size(root_ns) -> int:
    """The largest node-block size among the circuit's sum node sets (what pyjuice's kernels see)."""
    return max((ns.block_size for ns in root_ns if ns.is_sum()), default=1)


def _shape_info(root_ns) -> tuple[int, int]:
    """(num_vars, num_cats) of a node set whose inputs are univariate Categoricals."""
    inputs = [ns for ns in root_ns if ns.is_input()]
    cats = {getattr(ns.dist, "num_cats", None) for ns in inputs}
    if len(cats) != 1 or None in cats:
        raise TrifleError(f"inputs must be Categorical with one shared num_cats, found {cats}")
    return 1 + max(max(ns.scope.to_list()) for ns in inputs), cats.pop()


class PyjuiceCircuit:
    """Thin adapter giving pyjuice's compiled circuit the TorchCircuit query API (CUDA only).

    Soft evidence: pyjuice 2.6.3 takes a float [B, V, C] tensor in [0, 1] in place of hard data, but
    it (a) overwrites the weights of masked variables with 1 and (b) ignores a target variable's own
    weights in ``conditional``. So evidence is passed as a full weight tensor with no mask (one-hot
    for observed variables), weights are scaled into [0, 1] with the scale added back to log p, and
    a target's own weights multiply pyjuice's conditional before renormalising.
    """

    def __init__(self, root_ns, device: str | torch.device = "cuda"):
        import pyjuice as juice

        self.root_ns = root_ns
        self.num_vars, self.num_cats = _shape_info(root_ns)
        self.device = torch.device(device)
        self.pc = juice.compile(root_ns)
        self.pc.to(self.device)

    def _hard(self, x: torch.Tensor, missing) -> tuple[torch.Tensor, torch.Tensor | None]:
        if x.dim() != 2 or x.size(1) != self.num_vars:
            raise DataError(f"x: expected a tensor [batch, {self.num_vars}], got {tuple(x.shape)}")
        x = x.long().to(self.device)
        if missing is None:
            return x, None
        missing = missing.to(self.device, torch.bool)
        x = torch.where(missing, torch.zeros_like(x), x)
        return x, missing.unsqueeze(0).expand_as(x).contiguous() if missing.dim() == 1 else missing

    def _soft(self, x: torch.Tensor, missing, soft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full weight tensor in [0, 1] and the per-sample log of the scale that was divided out."""
        x, miss = self._hard(x, missing)
        miss = torch.zeros_like(x, dtype=torch.bool) if miss is None else miss
        soft = soft.to(self.device, torch.float32)
        if soft.shape != (*x.shape, self.num_cats) or bool((soft < 0).any()):
            raise DataError(
                f"soft_evidence: expected non-negative weights of shape {(*x.shape, self.num_cats)}"
            )
        onehot = torch.nn.functional.one_hot(x, self.num_cats).float()
        ev = torch.where(miss.unsqueeze(-1), soft, onehot)
        scale = ev.amax(dim=-1, keepdim=True)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return (ev / scale).contiguous(), scale.squeeze(-1).log().sum(dim=-1)

    def log_prob(self, x: torch.Tensor, missing=None, soft_evidence=None) -> torch.Tensor:
        import pyjuice as juice

        if soft_evidence is None:
            data, miss = self._hard(x, missing)
            return juice.queries.marginal(self.pc, data=data, missing_mask=miss)[:, 0]
        data, logscale = self._soft(x, missing, soft_evidence)
        return juice.queries.marginal(self.pc, data=data)[:, 0] + logscale

    def conditional(
        self, x: torch.Tensor, missing, target_vars: Sequence[int], soft_evidence=None
    ) -> torch.Tensor:
        import pyjuice as juice

        targets = [int(t) for t in target_vars]
        data, miss = self._hard(x, missing)
        miss = torch.zeros_like(data, dtype=torch.bool) if miss is None else miss.clone()
        miss[:, targets] = True
        if soft_evidence is None:
            return juice.queries.conditional(self.pc, data=data, missing_mask=miss, target_vars=targets)
        # pyjuice replaces a target's weights by 1, so each target is queried on its own with the
        # other targets' soft evidence kept, and its own weights applied afterwards (as TorchCircuit).
        out = []
        for t in targets:
            weights = soft_evidence.to(self.device, torch.float32).clone()
            own = weights[:, t : t + 1, :].clone()
            weights[:, t, :] = 1.0
            ev, _ = self._soft(data, miss, weights)
            probs = juice.queries.conditional(self.pc, data=ev, target_vars=[t]) * own
            out.append(probs / probs.sum(dim=-1, keepdim=True))
        return torch.cat(out, dim=1)

    def __repr__(self) -> str:
        return f"PyjuiceCircuit(num_vars={self.num_vars}, num_cats={self.num_cats}, device={self.device})"
