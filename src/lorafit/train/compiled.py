"""Small pure functions compiled with ``torch.compile``, falling back to eager where compiling fails.

The decoder's glue (RMSNorm, the gated activation) is a chain of elementwise ops; eager PyTorch runs each as
its own pass over memory, and on CPU those passes cost more than the LoRA matmuls. Compiling just these
functions fuses each chain into one kernel without compiling the model (whole-layer compilation was slower
on CPU: graph breaks at the LoRA autograd function). Shapes are marked dynamic, so a new sequence length
does not recompile. ``LORAFIT_COMPILE=0`` turns it off; without a working compiler it falls back by itself.
Under a ``TorchDispatchMode`` (``MemTracker`` in ``lorafit measure`` and the estimator's validation) a plain
call runs the eager path, so what is measured is tensor by tensor (these kernels allocate only their outputs,
no more); :meth:`Compiled.kernel` runs the compiled kernel out of the tracker's sight and shows it the outputs,
for kernels whose eager form would allocate what the compiled one does not (the dropout hash, the fused
gated-MLP backward).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import _disable_current_modes, _get_current_dispatch_mode

log = logging.getLogger(__name__)


def enabled() -> bool:
    return os.environ.get("LORAFIT_COMPILE", "1") not in ("0", "false", "no", "off")


def active() -> bool:
    """Whether compiled kernels run here: on, and no dispatch mode (a memory tracker) is watching."""
    return enabled() and _get_current_dispatch_mode() is None


class Compiled:
    """``fn`` compiled on first use; eager ``fn`` when compiling is off or fails (see :func:`active`)."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self._compiled: Callable | None = None
        self._failed = False

    @property
    def failed(self) -> bool:
        return self._failed

    @property
    def usable(self) -> bool:
        return not self._failed and active()

    @property
    def available(self) -> bool:
        """Compiling is on and has not failed: :meth:`kernel` runs the compiled kernel."""
        return not self._failed and enabled()

    def __call__(self, *args):
        if not self.usable:
            return self.fn(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True)
        try:
            return self._compiled(*args)
        except Exception as e:  # no C++ compiler, unsupported device or dtype: the eager function is the same math
            log.warning("torch.compile of %s failed (%s: %s); using eager PyTorch", self.fn.__name__,
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self._failed = True
            return self.fn(*args)

    def kernel(self, *args):
        """Call as one fused kernel, also under a memory tracker (see :func:`unseen`)."""
        return unseen(self, *args)


def unseen(fn: Callable, *args):
    """``fn(*args)``; under a dispatch mode (a memory tracker) run out of its sight and hand it copies of the
    outputs, so it sees what a fused kernel allocates rather than an eager run's temporaries."""
    if _get_current_dispatch_mode() is None:
        return fn(*args)
    with _disable_current_modes():
        res = fn(*args)

    def seen(t):
        return torch.empty_like(t).copy_(t) if isinstance(t, torch.Tensor) else t

    return tuple(seen(t) for t in res) if isinstance(res, tuple) else seen(res)


def compiled(fn: Callable) -> Compiled:
    return Compiled(fn)
