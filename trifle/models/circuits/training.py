"""Full-batch EM for HCLT circuits, with pyjuice 2.6.3's update rule and resumable per-epoch checkpoints.

pyjuice's ``mini_batch_em(step_size, pseudocount)`` (keep_zero_params=False) sets, for every sum
node n with n_ch children and every Categorical leaf (n_ch = num_cats):

    new_theta[n, c] = (flow[n, c] + pseudocount / n_ch) / (sum_c' flow[n, c'] + pseudocount)
    theta          <- (1 - step_size) * theta + step_size * new_theta

where flow are the expected counts summed over every sample seen since the flows were reset. Full-
batch EM resets once per epoch, accumulates over all mini-batches, then updates once.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from trifle.errors import CheckpointError, ConfigError
from trifle.io import atomic_path
from trifle.models.training_common import partial_path

from .backend import circuit_block_size, resolve_backend, save_circuit
from .hclt import build_hclt, validate_tokens
from .torch_circuit import TorchCircuit

_CKPT_VERSION = 1
#: Initialisations of ``train_circuit``: build_hclt's seeded random parameters, or latent variable
#: distillation (trifle.models.circuits.lvd).
INITS = ("random", "lvd")


def _flows(circuit: TorchCircuit, x: torch.Tensor, missing) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """Parameter flows (expected counts, summed over the batch) and the summed log-likelihood.

    theta * d(sum_b log p_b)/d theta equals pyjuice's parameter flow for both sum edges and leaves.
    """
    p_in = circuit.input_params.detach().clone().requires_grad_(True)
    p_sum = [w.detach().clone().requires_grad_(True) for w in circuit.sum_params()]
    ev = circuit.evidence(x, missing)
    with torch.enable_grad():
        ll = circuit.forward_evidence(ev, p_in, p_sum).sum()
        grads = torch.autograd.grad(ll, [p_in, *p_sum])
    f_in = (p_in.detach() * grads[0]).double()
    f_sum = [(w.detach() * g).double() for w, g in zip(p_sum, grads[1:], strict=True)]
    return f_in, f_sum, float(ll.detach())


def _em_update(old: torch.Tensor, flows: torch.Tensor, mask: torch.Tensor, pseudocount: float, step: float):
    """pyjuice's update along the last axis; rows with no flow and no pseudocount keep their old value."""
    nch = mask.sum(dim=-1, keepdim=True).clamp(min=1).double()
    flows = flows * mask
    num = (flows + pseudocount / nch) * mask
    den = flows.sum(dim=-1, keepdim=True) + pseudocount
    new = torch.where(den > 0, num / den.clamp(min=1e-300), old.double())
    return ((1.0 - step) * old.double() + step * new).to(old.dtype)


def em_step(
    circuit: TorchCircuit,
    batches: Iterable[torch.Tensor],
    *,
    pseudocount: float,
    step_size: float = 1.0,
    missing: torch.Tensor | None = None,
) -> float:
    """One full-batch EM update from flows accumulated over all ``batches``.

    Returns the mean log-likelihood per sample of the data under the parameters *before* the update.
    ``missing`` ([V] bool, optional) marginalises those variables in every batch.
    """
    if pseudocount < 0:
        raise ConfigError(f"pseudocount: expected >= 0, got {pseudocount}")
    if not 0.0 < step_size <= 1.0:
        raise ConfigError(f"step_size: expected a value in (0, 1], got {step_size}")
    acc_in, acc_sum, total_ll, count = None, None, 0.0, 0
    for x in batches:
        f_in, f_sum, ll = _flows(circuit, x, missing)
        acc_in = f_in if acc_in is None else acc_in + f_in
        acc_sum = f_sum if acc_sum is None else [a + f for a, f in zip(acc_sum, f_sum, strict=True)]
        total_ll += ll
        count += x.size(0)
    if count == 0:
        raise ConfigError("em_step: batches is empty; nothing to train on")
    new_in = _em_update(
        circuit.input_params,
        acc_in,
        circuit.input_valid.unsqueeze(-1).expand_as(acc_in),
        pseudocount,
        step_size,
    )
    new_sum = [
        _em_update(w, f, m, pseudocount, step_size)
        for w, f, m in zip(circuit.sum_params(), acc_sum, circuit.sum_masks(), strict=True)
    ]
    circuit.set_params(new_in, new_sum)
    return total_ll / count


