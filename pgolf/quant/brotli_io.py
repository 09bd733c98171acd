"""brotli for the artifact's `brotli` codec and the per-group container (pgolf/quant/pergroup.py): quality 0..11
with a 2^24-byte window (PR #1611's settings), and a decompressor whose memory stays bounded whatever the stream
holds."""

from __future__ import annotations

import brotli

BROTLI_QUALITY, BROTLI_LGWIN = 11, 24  # the record's brotli settings
IN_CHUNK = 1 << 20  # compressed bytes handed to brotli per step


def brotli_compress(data: bytes | memoryview, quality: int = BROTLI_QUALITY, lgwin: int = BROTLI_LGWIN) -> bytes:
    """brotli at `quality` (0..11) with a 2^`lgwin`-byte window (default 24: the record's settings)."""
    return brotli.compress(bytes(data), quality=quality, lgwin=lgwin)


class BrotliReader:
    """A brotli stream decompressed at most about `n` bytes at a time (`read(n)`), its input fed `in_chunk`
    bytes at a time, so memory stays bounded whatever the stream holds. brotli 1.2.1's `process` may
    return up to about twice its output limit: the excess is kept for the next read. Raises brotli.error on
    a corrupt stream or bytes after its end."""

    def __init__(self, src: bytes | memoryview, in_chunk: int = IN_CHUNK):
        self.src, self.pos, self.pending, self.in_chunk = memoryview(src), 0, b"", in_chunk
        self.d = brotli.Decompressor()

    def read(self, n: int) -> bytes:
        """Up to n (> 0) bytes; b"" only at the end of the stream (or of a truncated one)."""
        if not self.pending:
            self.pending = self._next(n)
        out, self.pending = self.pending[:n], self.pending[n:]
        return out

    def _next(self, n: int) -> bytes:
        idle = 0
        while True:
            if self.d.is_finished():
                if self.pos < len(self.src):
                    raise brotli.error(f"{len(self.src) - self.pos} bytes after the end of the brotli stream")
                return b""
            data = b""
            if self.d.can_accept_more_data() and self.pos < len(self.src):
                data = self.src[self.pos : self.pos + self.in_chunk]
                self.pos += len(data)
            # with all input taken, process(b"") still gives what the decoder holds (it can accept input
            # again long before its output is drained)
            out = self.d.process(data, output_buffer_limit=n)
            if out:
                return out
            if not data:
                idle += 1
                if self.d.can_accept_more_data() or idle > 2:
                    return b""  # it waits for input there is none of: a truncated stream
