"""Delta updates in zstd's patch-from format (needs the ``delta`` extra: ``zstandard``).

A patch is one zstd frame of the new file, compressed with the old file as a raw-content
dictionary and a window that reaches back over both, with long-distance matching on and a
checksum of the result (so a patch applied to another file fails as it ends): what
``zstd --patch-from=OLD NEW`` makes, so the ``zstd`` command line applies it too
(``zstd -d --patch-from=OLD PATCH``). Why this format: ``docs/benchmarks.md``, "Patch formats
for delta updates" (the fastest to apply and the lowest peak memory of the three measured on
two builds of the real falcon-agent).

Nothing here decides whether a patch is trusted: the agent holds what a patch builds to the
full artifact's digest (:func:`selfupgrade._download.download_artifact`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import BinaryIO

__all__ = ["FORMAT", "apply_patch", "make_patch", "window_log", "zstandard"]

FORMAT = "zstd-patch-from"
"""The name of the patch format, as the docs and ``selfupgrade release patch`` give it."""

_CHUNK = 1 << 20


def zstandard() -> ModuleType:
    """The ``zstandard`` module.

    Raises:
        ImportError: it is not installed; the message says how to install it.
    """
    try:
        return importlib.import_module("zstandard")
    except ImportError as exc:
        raise ImportError(
            "delta updates need the zstandard package: pip install 'selfupgrade[delta]'"
        ) from exc


def window_log(*sizes: int) -> int:
    """The zstd window (as a power of two) that reaches over the whole old file into the new."""
    return max(10, (max(sizes) * 2 - 1).bit_length())


def make_patch(old: bytes, new: bytes, *, level: int = 19) -> bytes:
    """The patch that turns ``old`` into ``new``.

    Raises:
        ImportError: zstandard is not installed.
    """
    zstd = zstandard()
    params = zstd.ZstdCompressionParameters.from_level(
        level,
        window_log=window_log(len(old), len(new)),
        enable_ldm=True,
        source_size=len(new),
        write_checksum=True,
    )
    compressor = zstd.ZstdCompressor(dict_data=_dictionary(zstd, old), compression_params=params)
    return bytes(compressor.compress(new))


def apply_patch(
    old: bytes, patch: BinaryIO, out: Callable[[bytes], None], *, max_output: int
) -> None:
    """Apply the patch read from ``patch`` to ``old``, giving ``out`` the new file's bytes in
    chunks of up to 1 MiB. The window the patch may ask for is bounded by ``old`` and
    ``max_output`` (a patch that asks for more fails before it allocates), and nothing after
    the first frame is accepted. A patch cut short gives fewer bytes without an error: the
    caller holds the result to the artifact's size and digest.

    Raises:
        ImportError: zstandard is not installed.
        ValueError: the patch is not one well-formed zstd frame for this old file.
    """
    zstd = zstandard()
    decompressor = zstd.ZstdDecompressor(
        dict_data=_dictionary(zstd, old),
        max_window_size=1 << window_log(len(old), max(max_output, 1)),
    )
    try:
        with decompressor.stream_reader(
            patch, read_size=_CHUNK, read_across_frames=False, closefd=False
        ) as r:
            while chunk := r.read(_CHUNK):
                out(chunk)
        if patch.read(1):
            raise ValueError("the patch has bytes after its frame")
    except zstd.ZstdError as exc:
        raise ValueError(f"the patch is not a zstd patch for this file: {exc}") from exc


def _dictionary(zstd: ModuleType, old: bytes) -> object:
    return zstd.ZstdCompressionDict(old, dict_type=zstd.DICT_TYPE_RAWCONTENT)
