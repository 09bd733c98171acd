"""The per-group container of PR #1611 (records/track_10min_16mb/
2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611, `COMPRESSOR=pergroup`, ported there from the
PR #1586 line): the int8 codes of the block matrices and the embedding, grouped by role, rows reordered,
transposed and compressed apart from the rest of the payload. Used by pgolf/quant/artifact.py as the codecs
`pergroup` (groups through the external `lrzip -z`, ZPAQ, as the record) and `pergroup_brotli` (groups through
brotli, no external program).

Routing: every int8 code field (`q`) of a 2-D int tensor named `blocks.<i>.<role>.weight` with role in
{attn.c_k, attn.c_q, attn.c_v, attn.proj, mlp.fc, mlp.proj}, or `tok_emb.weight`, goes to one of 7 groups in
the fixed order GROUPS, layer order within a group. For the hot groups (tok_emb, c_q, mlp.fc) each matrix's
rows are reordered by the greedy L1 nearest-neighbour chain (`nn_chain`) and the order is stored as uint16
(a matrix of more than 65,536 rows keeps its order: uint16 cannot index it). Each matrix is serialised
transposed (column-major of the permuted matrix) as raw int8; a group is the concatenation of its matrices.

Container (all integers little-endian):
    magic   4 bytes  b"PGRP"
    count   u32      9
    lengths u32 x 9  byte length of each stream
    streams          7 groups (GROUPS order; empty when no tensor is routed there), remainder, permutations
The remainder is the payload with the routed bytes cut out (the JSON header, then every other field in
payload order), brotli quality 11, window 2^24; the permutations (uint16, group then layer order) likewise.
The record's remainder also carries a shape manifest; here the payload's own JSON header is that manifest:
the routed tensors, their shapes and offsets are a pure function of it (`route`), so the reader knows every
stream's decompressed size before it decompresses one.

Reading is bounded: the framing is checked (magic, count, lengths that add up to the container) before
anything is decompressed; each stream's length is checked against what the header routes to it (empty iff
nothing; an lrzip stream's declared size equal to the group's), every decompression is capped at the expected
size plus one byte (brotli streamed with an output limit; lrzip's output read from a pipe and the process
killed past the cap), and the permutations must be permutations. Every problem is one `PerGroupError` naming
the stream (pgolf/quant/artifact.py re-raises it as ArtifactError). A missing `lrzip` is an error when
writing and when reading, never a fallback.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import brotli
import numpy as np

from pgolf.optional import register
from pgolf.quant.brotli_io import IN_CHUNK, BrotliReader, brotli_compress
from pgolf.runlog import log0

GROUPS = ("tok_emb", "c_k", "c_q", "c_v", "attn.proj", "mlp.fc", "mlp.proj")
HOT = frozenset({"tok_emb", "c_q", "mlp.fc"})  # rows reordered by the L1 nearest-neighbour chain
ROLES = {"attn.c_k": "c_k", "attn.c_q": "c_q", "attn.c_v": "c_v", "attn.proj": "attn.proj"}
ROLES |= {"mlp.fc": "mlp.fc", "mlp.proj": "mlp.proj"}
BLOCK_NAME = re.compile(r"blocks\.(\d{1,4})\.(attn\.c_k|attn\.c_q|attn\.c_v|attn\.proj|mlp\.fc|mlp\.proj)\.weight")
MAGIC = b"PGRP"
N_STREAMS = len(GROUPS) + 2
REMAINDER, PERMS = len(GROUPS), len(GROUPS) + 1
STREAM_NAMES = (*GROUPS, "remainder", "permutations")
MAX_PERM_ROWS = 1 << 16  # a permutation is stored as uint16
PERMS_LGWIN = 22  # the permutations stream: brotli's default window, as PR #1611 writes it (the rest: 2^24)
BACKENDS = ("lrzip", "brotli")
LRZIP_TIMEOUT_S = 900.0  # one group through `lrzip -z` (the record: ~100 s for all 7 on its machine)
# `lrzip -d` of an untrusted stream: lrzip decodes a whole chunk before it writes any of it, so a forged stream
# declaring a few bytes may hold gigabytes. The child runs with at most 100 MB of working buffers (`-m 1`), an
# address-space limit and a file-size limit on its temporary file (it fails there: 11.5 MB groups, the record's
# largest, decode in 24-30 s on 2 cores within them even with -p 64; a forged 1 GiB group stops after 43-60 s at
# 0.39 GB, not 1.37 GB and 101 s), and a timeout that grows with the declared size.
LRZIP_DECODE_AS = 2 << 30  # bytes of address space, plus 8x the declared size
LRZIP_DECODE_FILE = 16 << 20  # bytes of temporary file, plus 2x the declared size
LRZIP_DECODE_TIMEOUT_S = 120.0  # seconds, plus one per 50 KB declared
LRZIP_HEADER = 24  # lrzip 0.6 magic: b"LRZI", major 0, minor 6, u64 size at 6, md5 flag at 21, encrypted at 22
MISSING_LRZIP = (
    "codec pergroup needs the external program `lrzip` (its ZPAQ back-end compresses the weight groups), "
    "which is not on PATH: install it (Debian/Ubuntu: apt-get install lrzip; `bash run.sh setup` does where "
    "it can), or use codec pergroup_brotli"
)


class PerGroupError(ValueError):
    """A per-group container is malformed, forged or truncated, a stream decompresses to the wrong size, or
    `lrzip` is missing or failed."""


# ---- routing ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Routed:
    """One int8 matrix of a group: its tensor name, group index (into GROUPS), layer, shape [rows, cols],
    byte offset in the raw payload, and whether its rows are reordered (`hot`)."""

    name: str
    group: int
    layer: int
    rows: int
    cols: int
    offset: int
    hot: bool

    @property
    def nbytes(self) -> int:
        return self.rows * self.cols


def group_of(name: str) -> tuple[int, int] | None:
    """(group index into GROUPS, layer) of a tensor name, or None when the name is routed nowhere."""
    if name == "tok_emb.weight":
        return 0, 0
    m = BLOCK_NAME.fullmatch(name)
    return (GROUPS.index(ROLES[m[2]]), int(m[1])) if m else None


def route(fields: Iterable[tuple[str, str, Sequence[int], int]]) -> list[Routed]:
    """The routed matrices, in container order (group, then layer, then name), of the int code fields
    `(tensor name, dtype, shape, byte offset in the raw payload)`: int8, 2-D, non-empty, a routed name."""
    out = []
    for name, dtype, shape, offset in fields:
        where = group_of(name)
        if where is None or dtype != "int8" or len(shape) != 2 or shape[0] * shape[1] == 0:
            continue
        g, layer = where
        hot = GROUPS[g] in HOT and shape[0] <= MAX_PERM_ROWS
        out.append(Routed(name, g, layer, int(shape[0]), int(shape[1]), int(offset), hot))
    return sorted(out, key=lambda r: (r.group, r.layer, r.name))


# ---- the row order and the serialisation --------------------------------------------------------------
def nn_chain(m: np.ndarray) -> np.ndarray:
    """The greedy L1 nearest-neighbour chain over the rows of `m` [rows, cols] (an integer matrix): start at
    row 0, then repeatedly append the unused row with the smallest L1 distance to the last appended one, ties
    to the lowest index. Returns the row order, int64 [rows]. O(rows^2 * cols / 2) byte operations: the used
    rows are swapped out of a working copy, so each step scans only the unused ones (int8 arithmetic when the
    matrix's values span at most 127, so no difference overflows; int16 otherwise)."""
    if m.ndim != 2:
        raise ValueError(f"nn_chain needs a 2-D matrix, got shape {list(m.shape)}")
    n = m.shape[0]
    order = np.zeros(n, dtype=np.int64)
    if n <= 1:
        return order
    narrow = int(m.max()) - int(m.min()) <= 127
    work = np.array(m, dtype=np.int8 if narrow else np.int16)  # unused rows in work[:left]
    idx = np.arange(n)  # original index of each working row
    buf = np.empty_like(work)
    last = work[0].copy()
    left = n - 1
    work[0], idx[0] = work[left], idx[left]
    for k in range(1, n):
        b = buf[:left]
        np.subtract(work[:left], last, out=b)
        np.abs(b, out=b)
        dist = b.sum(axis=1, dtype=np.int32)
        hits = np.flatnonzero(dist == dist.min())
        j = hits[np.argmin(idx[hits])] if len(hits) > 1 else hits[0]
        order[k] = idx[j]
        last = work[j].copy()
        left -= 1
        work[j], idx[j] = work[left], idx[left]
    return order


def encode_matrix(m: np.ndarray, order: np.ndarray | None) -> bytes:
    """The bytes of int8 `m` [rows, cols] with its rows in `order` (None: as they are), column-major
    (`rows * cols` bytes: column 0 of every row, then column 1, ...)."""
    p = m if order is None else m[order]
    return np.ascontiguousarray(p.T).tobytes()


def decode_matrix(data: bytes | memoryview, rows: int, cols: int, order: np.ndarray | None) -> np.ndarray:
    """Inverse of `encode_matrix`: the int8 matrix [rows, cols] in its original row order."""
    p = np.frombuffer(data, dtype=np.int8, count=rows * cols).reshape(cols, rows).T
    if order is None:
        return np.ascontiguousarray(p)
    out = np.empty((rows, cols), dtype=np.int8)
    out[order] = p
    return out


# ---- brotli (also the artifact's `brotli` codec) --------------------------------------------------------
def brotli_decompress(data: bytes | memoryview, expected_len: int, what: str) -> bytes:
    """The brotli stream `data`, which must decompress to exactly `expected_len` bytes (never more than
    that plus one chunk is produced). Raises PerGroupError naming `what`."""
    r, out = BrotliReader(data), bytearray()
    try:
        while len(out) <= expected_len:
            chunk = r.read(expected_len + 1 - len(out))
            if not chunk:
                break
            out += chunk
    except brotli.error as e:
        raise PerGroupError(f"pergroup stream {what}: corrupt brotli data ({e})") from None
    _check_len(len(out), expected_len, what)
    return bytes(out)


def _check_len(got: int, expected_len: int, what: str) -> None:
    if got != expected_len:
        more = "more" if got > expected_len else "fewer"
        raise PerGroupError(
            f"pergroup stream {what} decompresses to {more} bytes than the {expected_len} its tensors need "
            "(corrupt or forged artifact)"
        )


# ---- lrzip (external program) ---------------------------------------------------------------------------
def lrzip_path() -> str:
    """The `lrzip` executable on PATH. Raises PerGroupError (MISSING_LRZIP) when there is none."""
    exe = shutil.which("lrzip")
    if exe is None:
        raise PerGroupError(MISSING_LRZIP)
    return exe


def _lrzip_env(tmp: str) -> dict[str, str]:
    # LRZIP=NOCONFIG: a user's lrzip.conf cannot change the settings; its temporary files go to `tmp`.
    return {**os.environ, "LRZIP": "NOCONFIG", "TMPDIR": tmp, "TMP": tmp}


def _nice() -> str:
    # lrzip renices itself to 19 by default, which starves it on a busy machine: keep the caller's priority.
    return str(os.nice(0))


def lrzip_compress(data: bytes, level: int, timeout: float | None = None) -> bytes:
    """`lrzip -z -L level` (ZPAQ back-end) of `data`, through temporary files. Raises PerGroupError when
    lrzip is missing, fails or runs past `timeout` seconds (LRZIP_TIMEOUT_S)."""
    exe = lrzip_path()
    with tempfile.TemporaryDirectory(prefix="pgolf-lrzip-") as tmp:
        src, dst = Path(tmp) / "group.bin", Path(tmp) / "group.lrz"
        src.write_bytes(data)
        cmd = [exe, "-z", "-L", str(level), "-N", _nice(), "-Q", "-f", "-o", str(dst), str(src)]
        try:
            p = subprocess.run(cmd, env=_lrzip_env(tmp), capture_output=True, timeout=timeout or LRZIP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise PerGroupError(f"lrzip -z ran past its {timeout or LRZIP_TIMEOUT_S:g} s timeout") from None
        if p.returncode != 0 or not dst.is_file():
            err = p.stderr.decode(errors="replace").strip()[-300:]
            raise PerGroupError(f"lrzip -z -L {level} failed (exit {p.returncode}): {err}")
        return dst.read_bytes()


def lrzip_declared_len(data: bytes | memoryview, what: str) -> int:
    """The decompressed size an lrzip 0.6 stream declares in its 24-byte header. Raises PerGroupError
    naming `what` for a stream that is not an unencrypted lrzip 0.6 one."""
    head = bytes(data[:LRZIP_HEADER])
    if len(head) < LRZIP_HEADER or head[:4] != b"LRZI" or head[4] != 0 or head[5] != 6:
        raise PerGroupError(f"pergroup stream {what} is not an lrzip 0.6 stream (bad magic)")
    if head[22]:
        raise PerGroupError(f"pergroup stream {what} is an encrypted lrzip stream")
    return struct.unpack_from("<Q", head, 6)[0]


class Running:
    """The lrzip processes of one decode, so that the first failing stream stops the others: `stop()` kills
    every process added so far and any added after it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._procs: set = set()
        self.stopped = False

    def add(self, proc) -> None:
        with self._lock:
            self._procs.add(proc)
            if self.stopped:
                proc.kill()

    def discard(self, proc) -> None:
        with self._lock:
            self._procs.discard(proc)

    def stop(self) -> None:
        with self._lock:
            self.stopped = True
            for proc in self._procs:
                proc.kill()


def _limited(cmd: list[str], expected_len: int) -> list[str]:
    # the limits are set by the shell before it becomes lrzip (exec): no moment runs unlimited; -f counts
    # 512-byte blocks (POSIX), -v KiB
    mem = (LRZIP_DECODE_AS + 8 * expected_len) >> 10
    blocks = (LRZIP_DECODE_FILE + 2 * expected_len) >> 9
    return ["/bin/sh", "-c", f'ulimit -v {mem} && ulimit -f {blocks} && exec "$0" "$@"', *cmd]


def lrzip_decompress(
    data: bytes | memoryview,
    expected_len: int,
    what: str,
    timeout: float | None = None,
    running: Running | None = None,
) -> bytes:
    """`lrzip -d` of `data`, which must declare and produce exactly `expected_len` bytes: its output is read
    from a pipe and the process killed once it passes the cap; the process is bounded in memory, temporary
    file and time (LRZIP_DECODE_*; `timeout` seconds overrides the time). `running`, if given, holds the
    process while it runs (so that a failing sibling can stop it). Raises PerGroupError naming `what`."""
    declared = lrzip_declared_len(data, what)
    if declared != expected_len:
        raise PerGroupError(
            f"pergroup stream {what}: lrzip declares {declared} bytes, the header's tensors need {expected_len}"
        )
    exe = lrzip_path()
    limit = timeout or LRZIP_DECODE_TIMEOUT_S + expected_len / 50_000
    with tempfile.TemporaryDirectory(prefix="pgolf-lrzip-") as tmp:
        src = Path(tmp) / "group.lrz"
        src.write_bytes(data)
        with open(Path(tmp) / "stderr", "w+b") as err:
            proc = subprocess.Popen(
                _limited([exe, "-d", "-m", "1", "-N", _nice(), "-Q", "-o", "-", str(src)], expected_len),
                stdout=subprocess.PIPE,
                stderr=err,
                env=_lrzip_env(tmp),
            )
            if running is not None:
                running.add(proc)
            expired = threading.Event()
            timer = threading.Timer(limit, lambda: (expired.set(), proc.kill()))
            timer.start()
            out = bytearray()
            try:
                while len(out) <= expected_len:
                    chunk = proc.stdout.read(min(IN_CHUNK, expected_len + 1 - len(out)))
                    if not chunk:
                        break
                    out += chunk
                if len(out) > expected_len:
                    proc.kill()  # past the cap: stop it instead of reading on
            except BaseException:
                proc.kill()
                raise
            finally:
                rc = proc.wait()
                timer.cancel()
                proc.stdout.close()
                if running is not None:
                    running.discard(proc)
            if expired.is_set():
                raise PerGroupError(f"pergroup stream {what}: lrzip -d ran past its {limit:g} s timeout")
            if len(out) <= expected_len and rc != 0:
                err.seek(0)
                msg = err.read().decode(errors="replace").strip()
                low = msg.lower()
                memory = ("out of memory", "cannot allocate", "failed to map")
                if rc == -signal.SIGXFSZ or any(m in low for m in memory):
                    raise PerGroupError(
                        f"pergroup stream {what}: lrzip -d needed more memory or temporary file than a stream "
                        f"declaring {expected_len} bytes can (a forged or corrupt stream)"
                    )
                if rc < 0:
                    raise PerGroupError(f"pergroup stream {what}: lrzip -d was stopped by signal {-rc}")
                lines = [ln for ln in msg.splitlines() if ln.strip() and "Inappropriate ioctl" not in ln]
                raise PerGroupError(f"pergroup stream {what}: lrzip -d failed (exit {rc}): {' '.join(lines)[-300:]}")
    _check_len(len(out), expected_len, what)
    return bytes(out)


# ---- the container --------------------------------------------------------------------------------------
def pack_container(streams: Sequence[bytes]) -> bytes:
    """magic, stream count, u32 lengths, then the streams."""
    if len(streams) != N_STREAMS:
        raise ValueError(f"a pergroup container holds {N_STREAMS} streams, got {len(streams)}")
    return MAGIC + struct.pack(f"<I{N_STREAMS}I", N_STREAMS, *map(len, streams)) + b"".join(streams)


def split_container(data: bytes | memoryview) -> list[memoryview]:
    """The N_STREAMS streams of a container, its framing checked (magic, count, lengths that add up to what
    follows the table). Raises PerGroupError naming the field."""
    data = memoryview(data)
    if len(data) < 8 or bytes(data[:4]) != MAGIC:
        raise PerGroupError("not a pergroup container (bad magic bytes)")
    (count,) = struct.unpack_from("<I", data, 4)
    if count != N_STREAMS:
        raise PerGroupError(f"pergroup container: stream count {count}, expected {N_STREAMS}")
    table = 8 + 4 * N_STREAMS
    if len(data) < table:
        raise PerGroupError("corrupt pergroup container: truncated stream length table")
    lengths = struct.unpack_from(f"<{N_STREAMS}I", data, 8)
    if sum(lengths) != len(data) - table:
        raise PerGroupError(
            f"corrupt pergroup container: stream lengths add up to {sum(lengths)} bytes, but "
            f"{len(data) - table} follow the length table (truncated or forged container)"
        )
    out, pos = [], table
    for n in lengths:
        out.append(data[pos : pos + n])
        pos += n
    return out


def _pool(jobs: list[Callable[[], object]], on_error: Callable[[], None] | None = None) -> list:
    """The results of `jobs` run in threads (numpy and the lrzip subprocesses release the GIL). At the first
    job that raises, the jobs not started are dropped and `on_error` is called (to stop those running); then
    the error of the first failed job (in job order) is raised."""
    if len(jobs) <= 1:
        return [j() for j in jobs]
    with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as ex:
        futs = [ex.submit(j) for j in jobs]
        wait(futs, return_when=FIRST_EXCEPTION)
        failed = [f for f in futs if f.done() and not f.cancelled() and f.exception() is not None]
        if failed:
            for f in futs:
                f.cancel()
            if on_error is not None:
                on_error()
            wait(futs)
            raise failed[0].exception()
        return [f.result() for f in futs]


def encode(raw: bytes | memoryview, routed: Sequence[Routed], backend: str, level: int) -> bytes:
    """The container of payload `raw` whose routed matrices are `routed` (container order, from `route`):
    groups through `backend` ("lrzip": `lrzip -z -L level`; "brotli": quality `level`), the remainder and
    the permutations through brotli-11. Raises PerGroupError when lrzip is missing (before any work) or fails,
    ValueError for a routed matrix outside `raw` or overlapping another."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown pergroup backend {backend!r} (one of {BACKENDS})")
    if backend == "lrzip":
        lrzip_path()
    raw = memoryview(raw)
    spans = sorted((r.offset, r.offset + r.nbytes, r.name) for r in routed)
    for (_, end, name), (start, _, nxt) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"routed tensors {name!r} and {nxt!r} overlap in the payload")
    if spans and (spans[0][0] < 0 or spans[-1][1] > len(raw)):
        raise ValueError(f"a routed tensor lies outside the {len(raw)}-byte payload")
    mats = [np.frombuffer(raw, dtype=np.int8, count=r.nbytes, offset=r.offset).reshape(r.rows, r.cols) for r in routed]
    hot = [i for i, r in enumerate(routed) if r.hot]
    orders = dict(zip(hot, _pool([lambda m=mats[i]: nn_chain(m) for i in hot])))
    groups = [bytearray() for _ in GROUPS]
    for i, r in enumerate(routed):
        groups[r.group] += encode_matrix(mats[i], orders.get(i))
    perms = b"".join(orders[i].astype("<u2").tobytes() for i in hot)
    rest, pos = bytearray(), 0
    for start, end, _ in spans:
        rest += raw[pos:start]
        pos = end
    rest += raw[pos:]

    def group_job(data: bytearray) -> Callable[[], bytes]:
        if not data:
            return lambda: b""
        if backend == "lrzip":
            return lambda: lrzip_compress(bytes(data), level)
        return lambda: brotli_compress(data, level)

    jobs = [group_job(g) for g in groups]
    # the permutations as PR #1611 compresses them: brotli quality 11 with its default window (2^22)
    jobs += [lambda: brotli_compress(rest), lambda: brotli_compress(perms, lgwin=PERMS_LGWIN) if perms else b""]
    streams = _pool(jobs)
    stored = [GROUPS[i] for i, g in enumerate(groups) if g and len(streams[i]) >= len(g)]
    if stored:  # lrzip's LZ4 pre-test finds wide-valued codes incompressible and stores them (so does the record's)
        log0(
            f"pergroup: group(s) {', '.join(stored)} did not shrink under {backend} (stored as they are): "
            "their codes look incompressible; another codec may be smaller (export.codec=pergroup_brotli)"
        )
    return pack_container(streams)


