"""Run pyjuice 2.6.3's own Triton kernels on a CPU through Triton's interpreter.

pyjuice is GPU-only; CI has no GPU, yet it must show that the package's PyTorch circuit computes what pyjuice
computes. `enable_pyjuice_on_cpu()` applies the smallest set of runtime monkeypatches (nothing on disk is
touched) under which pyjuice's unmodified forward, backward, EM and query kernels execute in
`TRITON_INTERPRET=1` mode. Every patch below only changes *where* or *in which precision* a kernel runs,
never what it computes, so the numbers are pyjuice's own. See docs/circuits.md#pyjuice-without-a-gpu.

The interpreter flag is read when triton is first imported, so this must run in a fresh process (the tests
start one with `run_pyjuice_reference.py`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

_INPUT_LAYER_DEVICE_GATED = (
    "forward",
    "backward",
    "sample",
    "mini_batch_em",
    "eval_partition_fn",
    "add_missing_flows",
    "_accum_flows_to_tied_nodes",
)

_enabled = False


def _require_interpreter() -> None:
    """Set the interpreter flags, or fail loudly if triton was already imported without them.

    `PYJUICE_FAST_LAUNCH=0` disables pyjuice's launch cache, which talks to the (absent) CUDA driver and
    otherwise falls back to the plain launch only after catching the resulting exception.
    """
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["PYJUICE_FAST_LAUNCH"] = "0"
        return
    from triton import knobs

    if not knobs.runtime.interpret:
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set; use a fresh process")
    if "pyjuice" in sys.modules and os.environ.get("PYJUICE_FAST_LAUNCH", "1") != "0":
        raise RuntimeError("pyjuice was imported before PYJUICE_FAST_LAUNCH=0 was set; use a fresh process")
    os.environ["PYJUICE_FAST_LAUNCH"] = "0"


def _numpy_elementwise(np_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a numpy ufunc as an interpreter-level Triton elementwise op.

    In interpreter mode a `tl.tensor` holds a numpy array in `.handle.data`; the result keeps the type
    (shape and dtype) of the first tensor argument, which is what libdevice's fp32 overloads return.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    def op(*args: Any, _semantic: Any = None) -> Any:
        ref = next(a for a in args if isinstance(a, tl.tensor))
        vals = [
            a.handle.data if isinstance(a, tl.tensor) else np.asarray(getattr(a, "value", a)) for a in args
        ]
        out = np.asarray(np_fn(*vals)).astype(ref.handle.data.dtype)
        return tl.tensor(TensorHandle(out, ref.handle.dtype.scalar), ref.type)

    return op


def _patch_libdevice() -> None:
    """Replace the libdevice externs pyjuice calls (`log1p`, `pow`, `ceil`) by numpy versions.

    libdevice functions lower to CUDA bitcode calls, which the interpreter refuses ("extern_elementwise not
    supported"). pyjuice binds `tlmath = tl.extra.cuda.libdevice` as a module object (also inside the input
    layer kernels it generates from source), so patching the attributes of that module reaches every call.
    """
    import numpy as np
    from triton.language.extra.cuda import libdevice

    libdevice.log1p = _numpy_elementwise(np.log1p)
    libdevice.pow = _numpy_elementwise(np.power)
    libdevice.ceil = _numpy_elementwise(np.ceil)


@contextlib.contextmanager
def _cuda_calls_as_cpu() -> Iterator[None]:
    """Within the block, `torch.cuda.current_device()` is 0 and `torch.cuda.device(...)` does nothing.

    `TensorCircuit._init_layers` calls both unconditionally ("Torch not compiled with CUDA enabled"), even
    under `disable_gpu_compilation=True`; the device index is only used to enter that context.
    """
    import torch

    saved = torch.cuda.current_device, torch.cuda.device
    torch.cuda.current_device = lambda: 0
    torch.cuda.device = lambda *args, **kwargs: contextlib.nullcontext()
    try:
        yield
    finally:
        torch.cuda.current_device, torch.cuda.device = saved


def _patch_compile() -> None:
    """Run `TensorCircuit._init_layers` with the CUDA device queries neutralised (see `_cuda_calls_as_cpu`)."""
    from pyjuice.model.tensorcircuit import TensorCircuit

    original = TensorCircuit._init_layers

    @functools.wraps(original)
    def init_layers(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _cuda_calls_as_cpu():
            return original(self, *args, **kwargs)

    TensorCircuit._init_layers = init_layers


def _num_nodes_gcd(self: Any) -> int:
    """GCD of the run lengths of identical variable scopes in `vids`, computed where `vids` lives.

    Replaces `InputLayer._get_num_nodes_gcd`, which computes the same number but first moves `vids` to the
    GPU with an unconditional `.cuda()`.
    """
    import torch

    _, counts = torch.unique_consecutive(self.vids, dim=0, return_counts=True)
    return functools.reduce(math.gcd, counts.tolist())


class _InterpretedCudaDevice(str):
    """A device that pyjuice's input layer takes for CUDA and torch takes for the CPU.

    The input layer gates every kernel launch on `"cuda" in self.device.type` and raises NotImplementedError
    otherwise, although its Triton kernels are exactly what we want to run in the interpreter. Torch accepts
    a `str` (subclass) wherever it accepts a device, so tensors the layer allocates from `self.device` still
    land on the CPU.
    """

    type = "cuda (triton interpreter on cpu)"
    index = None


def _device_gated(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run an input-layer method with `self.device` seen as CUDA for the duration of the call only."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        device = self.device
        if getattr(device, "type", None) != "cpu":
            return method(self, *args, **kwargs)
        self.device = _InterpretedCudaDevice("cpu")
        try:
            return method(self, *args, **kwargs)
        finally:
            self.device = device

    return wrapper


def _patch_input_layer() -> None:
    """Let the Categorical input layer launch its own Triton kernels on CPU tensors."""
    from pyjuice.layer.input_layer import InputLayer

    InputLayer._get_num_nodes_gcd = _num_nodes_gcd
    for name in _INPUT_LAYER_DEVICE_GATED:
        setattr(InputLayer, name, _device_gated(getattr(InputLayer, name)))


def _patch_sum_forward_precision() -> None:
    """Force the fp32 branch of the block-sparse sum-layer forward.

    With tiles of at least 16 (block size >= 16 and batch >= 16) pyjuice multiplies in bf16 via `tl.dot`;
    the interpreter keeps bf16 as raw uint16 bits and multiplies those as integers (errors of ~1e9). In
    fp32 the interpreter's `tl.dot` is an exact numpy matmul. The backward kernels already use fp32 dots.
    """
    from pyjuice.layer.sum_layer import SumLayer

    original = SumLayer._forward_block_sparse

    @functools.wraps(original)
    def forward_block_sparse(self: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["force_use_bf16"] = False
        kwargs["force_use_fp32"] = True
        return original(self, *args, **kwargs)

    SumLayer._forward_block_sparse = forward_block_sparse


_SCALAR_MASK = "missing_mask = True"
_VECTOR_MASK = "missing_mask = tl.full((BLOCK_SIZE,), 1, tl.int1)"


def _patch_generated_input_kernels() -> None:
    """Give the generated missing-flows kernel a vector mask instead of the scalar `missing_mask = True`.

    `InputLayer._missing_flows_kernel_template` (the EM statistics of marginalised inputs) sets that scalar
    and the Categorical `bk_flow_mask_fn` spliced into it indexes it as `missing_mask[:, None]`. The compiler
    accepts this; the interpreter turns the assignment into a rank-0 tensor and rejects the indexing ("too
    many indices for tensor of rank 0"). An all-True mask over the block's lanes means the same thing.
    """
    from pyjuice.layer import input_layer

    original = input_layer.make_function_from_src

    @functools.wraps(original)
    def make_function_from_src(src: str) -> Any:
        return original(src.replace(_SCALAR_MASK, _VECTOR_MASK))

    input_layer.make_function_from_src = make_function_from_src


def enable_pyjuice_on_cpu() -> None:
    """Apply all patches (idempotent). Call before compiling any circuit, in a process where triton was
    either not imported yet or imported with `TRITON_INTERPRET=1`."""
    global _enabled
    if _enabled:
        return
    _require_interpreter()
    _patch_libdevice()
    _patch_compile()
    _patch_input_layer()
    _patch_generated_input_kernels()
    _patch_sum_forward_precision()
    _enabled = True
