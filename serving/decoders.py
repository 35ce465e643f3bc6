"""Decoding in worker processes: the step that runs a client's bytes through Pillow's C code, kept
where a bad file can cost only a bounded amount of time and memory.

Threads cannot be interrupted inside a C decoder: a 731 KB progressive JPEG of 10,000 scans held
a decode thread for 29 s after its request had timed out. A process can be killed. So every image
too costly to decode inline (see ``serving.handlers``) goes to one of ``SERVING_DECODE_WORKERS``
processes (``python -m serving.decoders``), and a decode that passes ``SERVING_DECODE_TIMEOUT_S``,
or whose request is cancelled (timeout, client gone), is stopped by killing its process; a fresh
one takes its place. Each process also runs under a hard data-segment limit of its start-up size
plus the freed memory it keeps for its next decode (``model_store.preprocess.keep_freed_memory``:
without it every decode faulted its pages in afresh, a third of a small photo's CPU) plus
``SERVING_MAX_DECODE_MB``, so peak decode memory is at most workers x (start-up + kept + limit), by
the kernel's count rather than by an estimate (the estimate, ``decode_cost_bytes``, refuses most
costly images earlier, from their header, with a clearer message).

Each process is fed by one thread of the parent: the thread writes the request to a pipe and waits
on the answer with the GIL released, so the event loop only pays for the hop to that thread, as it
did when decodes ran on threads. Processes are started on threads of their own, never on the
feeding threads: a replacement queued behind waiting decodes would never start once every feeding
thread waited for an idle process (three slow images at once stopped all decoding for good).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import pickle
import queue
import resource
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import NamedTuple

import numpy as np

from model_store import ImageError, ModelCard, image_bytes_to_input
from model_store.preprocess import keep_freed_memory
from serving.errors import DecodersUnavailable

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0  # a decoder imports numpy and Pillow; on a loaded 2-core machine that can take seconds
_PIPE_BYTES = 1 << 20  # Linux's default maximum for unprivileged pipes: one 224x224 answer in one write
READY = b"ready"
# The protocol, two messages each way: (card, max_pixels, max_decode_bytes) pickled, then the image
# as it came; back, the input's raw uint8 pixels, or "!" and the ImageError's message. Raw bytes
# rather than pickles: half the CPU per image at 224x224.


class DecodePool:
    """``await pool.decode(data, card)`` -> the model input, or ImageError; ``size`` processes."""

    def __init__(self, size: int, timeout_s: float, max_pixels: int, max_decode_bytes: int):
        self.size, self.timeout_s = size, timeout_s
        self.limits = (max_pixels, max_decode_bytes)
        self.restarts = 0  # decoders killed (timeout, cancel) or crashed, and replaced
        # One feeding thread per process, so a thread always finds a process idle (or starting).
        self.threads = ThreadPoolExecutor(size, thread_name_prefix="decode")
        # Each of the ``size`` slots holds an idle decoder, or the reason its process could not start.
        self.idle: queue.SimpleQueue[_Decoder | _StartFailed] = queue.SimpleQueue()
        self.started = False
        self.start_error: str | None = None  # the last failed start's reason, until a start succeeds

    def start(self) -> None:
        """Start the processes, in the background; the first decode does it if nobody has."""
        if not self.started:
            self.started = True
            for _ in range(self.size):
                self._start_one()

    async def decode(self, data: bytes, card: ModelCard) -> np.ndarray:
        self.start()
        job = _Job()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.threads, self._run, job, data, card)
        except asyncio.CancelledError:  # the request's deadline passed or its client left: stop the work too
            job.cancel()
            raise

    def _run(self, job: _Job, data: bytes, card: ModelCard) -> np.ndarray:
        decoder = self.idle.get()
        if isinstance(decoder, _StartFailed):
            # This request gets the reason, not a wait until its deadline; the slot tries again, off
            # its path, so a passing shortage (memory, processes) heals and a broken install keeps saying so.
            self._start_one()
            raise DecodersUnavailable(decoder.reason)
        try:
            if not job.start(decoder):
                raise ImageError("decode cancelled")  # nobody awaits this any more
            decoder.requests.send_bytes(pickle.dumps((card, *self.limits)))
            reply = decoder.ask(data, self.timeout_s)
        except (TimeoutError, EOFError, OSError) as err:  # too slow, killed by a cancel, or crashed
            decoder.kill()
            exit_code = decoder.process.wait()
            self.restarts += 1
            if isinstance(err, TimeoutError):
                message = f"decoding took longer than {self.timeout_s:g} s (SERVING_DECODE_TIMEOUT_S); stopped"
            elif job.cancelled:
                message = "decode cancelled"
            else:  # a crash inside a C decoder: the file is the likeliest cause, but say what we saw
                logger.warning("decoder process exited with %s on a %d-byte image; replaced", exit_code, len(data))
                message = "the decoder crashed on this image"
            decoder = None
            self._start_one()  # a replacement, started off this request's path
            raise ImageError(message) from None
        finally:
            if decoder is not None:
                self.idle.put(decoder)
        if reply[:1] == b"!":
            raise ImageError(reply[1:].decode())
        return np.frombuffer(reply, np.uint8).reshape(card.in_channels, card.height, card.width)

    def _start_one(self) -> None:
        threading.Thread(target=self._add, name="decoder-start", daemon=True).start()

    def _add(self) -> None:
        try:
            decoder = _Decoder.start()
        except Exception as err:  # a broken install, or no memory or processes left: say so, loudly, once per try
            logger.exception("could not start a decoder process")
            self.start_error = f"no decoder process could start: {' '.join(str(err).split()) or type(err).__name__}"
            self.idle.put(_StartFailed(self.start_error))
            return
        self.start_error = None
        self.idle.put(decoder)

    def close(self) -> None:
        while not self.idle.empty():
            decoder = self.idle.get()
            if isinstance(decoder, _StartFailed):
                continue
            decoder.kill()
            decoder.process.wait()  # reaped: no zombie left behind
        self.threads.shutdown(wait=False, cancel_futures=True)


class _StartFailed(NamedTuple):
    """A slot whose decoder process could not start, and why."""

    reason: str


class _Job:
    """One decode: lets the event loop stop it from outside the thread that runs it."""

    def __init__(self):
        self.lock, self.decoder, self.cancelled = threading.Lock(), None, False

    def start(self, decoder: _Decoder) -> bool:
        with self.lock:
            self.decoder = decoder
            return not self.cancelled

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True
            if self.decoder is not None:
                self.decoder.kill()


class _Decoder:
    """One ``python -m serving.decoders`` process and the two pipes to it."""

    def __init__(self, process: subprocess.Popen, requests: Connection, replies: Connection):
        self.process, self.requests, self.replies = process, requests, replies

    @classmethod
    def start(cls) -> _Decoder:
        to_child, from_parent = _pipe()
        to_parent, from_child = _pipe()
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
        env["OPENBLAS_NUM_THREADS"] = "1"  # numpy's BLAS threads would only cost memory here
        process = subprocess.Popen(
            [sys.executable, "-m", "serving.decoders", str(from_parent), str(to_parent)],
            pass_fds=(from_parent, to_parent),
            stdin=subprocess.DEVNULL,
            env=env,
        )
        os.close(from_parent)
        os.close(to_parent)
        decoder = cls(process, Connection(to_child, readable=False), Connection(from_child, writable=False))
        if decoder.ask(b"", START_TIMEOUT_S) != READY:
            raise RuntimeError("decoder process did not start")
        return decoder

    def ask(self, request: bytes, timeout_s: float) -> bytes:
        self.requests.send_bytes(request)
        if not self.replies.poll(timeout_s):
            raise TimeoutError
        return self.replies.recv_bytes()

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: the one thing a decoder stuck in C code cannot ignore


def _pipe() -> tuple[int, int]:
    """(write end, read end) of a new pipe, with room for one answer."""
    read, write = os.pipe()
    try:
        fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
    except (OSError, AttributeError):  # a lower system maximum, or not Linux: smaller writes, same result
        pass
    return write, read


def serve(requests: Connection, replies: Connection) -> None:
    """The decoder process: answer each request with the model input, or the ImageError's message."""
    try:
        requests.recv_bytes()  # the parent's "are you up?", answered once the imports are done
        replies.send_bytes(READY)
        kept = keep_freed_memory()
        limited = False
        while True:
            card, max_pixels, max_decode_bytes = pickle.loads(requests.recv_bytes())
            data = requests.recv_bytes()
            if not limited:
                _limit_memory(max_decode_bytes + kept)
                limited = True
            try:
                reply = image_bytes_to_input(data, card, max_pixels, max_decode_bytes).ravel().data
            except (ImageError, MemoryError) as err:
                reason = str(err) if isinstance(err, ImageError) else "not enough memory to decode this image"
                reply = b"!" + reason.encode()
            replies.send_bytes(reply)
    except EOFError:  # the service is gone
        return


def _limit_memory(max_decode_bytes: int) -> None:
    """Cap the data segment (heap and private mappings, VmData) at its size now plus one decode.

    Linux only: elsewhere (a developer's Mac) the size now is unknown and the limit is left off;
    the header estimate still refuses costly images.
    """
    if (now := _data_segment_bytes()) is None:
        logger.warning("no /proc/self/status: decoder processes run without a hard memory limit")
        return
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = now + max_decode_bytes
    resource.setrlimit(resource.RLIMIT_DATA, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


def _data_segment_bytes() -> int | None:
    """This process's data segment (VmData), which RLIMIT_DATA counts: heap and private mappings."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024
    return None


if __name__ == "__main__":
    # Our answers go through the pipe; anything printed goes to the service's log, never into the pipe.
    serve(Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False))