class Decoder:
    """The routed matrices of a container's streams, checked against the routing (from the payload's
    header) before anything is decompressed: a group's stream is empty iff no matrix is routed to it, an
    lrzip stream declares the group's size, the permutation stream is empty iff no matrix is hot.
    `decode()` then decompresses every group (threads), bounded by the expected sizes. Raises PerGroupError
    naming the stream."""

    def __init__(self, streams: Sequence[memoryview], routed: Sequence[Routed], backend: str):
        self.streams, self.routed, self.backend = streams, list(routed), backend
        self.sizes = [sum(r.nbytes for r in routed if r.group == g) for g in range(len(GROUPS))]
        self.perm_bytes = 2 * sum(r.rows for r in routed if r.hot)
        for i, what in enumerate(STREAM_NAMES):
            want = self.perm_bytes if i == PERMS else 1 if i == REMAINDER else self.sizes[i]
            n = len(streams[i])
            if want == 0 and n:
                raise PerGroupError(f"pergroup stream {what} holds {n} bytes, but the header routes nothing to it")
            if want and not n:
                raise PerGroupError(f"pergroup stream {what} is empty, but the header routes {want} bytes to it")
        if backend == "lrzip" and any(self.sizes):
            for g, n in enumerate(self.sizes):
                if n:
                    declared = lrzip_declared_len(streams[g], GROUPS[g])
                    if declared != n:
                        raise PerGroupError(
                            f"pergroup stream {GROUPS[g]}: lrzip declares {declared} bytes, the header's tensors "
                            f"need {n}"
                        )
            lrzip_path()

    def _group(self, g: int, running: Running) -> bytes:
        if not self.sizes[g]:
            return b""
        if self.backend == "lrzip":
            return lrzip_decompress(self.streams[g], self.sizes[g], GROUPS[g], running=running)
        return brotli_decompress(self.streams[g], self.sizes[g], GROUPS[g])

    def decode(self) -> list[np.ndarray]:
        """Each routed matrix, int8 [rows, cols] in its original row order, in the routing's order. The first
        stream that fails stops the lrzip processes of the others."""
        running = Running()
        jobs = [lambda g=g: self._group(g, running) for g in range(len(GROUPS))]
        jobs.append(lambda: brotli_decompress(self.streams[PERMS], self.perm_bytes, "permutations"))
        *groups, perms = _pool(jobs, on_error=running.stop)
        perm = np.frombuffer(perms, dtype="<u2")
        out, at, pat = [], [0] * len(GROUPS), 0
        for r in self.routed:
            order = None
            if r.hot:
                order = perm[pat : pat + r.rows].astype(np.int64)
                pat += r.rows
                if not np.array_equal(np.bincount(order, minlength=r.rows), np.ones(r.rows, dtype=np.int64)):
                    raise PerGroupError(f"pergroup stream permutations: the order of {r.name!r} is not a permutation")
            out.append(decode_matrix(memoryview(groups[r.group])[at[r.group] : at[r.group] + r.nbytes], r.rows,
                                     r.cols, order))  # fmt: skip
            at[r.group] += r.nbytes
        return out


