"""Small pure functions compiled with ``torch.compile``, falling back to eager where compiling fails.

The decoder's glue (RMSNorm, the gated activation, RoPE, the dropout hash) is a chain of elementwise ops;
eager PyTorch runs each as its own pass over memory, and on CPU those passes cost more than the LoRA matmuls.
Compiling just these functions fuses each chain into one kernel without compiling the model (whole-layer
compilation was slower on CPU: graph breaks at the LoRA autograd function). Shapes are marked dynamic, so a
new sequence length does not recompile.

Whether to compile is the caller's: every call passes ``compile`` from the run's
:class:`~lorafit.options.RuntimeOptions`. A compiler failure falls back to the eager function (same math)
for the rest of the process, with one warning.

Under a ``TorchDispatchMode`` (``MemTracker`` in ``lorafit measure`` and the estimator's validation) a plain
call runs the eager path, so what is measured is tensor by tensor (these kernels allocate only their outputs,
no more); :meth:`Compiled.kernel` runs the compiled kernel out of the tracker's sight and shows it the outputs,
for kernels whose eager form would allocate what the compiled one does not (the dropout hash, the fused
gated-MLP backward).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from lorafit._compat import dispatch_mode_active, dispatch_modes_disabled

log = logging.getLogger(__name__)


class Compiled:
    """``fn`` compiled on first use when asked to; eager ``fn`` otherwise or once compiling has failed."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self._compiled: Callable | None = None
        self._failed = False

    @property
    def failed(self) -> bool:
        return self._failed

    def usable(self, compile: bool) -> bool:
        """Whether a plain call runs compiled: asked to, not failed, and no memory tracker watching."""
        return compile and not self._failed and not dispatch_mode_active()

    def __call__(self, *args, compile: bool):
        if not self.usable(compile):
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

    def kernel(self, *args, compile: bool = True):
        """Call as one fused kernel, also under a memory tracker (see :func:`unseen`)."""
        return unseen(lambda *a: self(*a, compile=compile), *args)


def unseen(fn: Callable, *args):
    """``fn(*args)``; under a dispatch mode (a memory tracker) run out of its sight and hand it copies of the
    outputs, so it sees what a fused kernel allocates rather than an eager run's temporaries."""
    if not dispatch_mode_active():
        return fn(*args)
    with dispatch_modes_disabled():
        res = fn(*args)

    def seen(t):
        return torch.empty_like(t).copy_(t) if isinstance(t, torch.Tensor) else t

    return tuple(seen(t) for t in res) if isinstance(res, tuple) else seen(res)


def compiled(fn: Callable) -> Compiled:
    return Compiled(fn)
