"""Ctrl-C during training: finish the step, save, then stop.

Python delivers `KeyboardInterrupt` between any two bytecodes, so an interrupt that lands
inside a step can leave the trainer in a state no checkpoint should hold: the loader moved on
past a batch the model never saw, or the donated state half replaced. While training runs, the
first SIGINT only sets a flag that the loop reads between steps; the loop then writes a
checkpoint of the last finished step and raises `TrainingInterrupted`. A second SIGINT raises
`KeyboardInterrupt` at once (nothing more is saved; the last checkpoint stays valid, since
checkpoint writes are atomic).
"""

import signal
import threading
from types import FrameType


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C after finishing its step (and saving, with an `out_dir`).

    **Attributes:**

    - `step`: the last step trained.
    - `checkpoint`: the directory of the checkpoint that holds it, or `None` if nothing was
      saved (a trainer without an `out_dir`).
    """

    def __init__(self, step: int, checkpoint: str | None):
        where = (
            f"checkpoint saved in {checkpoint}; run the same command again to resume"
            if checkpoint is not None
            else "nothing saved (no output directory)"
        )
        super().__init__(f"interrupted after step {step}: {where}.")
        self.step = step
        self.checkpoint = checkpoint


class DeferredInterrupt:
    """A context in which the first SIGINT is recorded (`requested`) instead of raised.

    Only the main thread can install signal handlers; elsewhere the context does nothing and
    Ctrl-C behaves as usual. The previous handler is restored on exit.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del signum, frame
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "DeferredInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
