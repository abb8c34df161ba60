"""Evaluate queries with pyjuice itself (patched to run its Triton kernels in the interpreter on CPU).

Usage: `python run_pyjuice_reference.py REQUEST.pt RESPONSE.pt`. Runs in its own process because
`TRITON_INTERPRET=1` only takes effect before triton is first imported.

REQUEST is a dict saved with `torch.save`: `{"jpc": path, "queries": [query, ...]}`; the queries run in
order and the response is the list of their results. Query kinds:

- `{"kind": "log_prob", "x": [B, V] long, "missing": [B, V] | [V] bool | None}` -> [B] log-likelihoods
- `{"kind": "soft_log_prob", "x": [B, V, C] float in [0, 1]}` -> [B] log-likelihoods under soft evidence
- `{"kind": "conditional", "x", "missing", "target_vars": list[int]}` -> [B, T, C] probabilities
- `{"kind": "em", "batches": list of [b, V] long, "pseudocount": float, "step_size": float,
  "missing": None | a [V] mask | list of masks like `batches`, "out_jpc": path}` -> None; one full-batch
  EM step over all batches (flows accumulated, then a single update) on a freshly compiled copy of the
  circuit, saved to `out_jpc`; other queries never see the updated parameters.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from pyjuice_cpu import enable_pyjuice_on_cpu  # noqa: E402

enable_pyjuice_on_cpu()

import pyjuice as juice  # noqa: E402
import torch  # noqa: E402


def _log_prob(pc: juice.TensorCircuit, query: dict) -> torch.Tensor:
    """`pc(x, missing_mask=m)`: log-likelihood, marginalising the variables where the mask is True."""
    return pc(query["x"], missing_mask=query.get("missing")).reshape(-1).detach().clone()


def _soft_log_prob(pc: juice.TensorCircuit, query: dict) -> torch.Tensor:
    """Log-likelihood under soft evidence, through the query API's soft-evidence forward kernel."""
    return juice.queries.marginal(pc, data=query["x"].clone()).reshape(-1).detach().clone()


def _conditional(pc: juice.TensorCircuit, query: dict) -> torch.Tensor:
    """`juice.queries.conditional`: p(x_t = c | observed) for each target variable t."""
    return juice.queries.conditional(
        pc, data=query["x"], missing_mask=query.get("missing"), target_vars=query["target_vars"]
    ).clone()


def _em(pc: juice.TensorCircuit, query: dict) -> None:
    """One full-batch EM step: accumulate parameter flows over every batch, then one update."""
    masks = query.get("missing")
    if not isinstance(masks, list):
        masks = [masks] * len(query["batches"])
    pc.init_param_flows(flows_memory=0.0)
    for x, m in zip(query["batches"], masks, strict=True):
        pc(x, missing_mask=m)
        pc.backward(x, flows_memory=1.0, missing_mask=m)
    pc.mini_batch_em(step_size=query["step_size"], pseudocount=query["pseudocount"])
    juice.io.save(str(query["out_jpc"]), pc)


_HANDLERS = {"log_prob": _log_prob, "soft_log_prob": _soft_log_prob, "conditional": _conditional, "em": _em}


def _compile(jpc: str) -> juice.TensorCircuit:
    return juice.compile(juice.io.load(str(jpc)), disable_gpu_compilation=True, verbose=False)


def main(request_path: str, response_path: str) -> None:
    """Compile the circuit on CPU, answer every query in order, save the list of results."""
    torch.set_num_threads(1)
    request = torch.load(request_path, weights_only=False)
    pc = _compile(request["jpc"])
    results = []
    for query in request["queries"]:
        target = _compile(request["jpc"]) if query["kind"] == "em" else pc
        results.append(_HANDLERS[query["kind"]](target, query))
    torch.save(results, response_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