def _batches(data: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [data[i : i + batch_size] for i in range(0, data.size(0), batch_size)]


def mean_log_likelihood(circuit, data: torch.Tensor, batch_size: int) -> float:
    """Mean log-likelihood per sample (nats), evaluated in batches to bound memory."""
    total = sum(float(circuit.log_prob(x).double().sum()) for x in _batches(data, batch_size))
    return total / data.size(0)


def _fingerprint(train: torch.Tensor, valid: torch.Tensor, settings: dict) -> dict:
    """Everything that makes a partial run incompatible: settings, data shapes and a data checksum."""
    digest = hashlib.sha256(train.long().contiguous().numpy().tobytes()).hexdigest()[:16]
    return {
        **settings,
        "train_shape": list(train.shape),
        "valid_shape": list(valid.shape),
        "train_sha256": digest,
    }


def _load_partial(path: Path, fingerprint: dict) -> dict | None:
    """Return the saved state if ``path`` exists and was made with the same settings and data."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/corrupt pickles
        raise CheckpointError(
            f"{path}: cannot read the partial training checkpoint ({exc}); delete it to restart"
        ) from exc
    if not isinstance(state, dict) or state.get("version") != _CKPT_VERSION:
        raise CheckpointError(
            f"{path}: not a partial training checkpoint of version {_CKPT_VERSION}; delete it to restart"
        )
    saved = state.get("fingerprint", {})
    for key in sorted(set(saved) | set(fingerprint)):
        if saved.get(key) != fingerprint.get(key):
            raise CheckpointError(
                f"{path}: partial checkpoint was made with {key}={saved.get(key)!r} but this run has "
                f"{key}={fingerprint.get(key)!r}; delete the file to restart or restore the setting"
            )
    return state


def _save_partial(
    path: Path,
    circuit: TorchCircuit,
    epoch: int,
    history: list,
    seconds: float,
    fingerprint: dict,
    init_info: dict | None = None,
):
    state = {
        "version": _CKPT_VERSION,
        "fingerprint": fingerprint,
        "epoch": epoch,
        "history": history,
        "seconds": seconds,
        "input_params": circuit.input_params.clone(),
        "sum_params": [w.clone() for w in circuit.sum_params()],
    }
    if init_info:
        state["init"] = init_info
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def train_circuit(
    train: torch.Tensor,
    valid: torch.Tensor,
    *,
    num_cats: int,
    num_latents: int,
    epochs: int,
    batch_size: int,
    pseudocount: float,
    seed: int,
    out_path: str | Path,
    backend: str = "auto",
    progress: bool = True,
    structure: str = "exact-mi",
    init: str = "random",
    lvd: Mapping[str, Any] | None = None,
) -> dict:
    """Build an HCLT from ``train``, run ``epochs`` full-batch EM epochs, write ``out_path`` (.jpc).

    ``init``: ``"random"`` keeps build_hclt's seeded random parameters; ``"lvd"`` replaces them, before
    the first epoch, by latent variable distillation (trifle.models.circuits.lvd) with the ``lvd``
    settings (defaults: ``lvd.LVD_DEFAULTS``).

    Resumable: a ``<out_path>.partial.pt`` checkpoint is written after every epoch and picked up by
    the next call with the same settings and data; it is removed once the .jpc is written.
    """
    resolve_backend(backend)  # a bad name or a missing GPU fails before any work
    _validate_settings(train, valid, num_cats, epochs, batch_size, pseudocount)
    if init not in INITS:
        raise ConfigError(f"pc.init: expected one of {', '.join(INITS)}, got {init!r}")
    out_path = Path(out_path)
    if out_path.suffix != ".jpc":
        raise ConfigError(f"out_path: expected a file name ending in .jpc, got {out_path}")
    settings = {
        "num_cats": num_cats,
        "num_latents": num_latents,
        "batch_size": batch_size,
        "pseudocount": float(pseudocount),
        "seed": seed,
        "backend": backend,
        "structure": structure,
    }
    initialise = None
    if init == "lvd":
        from .lvd import lvd_initialise, lvd_settings

        # Only an LVD run adds its keys, so a random-init fingerprint is exactly what it was before.
        settings["init"] = init
        settings["lvd"] = lvd_cfg = lvd_settings(lvd)
    root_ns = build_hclt(train, num_cats=num_cats, num_latents=num_latents, seed=seed, structure=structure)
    settings["backend"] = backend = resolve_backend(backend, circuit_block_size(root_ns))
    if init == "lvd":

        def initialise(circuit: TorchCircuit) -> dict:
            return lvd_initialise(
                circuit,
                train,
                num_cats=num_cats,
                pseudocount=pseudocount,
                seed=seed,
                settings=lvd_cfg,
                out_path=out_path.with_name(out_path.name + ".lvd-mlm"),
                device="cuda" if backend == "pyjuice" else "cpu",
                progress=progress,
            )

    fingerprint = _fingerprint(train, valid, settings)
    run = _train_pyjuice if backend == "pyjuice" else _train_torch
    metrics = run(
        root_ns, train, valid, epochs, batch_size, pseudocount, out_path, fingerprint, progress, initialise
    )
    metrics["init"] = init
    return metrics


def _validate_settings(train, valid, num_cats: int, epochs: int, batch_size: int, pseudocount: float) -> None:
    validate_tokens(train, num_cats, name="train")
    validate_tokens(valid, num_cats, name="valid")
    if train.size(1) != valid.size(1):
        raise ConfigError(f"valid: expected {train.size(1)} variables like train, got {valid.size(1)}")
    if not isinstance(epochs, int) or epochs < 0:
        raise ConfigError(f"epochs: expected an integer >= 0, got {epochs!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    if not (isinstance(pseudocount, int | float) and math.isfinite(pseudocount) and pseudocount >= 0):
        raise ConfigError(f"pseudocount: expected a finite number >= 0, got {pseudocount!r}")


def _resume(
    circuit: TorchCircuit, out_path: Path, fingerprint: dict, epochs: int, initialise=None
) -> tuple[Path, int, list, float, dict]:
    """Load a matching partial checkpoint into ``circuit``: (its path, epochs done, history, seconds,
    init record). Without one, ``initialise(circuit)`` (LVD) sets the starting parameters, if given."""
    partial = partial_path(out_path)
    state = _load_partial(partial, fingerprint)
    if state is None:
        init_info = {}
        if initialise is not None:
            init_info = initialise(circuit)
            # Keep the distilled start, so that a run stopped during the first epoch does not distil again.
            _save_partial(partial, circuit, 0, [], 0.0, fingerprint, init_info)
        return partial, 0, [], 0.0, init_info
    if state["epoch"] > epochs:
        raise CheckpointError(f"{partial}: already holds {state['epoch']} epochs but epochs={epochs}")
    circuit.set_params(state["input_params"], state["sum_params"])
    return partial, state["epoch"], list(state["history"]), float(state["seconds"]), state.get("init", {})


def _train_torch(
    root_ns, train, valid, epochs, batch_size, pseudocount, out_path, fingerprint, progress, initialise=None
) -> dict:
    circuit = TorchCircuit.from_nodes(root_ns)
    partial, start, history, seconds, init_info = _resume(circuit, out_path, fingerprint, epochs, initialise)
    num_vars = train.size(1)
    batches = _batches(train.long(), batch_size)
    for epoch in tqdm(
        range(start, epochs), desc="EM epochs", disable=not progress, initial=start, total=epochs
    ):
        t0 = time.perf_counter()
        ll = em_step(circuit, batches, pseudocount=pseudocount)
        seconds += time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "train_ll_per_var": ll / num_vars, "seconds": seconds})
        _save_partial(partial, circuit, epoch + 1, history, seconds, fingerprint, init_info)
    metrics = _final_metrics(circuit, train, valid, batch_size, epochs, seconds, history, "torch", init_info)
    circuit.write_to_nodes(root_ns)
    save_circuit(root_ns, out_path)
    partial.unlink(missing_ok=True)
    return metrics


def _final_metrics(
    circuit, train, valid, batch_size, epochs, seconds, history, backend: str, init_info=None
) -> dict:
    """``seconds`` is the whole training time: the initialisation (LVD; 0 for random) plus the EM epochs."""
    num_vars = train.size(1)
    init_seconds = float((init_info or {}).get("seconds", 0.0))
    metrics = {
        "train_ll_per_var": mean_log_likelihood(circuit, train.long(), batch_size) / num_vars,
        "heldout_ll_per_var": mean_log_likelihood(circuit, valid.long(), batch_size) / num_vars,
        "epochs": epochs,
        "seconds": seconds + init_seconds,
        "em_seconds": seconds,
        "init_seconds": init_seconds,
        "num_params": circuit.num_params,
        "num_nodes": circuit.num_nodes,
        "backend": backend,
        "history": history,
    }
    if init_info:
        metrics["lvd"] = init_info
    return metrics


def _pow2_chunks(n: int) -> list[int]:
    """Split n into a multiple of 128 plus powers of two, largest first (e.g. 300 -> 256, 32, 8, 4).

    pyjuice 2.6.3's block-sparse parameter-flow kernel drops the last ``batch % TILE_SIZE_B`` samples
    of a batch; TILE_SIZE_B is a power of two <= min(128, next_pow2(batch)), so every chunk produced
    here is divisible by its tile and no sample loses its flows.
    """
    head = n - n % 128
    sizes = [head] if head else []
    rest = n % 128
    bit = 64
    while rest:
        if rest >= bit:
            sizes.append(bit)
            rest -= bit
        bit //= 2
    return sizes


def pyjuice_epoch(pc, batches: list[torch.Tensor], pseudocount: float, device) -> float:
    """Accumulate flows over all batches (split by :func:`_pow2_chunks`), then one EM update."""
    pc.init_param_flows(flows_memory=0.0)
    total = 0.0
    for x in batches:
        start = 0
        for size in _pow2_chunks(x.size(0)):
            chunk = x[start : start + size].to(device)
            start += size
            lls = pc(chunk)
            pc.backward(chunk, flows_memory=1.0)
            total += float(lls.double().sum())
    pc.mini_batch_em(step_size=1.0, pseudocount=pseudocount)
    return total / sum(x.size(0) for x in batches)


def _train_pyjuice(
    root_ns, train, valid, epochs, batch_size, pseudocount, out_path, fingerprint, progress, initialise=None
) -> dict:
    """Same loop as :func:`_train_torch` on pyjuice's compiled circuit (CUDA); checkpoints hold the
    parameters in TorchCircuit layout so a run can resume on either backend's state."""
    import pyjuice as juice

    device = torch.device("cuda")
    circuit = TorchCircuit.from_nodes(root_ns)
    partial, start, history, seconds, init_info = _resume(circuit, out_path, fingerprint, epochs, initialise)
    circuit.write_to_nodes(root_ns)
    pc = juice.compile(root_ns)
    pc.to(device)
    batches = _batches(train.long(), batch_size)
    for epoch in tqdm(
        range(start, epochs), desc="EM epochs", disable=not progress, initial=start, total=epochs
    ):
        t0 = time.perf_counter()
        ll = pyjuice_epoch(pc, batches, pseudocount, device)
        torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "train_ll_per_var": ll / train.size(1), "seconds": seconds})
        pc.update_parameters()
        circuit = TorchCircuit.from_nodes(root_ns)
        _save_partial(partial, circuit, epoch + 1, history, seconds, fingerprint, init_info)
    pc.update_parameters()
    circuit = TorchCircuit.from_nodes(root_ns, device=device)
    metrics = _final_metrics(
        circuit, train, valid, batch_size, epochs, seconds, history, "pyjuice", init_info
    )
    save_circuit(root_ns, out_path)
    partial.unlink(missing_ok=True)
    return metrics
