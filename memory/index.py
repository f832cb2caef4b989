"""Key indexes over slot rows: exact (flat) for small banks, IVF for large ones.

Row ``s`` of an index is the key of slot ``s`` of the :class:`~memory.storage.SlotStore`.
New slots are appended; a reused slot is overwritten in place (flat: the code bytes; IVF:
``update_vectors`` through an array direct map, O(1) per entry). Dead rows stay in the index
and are filtered with a bitmap selector until reused, so eviction never calls ``remove_ids``.

Threading (the machine has few cores, shared with the model): FAISS's OpenMP pool is pinned
to one thread for every single-query and small-batch call (measured: a second thread makes
a single flat query 2-3x slower) and raised to ``threads`` only for batches of queries (FAISS's
GEMM path, whose OpenBLAS shares the same OpenMP pool). numpy never runs a BLAS call here, so
its separate pthread pool stays idle. The one exception is a bank's move to IVF built in the
background (``memory.ivf_build``): its k-means runs on the bank's worker thread beside the
engine's searches and the model, on one OpenMP thread of its own (``threads`` for the
training), which is why there is a single such worker per process.

This module (and the benchmark) is where faiss is imported; its errors become
:class:`MemoryBankError` here.
"""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError
from typing import Any

import faiss as _faiss_typed
import numpy as np

from agent_runtime.errors import BankFormatError, MemoryBankError
from memory.config import MemoryConfig

__all__ = ["FlatKeys", "IVFKeys", "KeyIndex", "PartitionedKeys", "build_ivf", "load_index"]

# faiss ships partial stubs that miss SearchParameters keywords and DirectMap; use it untyped.
faiss: Any = _faiss_typed

BATCH_MIN_QUERIES = (
    16  # below this a call runs on one thread (FAISS's scan is then bandwidth-bound)
)
_SQ = {"fp16": faiss.ScalarQuantizer.QT_fp16, "int8": faiss.ScalarQuantizer.QT_8bit}
_IP = faiss.METRIC_INNER_PRODUCT
_CODE_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}  # bytes per key component of each storage


def _omp(threads: int) -> None:
    faiss.omp_set_num_threads(threads)


