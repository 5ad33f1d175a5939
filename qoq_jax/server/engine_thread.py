"""EngineThread: the engine driven by a background thread, with a thread-safe front (submit,
cancel, release_when_done) and its health (alive, error) for /health."""

from __future__ import annotations

import logging
import threading
import time

from qoq_jax.errors import EngineBusyError

log = logging.getLogger("qoq_jax.serve")


class EngineThread:
    """Runs Engine.step() in a background thread while there is work; thread-safe front."""

    # after idling, wait this long for the rest of a burst of requests, so that they are
    # admitted (and prefilled) together rather than one step apart
    COALESCE_S = 0.01

    def __init__(self, engine):
        self.engine = engine
        self.error: BaseException | None = None  # the last step failure (requests failed)
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="qoq-engine", daemon=True)

    @property
    def alive(self) -> bool:
        """The thread is running (False before start() and after stop())."""
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            if not self.engine.has_work:
                if self._wake.wait(0.05):
                    time.sleep(self.COALESCE_S)
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except EngineBusyError:  # someone else drives it for a moment (a notebook?)
                time.sleep(0.01)
            except Exception as e:  # noqa: BLE001 - fail the requests, keep serving
                log.exception("engine step failed")
                self.error = e
                # the exception's text stays in the log: clients read only that it failed
                self.engine.fail_all("internal engine error")

    def submit(self, ids, params, callback) -> int:
        rid = self.engine.submit(ids, params, callback=callback)
        self._wake.set()
        return rid

    def submit_prompt_logprobs(self, ids, n_top: int):
        """A concurrent.futures.Future of the prompt's eval.scoring.PromptLogprobs, computed
        by the engine's thread between steps."""
        future = self.engine.submit_prompt_logprobs(ids, n_top)
        self._wake.set()
        return future

    def cancel(self, rid: int, reason: str = "abort") -> None:
        self.engine.cancel(rid, reason)
        self._wake.set()

    def release_when_done(self, rid: int) -> None:
        self.engine.release_when_done(rid)

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
