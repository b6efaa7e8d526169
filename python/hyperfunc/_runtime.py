"""The background asyncio loop that runs ``async def`` hyperfunctions.

hyperfunc's engine runs on Rust worker threads; a coroutine from a Python hyperfunction is
submitted to one event loop on a daemon thread, so every call of a generation is in flight at
once, whatever loop (if any) the caller runs.
"""

import asyncio
import threading
import traceback

_loop = None
_lock = threading.Lock()


def loop() -> asyncio.AbstractEventLoop:
    """The background loop, started on first use."""
    global _loop
    with _lock:
        if _loop is None:
            new = asyncio.new_event_loop()
            thread = threading.Thread(target=new.run_forever, name="hyperfunc-asyncio", daemon=True)
            thread.start()
            _loop = new
    return _loop


def submit(coro, done) -> None:
    """Runs ``coro`` on the loop; calls ``done(True, result)`` or ``done(False, traceback)``."""
    future = asyncio.run_coroutine_threadsafe(coro, loop())

    def _finished(f):
        try:
            result = f.result()
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the engine
            done(False, "".join(traceback.format_exception(type(e), e, e.__traceback__)))
        else:
            done(True, result)

    future.add_done_callback(_finished)
