"""How every fast-path patch replaces a module's forward (apply.py, fused_layer.py)."""

from __future__ import annotations

import types


def replace_forward(module, forward) -> None:
    """Bind `forward(self, ...)` as module.forward and keep the forward it replaces, as a bound
    method, in module._qlora_original_forward. Patched forwards fall back through
    self._qlora_original_forward and look every module up on self, never in a closure:
    copy.deepcopy rebinds bound methods, so a copy of the model runs its own modules."""
    module._qlora_original_forward = module.forward
    module.forward = types.MethodType(forward, module)
