"""Triton's interpreter (TRITON_INTERPRET=1: the kernels as numpy on a CPU) under numpy >= 2.4.

The interpreter (Triton 3.6) turns a scalar kernel argument used as a loop bound, as in
`range(0, H, BLOCK)`, into a Python int with int() of a one-element 1-d array, which numpy 2.4
refuses ("only 0-dimensional arrays can be converted to Python scalars"). Every kernel with such a
loop then fails on a CPU. The kernels' CPU tests (tests/test_acceleration_triton.py) and the
benchmarks' CPU rehearsals call `allow_scalar_loop_bounds()` first; GPUs never run this.
"""

from __future__ import annotations


def allow_scalar_loop_bounds() -> bool:
    """Give the interpreter's tensors an __index__ that reads their one value, where numpy refuses
    int() of a 1-element array. Idempotent; returns whether the patch was needed."""
    import numpy as np
    from triton.runtime import interpreter

    try:
        int(np.array([1]))
        return False
    except TypeError:
        pass
    if getattr(interpreter._patch_lang_tensor, "_qlora_scalar_bounds", False):
        return True
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patch_lang_tensor._qlora_scalar_bounds = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