class PayloadStream:
    """The raw payload of a container as a stream (pgolf/quant/artifact.py reads a pergroup artifact through
    it): the remainder, streamed by `remainder(stream)` (an object whose `produce(n)` gives up to n bytes, b""
    at its end; the artifact's bounded brotli stream), until the header is known; then, told the routing
    (`set_table`, after the caller checked the header: every stream's length checked against it, `Decoder`),
    the routed matrices' bytes, decoded all groups at once on the first read that reaches one, spliced in at
    their offsets. Memory: the decoded matrices (each released once read) plus their compressed groups.
    Raises PerGroupError naming the stream (the remainder's errors prefixed `pergroup stream remainder:`)."""

    def __init__(self, data: bytes | memoryview, backend: str, remainder: Callable[[memoryview], object]):
        self.backend = backend
        self.streams = split_container(data)
        if backend == "lrzip" and any(len(s) for s in self.streams[: len(GROUPS)]):
            lrzip_path()
        self.rest = remainder(self.streams[REMAINDER])
        self.pos, self.next = 0, 0
        self.spans: list[tuple[int, int, int]] | None = None  # (start, end, index into the decoded list)
        self.decoder: Decoder | None = None  # once the routing is known
        self.mats: list[memoryview | None] | None = None

    def set_table(self, routed: Sequence[Routed], hlen: int) -> None:
        """Told the routing (`route` of the checked header) once the `hlen`-byte header was read."""
        if self.pos != 4 + hlen:
            raise PerGroupError(f"pergroup: the table arrived at byte {self.pos}, not after the header ({4 + hlen})")
        self.decoder = Decoder(self.streams, routed, self.backend)
        self.spans = sorted((r.offset, r.offset + r.nbytes, i) for i, r in enumerate(routed))

    def read(self, n: int) -> bytes:
        """Up to n (> 0) bytes of the payload; b"" only at its end."""
        spans = self.spans or []
        if self.next < len(spans) and self.pos >= spans[self.next][0]:
            if self.mats is None:
                self.mats = [memoryview(m.reshape(-1)).cast("B") for m in self.decoder.decode()]
            start, end, i = spans[self.next]
            out = bytes(self.mats[i][self.pos - start : min(end, self.pos + n) - start])
            if self.pos + len(out) == end:
                self.mats[i], self.next = None, self.next + 1
        else:
            limit = n if self.next >= len(spans) else min(n, spans[self.next][0] - self.pos)
            try:
                out = self.rest.produce(limit)
            except ValueError as e:  # the artifact's ArtifactError
                raise PerGroupError(f"pergroup stream remainder: {e}") from None
        self.pos += len(out)
        return out


# The per-group codecs are an optional part (pgolf/optional.py): pgolf/quant/artifact.py reaches this module
# through `optional.get("pergroup")`, so a packed train_gpt.py whose export does not use them leaves it out.
register("pergroup")(sys.modules[__name__])
