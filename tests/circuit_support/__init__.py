"""Helpers that run pyjuice itself as the reference for the package's CPU circuit.

`pyjuice_cpu.enable_pyjuice_on_cpu()` patches pyjuice 2.6.3 so that its Triton kernels run in Triton's
interpreter on a CPU; `run_pyjuice_reference.py` is the subprocess that answers queries with it.
"""