def _empty(q: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((q, k), -np.inf, np.float32), np.full((q, k), -1, np.int64)


class KeyIndex:
    """Common interface of :class:`FlatKeys` and :class:`IVFKeys`."""

    kind = ""
    index: Any

    def __init__(self, dim: int, storage: str) -> None:
        self.dim = dim
        self.storage = storage

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def append(self, keys: np.ndarray) -> None:
        """Add rows ``ntotal .. ntotal+n-1``."""
        try:
            self.index.add(keys)
        except RuntimeError as exc:
            raise MemoryBankError(f"faiss add failed: {exc}") from exc

    def overwrite(self, rows: np.ndarray, keys: np.ndarray) -> None:
        raise NotImplementedError

    def copy_parts(self) -> list[np.ndarray]:
        """Every row's stored keys as float32 copies, one array per part (flat indexes: what
        an IVF build starts from)."""
        raise NotImplementedError

    def reconstruct(self, rows: np.ndarray) -> np.ndarray:
        """Stored keys of ``rows`` decoded to float32 (exact for fp32 storage)."""
        raise NotImplementedError

    def search(
        self,
        queries: np.ndarray,
        k: int,
        bitmap: np.ndarray | None,
        threads: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows by inner product: ``(scores (q,k) f32, rows (q,k) i64)``, -1 padded.

        ``bitmap`` (packed liveness, see :class:`~memory.storage.SlotStore`) excludes dead
        rows; pass None when every row is live.
        """
        raise NotImplementedError

    def nbytes(self) -> int:
        raise NotImplementedError

    def to_bytes(self) -> np.ndarray:
        return np.asarray(faiss.serialize_index(self.index), np.uint8)

    # An unpartitioned index is a partitioned one with a single part (a model with one memory
    # layer and one KV head searches its bank through the same calls).

    def search_part(
        self, part: int, queries: np.ndarray, k: int, bitmap: np.ndarray | None, threads: int
    ) -> tuple[np.ndarray, np.ndarray]:
        if part != 0:
            raise MemoryBankError(f"this key index has one part, not part {part}")
        return self.search(queries, k, bitmap, threads)

    def part_keys(self, part: int, rows: np.ndarray) -> np.ndarray:
        """Stored keys of ``rows`` (any shape) in one part, float32, shape ``rows.shape + (d,)``."""
        if part != 0:
            raise MemoryBankError(f"this key index has one part, not part {part}")
        return self.reconstruct(rows.reshape(-1)).reshape(*rows.shape, self.dim)

    def search_part_with_keys(
        self, part: int, queries: np.ndarray, k: int, bitmap: np.ndarray | None, threads: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if part != 0:
            raise MemoryBankError(f"this key index has one part, not part {part}")
        return self.search_with_keys(queries, k, bitmap, threads)

    def search_with_keys(
        self, queries: np.ndarray, k: int, bitmap: np.ndarray | None, threads: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`search` and the stored keys of the rows found, float32 ``(q, k, dim)``
        (rows of -1: unspecified values, to be masked by the caller)."""
        scores, rows = self.search(queries, k, bitmap, threads)
        return scores, rows, self.part_keys(0, np.maximum(rows, 0))


class FlatKeys(KeyIndex):
    """Exact search over ``fp32`` (IndexFlatIP) or ``fp16`` (IndexScalarQuantizer) codes."""

    kind = "flat"

    def __init__(self, dim: int, storage: str, index: Any = None) -> None:
        super().__init__(dim, storage)
        if index is None:
            if storage == "fp32":
                index = faiss.IndexFlatIP(dim)
            else:
                index = faiss.IndexScalarQuantizer(dim, _SQ[storage], _IP)
        self.index = index
        self.code_size = int(index.code_size)

    def _codes(self) -> np.ndarray:
        # A view of FAISS's code vector: valid only until the next append reallocates it.
        n = self.ntotal
        if n == 0:
            return np.zeros((0, self.code_size), np.uint8)
        flat = faiss.rev_swig_ptr(self.index.codes.data(), n * self.code_size)
        return np.asarray(flat).reshape(n, self.code_size)

    def _matrix(self) -> np.ndarray:
        """The codes as an (n, dim) float32 or float16 matrix (a view)."""
        dtype = np.float32 if self.storage == "fp32" else np.float16
        return self._codes().view(dtype)

    def overwrite(self, rows: np.ndarray, keys: np.ndarray) -> None:
        self._codes()[rows] = self.index.sa_encode(keys).reshape(-1, self.code_size)

    def reconstruct(self, rows: np.ndarray) -> np.ndarray:
        out: np.ndarray = self._matrix()[rows].astype(np.float32)
        return out

    def part_keys(self, part: int, rows: np.ndarray) -> np.ndarray:
        if part != 0:
            raise MemoryBankError(f"this key index has one part, not part {part}")
        return self.reconstruct(rows)

    def copy_parts(self) -> list[np.ndarray]:
        """Every row's stored key as one float32 array (a copy: one contiguous pass)."""
        return [np.array(self._matrix(), dtype=np.float32)]

    def nbytes(self) -> int:
        return self.ntotal * self.code_size

    def search(
        self,
        queries: np.ndarray,
        k: int,
        bitmap: np.ndarray | None,
        threads: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        q = queries.shape[0]
        if q == 0 or k == 0 or self.ntotal == 0:
            return _empty(q, k)
        # batches go through FAISS's GEMM path; its OpenMP pool gets ``threads`` only then
        _omp(threads if q >= BATCH_MIN_QUERIES else 1)
        params = None
        if bitmap is not None:
            sel = faiss.IDSelectorBitmap(self.ntotal, faiss.swig_ptr(bitmap))
            params = faiss.SearchParameters(sel=sel)
        try:
            scores, rows = self.index.search(queries, k, params=params)
        except RuntimeError as exc:
            raise MemoryBankError(f"faiss search failed: {exc}") from exc
        finally:
            _omp(1)
        return scores, rows


class IVFKeys(KeyIndex):
    """IVF over the slot rows (IVFFlat for fp32, IVF-SQ for fp16/int8), array direct map."""

    kind = "ivf"

    def __init__(self, dim: int, storage: str, index: Any, nprobe: int) -> None:
        super().__init__(dim, storage)
        self.index = index
        self.nprobe = nprobe
        self.quantizer: Any = None
        self._params: tuple[Any, ...] = ()  # (bitmap, ntotal, nprobe, SearchParametersIVF)

    @classmethod
    def train(
        cls,
        dim: int,
        storage: str,
        nlist: int,
        sample: np.ndarray,
        nprobe: int,
        threads: int,
        iterations: int = 0,
    ) -> IVFKeys:
        """A trained, empty IVF index. ``sample`` must be stored keys (never other data);
        ``iterations`` of k-means (0: FAISS's default)."""
        quantizer = faiss.IndexFlatIP(dim)
        if storage == "fp32":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, _IP)
        else:
            index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, _SQ[storage], _IP)
        if iterations:
            index.cp.niter = iterations
        _omp(threads)
        try:
            index.train(sample)
        except RuntimeError as exc:
            raise MemoryBankError(f"faiss IVF training failed: {exc}") from exc
        finally:
            _omp(1)
        index.set_direct_map_type(faiss.DirectMap.Array)
        built = cls(dim, storage, index, nprobe)
        built.quantizer = quantizer  # the index does not own it; keep it alive as long as the index
        return built

    def overwrite(self, rows: np.ndarray, keys: np.ndarray) -> None:
        try:
            self.index.update_vectors(rows, keys)
        except RuntimeError as exc:
            raise MemoryBankError(f"faiss update failed: {exc}") from exc

    def reconstruct(self, rows: np.ndarray) -> np.ndarray:
        if rows.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        return np.asarray(self.index.reconstruct_batch(rows), np.float32)

    def nbytes(self) -> int:
        code = int(self.index.code_size)
        # codes + the list's id + the direct map entry per row, plus the centroids
        return self.ntotal * (code + 16) + int(self.index.nlist) * self.dim * 4

    def search(
        self,
        queries: np.ndarray,
        k: int,
        bitmap: np.ndarray | None,
        threads: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        q = queries.shape[0]
        if q == 0 or k == 0 or self.ntotal == 0:
            return _empty(q, k)
        scores, rows = self._call(self.index.search, queries, k, bitmap, threads)
        return scores, rows

    def search_with_keys(
        self, queries: np.ndarray, k: int, bitmap: np.ndarray | None, threads: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # FAISS decodes the codes it has just scanned: no direct-map lookup per row (a
        # separate reconstruct_batch costs ~35 us more per call). It cannot take a selector,
        # so a bank with dead rows searches and then reconstructs.
        q = queries.shape[0]
        if bitmap is not None:
            return super().search_with_keys(queries, k, bitmap, threads)
        if q == 0 or k == 0 or self.ntotal == 0:
            return (*_empty(q, k), np.zeros((q, k, self.dim), np.float32))
        scores, rows, keys = self._call(
            self.index.search_and_reconstruct, queries, k, bitmap, threads
        )
        return scores, rows, keys

    def _call(
        self, search: Any, queries: np.ndarray, k: int, bitmap: np.ndarray | None, threads: int
    ) -> Any:
        """One FAISS search call with this index's parameters and thread count."""
        params = self._search_params(bitmap)
        _omp(threads if queries.shape[0] >= BATCH_MIN_QUERIES else 1)
        try:
            return search(queries, k, params=params)
        except RuntimeError as exc:
            raise MemoryBankError(f"faiss search failed: {exc}") from exc
        finally:
            _omp(1)

    def _search_params(self, bitmap: np.ndarray | None) -> Any:
        """The search's parameters, reused while the bitmap array, row count and nprobe are
        unchanged (the selector reads the bitmap's memory at search time; the cache holds the
        array, so its memory cannot be reused by another while the selector points at it, and
        faiss's wrapper keeps the selector alive with the params)."""
        cached = self._params
        ntotal = self.ntotal
        if cached and cached[0] is bitmap and cached[1] == ntotal and cached[2] == self.nprobe:
            return cached[3]
        sel = None if bitmap is None else faiss.IDSelectorBitmap(ntotal, faiss.swig_ptr(bitmap))
        params = faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe)
        self._params = (bitmap, ntotal, self.nprobe, params)
        return params


class PartitionedKeys(KeyIndex):
    """``parts`` exact indexes side by side: row ``s`` of part ``p`` is slice ``p`` of slot
    ``s``'s key (``dim / parts`` components).

    A bank with parts stores one entry per token for several attention heads (a pretrained
    decoder's memory layers x KV heads): each head searches only its own keys, and eviction,
    TTL and ids stay per token. Keys come in and go out concatenated, so the log and the
    privacy noising see one row per entry. Parts are flat (exact) until the bank grows past
    ``memory.part_ann_threshold``; then each part moves to its own IVF index (bank.py).
    """

    kind = "flat"
    MAGIC = b"ARPK"

    def __init__(
        self, dim: int, storage: str, parts: int, indexes: list[KeyIndex] | None = None
    ) -> None:
        super().__init__(dim, storage)
        if parts < 2 or dim % parts:
            raise MemoryBankError(f"key dim {dim} does not split into {parts} parts")
        self.parts = parts
        self.part_dim = dim // parts
        self.indexes: list[KeyIndex] = indexes or [
            FlatKeys(self.part_dim, storage) for _ in range(parts)
        ]
        kinds = {index.kind for index in self.indexes}
        if len(kinds) != 1 or len(self.indexes) != parts:
            raise MemoryBankError(f"a partitioned key index needs {parts} parts of one kind")
        self.kind = kinds.pop()  # "flat" (exact), or "ivf" once the bank has grown past a size

    @property
    def ntotal(self) -> int:
        return self.indexes[0].ntotal

    def _split(self, keys: np.ndarray) -> list[np.ndarray]:
        d = self.part_dim
        return [np.ascontiguousarray(keys[:, p * d : (p + 1) * d]) for p in range(self.parts)]

    def append(self, keys: np.ndarray) -> None:
        for index, part in zip(self.indexes, self._split(keys), strict=True):
            index.append(part)

    def overwrite(self, rows: np.ndarray, keys: np.ndarray) -> None:
        for index, part in zip(self.indexes, self._split(keys), strict=True):
            index.overwrite(rows, part)

    def reconstruct(self, rows: np.ndarray) -> np.ndarray:
        return np.concatenate([index.reconstruct(rows) for index in self.indexes], axis=1)

    def part_keys(self, part: int, rows: np.ndarray) -> np.ndarray:
        """Stored keys of ``rows`` (any shape) in one part, float32, shape ``rows.shape + (d,)``."""
        return self.indexes[part].part_keys(0, rows)

    def copy_parts(self) -> list[np.ndarray]:
        """Every row's stored keys, one float32 array per part (copies)."""
        return [keys for index in self.indexes for keys in index.copy_parts()]

    def search(
        self,
        queries: np.ndarray,
        k: int,
        bitmap: np.ndarray | None,
        threads: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        raise MemoryBankError("a partitioned key index is searched one part at a time")

    def search_part(
        self, part: int, queries: np.ndarray, k: int, bitmap: np.ndarray | None, threads: int
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.indexes[part].search(queries, k, bitmap, threads)

    def search_part_with_keys(
        self, part: int, queries: np.ndarray, k: int, bitmap: np.ndarray | None, threads: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`search_part` and the stored keys of the rows found ``(q, k, part_dim)``."""
        return self.indexes[part].search_with_keys(queries, k, bitmap, threads)

    def nbytes(self) -> int:
        return sum(index.nbytes() for index in self.indexes)

    def to_bytes(self) -> np.ndarray:
        chunks = [self.MAGIC, np.uint32(self.parts).tobytes()]
        for index in self.indexes:
            blob = index.to_bytes().tobytes()
            chunks += [np.uint64(len(blob)).tobytes(), blob]
        return np.frombuffer(b"".join(chunks), np.uint8).copy()


def _load_parts(buf: np.ndarray, dim: int, storage: str, nprobe: int) -> PartitionedKeys:
    raw = buf.tobytes()
    parts = int(np.frombuffer(raw[4:8], np.uint32)[0]) if len(raw) >= 8 else 0
    if parts < 2 or dim % parts:
        raise BankFormatError(f"partitioned key index has {parts} parts for key dim {dim}")
    indexes: list[KeyIndex] = []
    at = 8
    for p in range(parts):
        if at + 8 > len(raw):
            raise BankFormatError(f"partitioned key index is truncated at part {p}")
        n = int(np.frombuffer(raw[at : at + 8], np.uint64)[0])
        blob = raw[at + 8 : at + 8 + n]
        if len(blob) != n:
            raise BankFormatError(f"partitioned key index is truncated at part {p}")
        index = load_index(np.frombuffer(blob, np.uint8).copy(), dim // parts, storage, nprobe)
        if isinstance(index, PartitionedKeys) or (indexes and index.kind != indexes[0].kind):
            raise BankFormatError(f"part {p} of a partitioned key index is of another kind")
        indexes.append(index)
        at += 8 + n
    if at != len(raw) or len({index.ntotal for index in indexes}) != 1:
        raise BankFormatError("partitioned key index parts disagree in size")
    return PartitionedKeys(dim, storage, parts, indexes)


def load_index(buf: np.ndarray, dim: int, storage: str, nprobe: int) -> KeyIndex:
    """Deserialize an index written by :meth:`KeyIndex.to_bytes` (bytes already verified).

    Raises :class:`BankFormatError` unless it is a flat or IVF inner-product index of ``dim``
    whose codes have the size of ``storage`` (an IVF one with its array direct map), or a
    :class:`PartitionedKeys` of such parts, all flat or all IVF.
    """
    if buf[:4].tobytes() == PartitionedKeys.MAGIC:
        return _load_parts(buf, dim, storage, nprobe)
    try:
        raw = faiss.deserialize_index(buf)
    except RuntimeError as exc:
        raise BankFormatError(f"key index does not parse: {str(exc).splitlines()[-1]}") from exc
    index = raw  # already downcast by the SWIG typemap (and owned: no second proxy)
    if int(index.d) != dim or index.metric_type != _IP:
        raise BankFormatError(f"key index has dim {index.d}, expected {dim}")
    ivf = isinstance(index, faiss.IndexIVF)
    if not ivf and not isinstance(index, faiss.IndexFlatIP | faiss.IndexScalarQuantizer):
        raise BankFormatError(f"unexpected key index type {type(index).__name__}")
    want = _CODE_BYTES[storage] * dim
    if int(index.code_size) != want:
        raise BankFormatError(
            f"key index stores {index.code_size} bytes per key; {storage} keys of dim {dim} "
            f"take {want}"
        )
    if ivf:
        if index.direct_map.type != faiss.DirectMap.Array:
            raise BankFormatError("IVF key index lacks its direct map")
        return IVFKeys(dim, storage, index, nprobe)
    return FlatKeys(dim, storage, index)


def build_ivf(
    c: MemoryConfig,
    key_dim: int,
    keys: list[np.ndarray],
    live: np.ndarray,
    cancel: threading.Event | None = None,
) -> KeyIndex:
    """An IVF index (one per part of ``keys``) trained on a sample of the ``live`` rows and
    holding every row. Reads only its arguments (it runs on the bank's worker thread); a set
    ``cancel`` stops it between parts with :class:`CancelledError`."""
    if len(keys) == 1:
        nlist = c.nlist()
        step = max(1, live.shape[0] // (64 * nlist))
        sample = np.ascontiguousarray(keys[0][live[::step]])
        ivf = IVFKeys.train(key_dim, c.ivf_storage, nlist, sample, c.ivf_nprobe, c.threads)
        ivf.append(keys[0])
        return ivf
    nlist = c.part_nlist()
    step = max(1, live.shape[0] // (40 * nlist))
    indexes: list[KeyIndex] = []
    for part in keys:
        if cancel is not None and cancel.is_set():
            raise CancelledError("the bank was closed")
        ivf = IVFKeys.train(
            part.shape[1], c.ivf_storage, nlist, np.ascontiguousarray(part[live[::step]]),
            c.ivf_nprobe, c.threads, iterations=10,
        )  # fmt: skip
        ivf.append(part)
        indexes.append(ivf)
    return PartitionedKeys(key_dim, c.ivf_storage, len(keys), indexes)
