"""Worker processes for shared-upload tests: each writes one segment of a
``checkpoint_io.SharedUpload`` it joins from a token, as a rank of a training job would.

They live in an installed module (not in a test file) so that ``multiprocessing``'s spawn
context can import them in a fresh interpreter. Data is derived from a seed, so the parent
knows what each segment holds without sending it across.
"""

from __future__ import annotations

import random
import time
import traceback

__all__ = ["segment_data", "write_segment", "zero_blocks"]

#: How a worker behaves: write its segment and close it; raise halfway; or send part of it
#: and then wait to be killed (SIGKILL mid-segment).
MODES = ("ok", "raise", "hang")


def segment_data(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def zero_blocks(missing: int) -> bytes:
    """A pad callable as a tar writer would give: whole 512-byte blocks of zeros."""
    return bytes(-(-missing // 512) * 512)


def write_segment(file, token: str, index: int, seed: int, size: int, mode: str,
                  results, chunk: int = 256 * 1024) -> None:
    """Join the upload, write segment ``index`` in ``chunk``-byte writes, and put
    ``(index, "ok", receipt JSON)`` or ``(index, "error", text)`` on ``results``; in mode
    ``hang``, ``(index, "sent", bytes)`` once over half is written, then wait forever."""
    import faulthandler

    from checkpoint_io import SharedUpload

    # A worker stuck somewhere says where, then ends, before the parent's bounded join.
    faulthandler.dump_traceback_later(60, exit=True)
    try:
        upload = SharedUpload.join(file, token)
        data = segment_data(seed, size)
        with upload.open_segment_sync(index, pad=zero_blocks) as segment:
            for start in range(0, len(data), chunk):
                segment.write(data[start:start + chunk])
                if mode != "ok" and start + chunk >= len(data) // 2:
                    if mode == "raise":
                        raise RuntimeError(f"segment {index}: the training step failed")
                    results.put((index, "sent", start + chunk))
                    while True:  # until the parent kills this process
                        time.sleep(1)
        results.put((index, "ok", segment.receipt.to_json()))
    except BaseException as exc:
        results.put((index, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
