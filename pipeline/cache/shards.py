"""Reading images out of a sharded feature array on a local disk, one file read per shard.

zarr decodes every inner chunk through its asyncio codec pipeline, which costs about half a
millisecond of Python per chunk: a shuffled batch of 32 images over 63 arrays is 2,016 chunks,
and that overhead, not the disk or the codec, sets the read speed. The layout is simple enough to
read directly: a shard is one file that holds its images' compressed chunks followed by an index
of (offset, length) pairs. ``ShardReader`` reads that index once per shard, then each image with
one ``pread`` and one decode (blosc and zstd release the GIL, so arrays decode in parallel
threads), and checks every chunk's crc32c as zarr does.

It handles only what the cache writes (see ``layout``): one chunk per image spanning the whole
map, bytes little-endian, then blosc or zstd or nothing, then crc32c, index at the end. For any
other array, or a store that is not a local directory, ``ShardReader.for_array`` returns None and
the caller reads through zarr. Rows are read only where the cache says they are done, so a missing
shard file or an unwritten chunk is an error here, never zarr's fill value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import google_crc32c
import numcodecs
import numpy as np
import zarr.codecs as zc
from zarr.storage import LocalStore

from .store import DamagedData

_EMPTY = np.uint64(2**64 - 1)  # the sharding index's mark for a chunk that was never written


def _checksum_ok(data) -> bool:
    """Whether bytes ending in zarr's crc32c (4 bytes, little-endian) match their checksum."""
    return google_crc32c.value(data[:-4]) == int.from_bytes(bytes(data[-4:]), "little")


def _read_all(fd: int) -> bytes:
    """The whole file: one pread returns at most about 2 GiB on Linux."""
    size, parts, got = os.fstat(fd).st_size, [], 0
    while got < size:
        part = os.pread(fd, size - got, got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


@dataclass(frozen=True)
class _Decoder:
    codec: object | None  # a numcodecs codec, or None for raw bytes

    def __call__(self, data: bytes, out: np.ndarray) -> None:
        if self.codec is None:
            out[...] = np.frombuffer(data, dtype=out.dtype).reshape(out.shape)
        else:
            self.codec.decode(data, out=out)


def _decoder(inner: tuple) -> _Decoder | None:
    """The decoder for an inner codec chain the cache writes, or None for any other chain."""
    if len(inner) < 2 or not isinstance(inner[0], zc.BytesCodec) or not isinstance(inner[-1], zc.Crc32cCodec):
        return None
    if inner[0].endian not in (None, zc.bytes.Endian.little):
        return None
    middle = inner[1:-1]
    if not middle:
        return _Decoder(None)
    if len(middle) == 1 and isinstance(middle[0], zc.BloscCodec):
        return _Decoder(numcodecs.Blosc())  # blosc frames describe themselves
    if len(middle) == 1 and isinstance(middle[0], zc.ZstdCodec) and not middle[0].checksum:
        return _Decoder(numcodecs.Zstd())
    return None


class ShardReader:
    """Rows of one sharded ``(N, C, H, W)`` array, read straight from its shard files."""

    def __init__(self, array, root: str, decoder: _Decoder, shard_rows: int):
        self.array = array
        self.name = array.path
        self.root = root
        self.decoder = decoder
        self.shard_rows = shard_rows
        self.dtype = np.dtype(array.dtype)
        # Shard indexes read so far; several threads may fill it at once, which costs at most a
        # repeated read of the same bytes.
        self._index: dict[int, np.ndarray | None] = {}

    @classmethod
    def for_array(cls, array) -> ShardReader | None:
        """A reader when ``array`` is laid out as the cache writes feature maps, else None."""
        store = array.store
        codecs = array.metadata.codecs
        if not isinstance(store, LocalStore) or len(codecs) != 1 or not isinstance(codecs[0], zc.ShardingCodec):
            return None
        sharding = codecs[0]
        shape, chunk = tuple(array.shape), tuple(sharding.chunk_shape)
        index_ok = (len(sharding.index_codecs) == 2 and isinstance(sharding.index_codecs[0], zc.BytesCodec)
                    and isinstance(sharding.index_codecs[1], zc.Crc32cCodec)
                    and sharding.index_location == zc.sharding.ShardingCodecIndexLocation.end)
        decoder = _decoder(tuple(sharding.codecs))
        if not index_ok or decoder is None or len(shape) < 2 or chunk != (1, *shape[1:]):
            return None
        if tuple(array.shards) != (array.shards[0], *shape[1:]):
            return None
        return cls(array, str(store.root), decoder, int(array.shards[0]))

    def _path(self, shard: int) -> str:
        key = self.array.metadata.encode_chunk_key((shard,) + (0,) * (self.array.ndim - 1))
        return os.path.join(self.root, self.name, key)

    def _shard_index(self, fd: int | None, shard: int) -> np.ndarray | None:
        """(rows, 2) offsets and lengths of the shard's chunks; None when the shard has no file."""
        if shard in self._index:
            return self._index[shard]
        if fd is None:
            index = None
        else:
            size = self.shard_rows * 16 + 4
            file_size = os.fstat(fd).st_size
            raw = os.pread(fd, size, file_size - size) if file_size >= size else b""
            if len(raw) != size or not _checksum_ok(raw):
                raise self._corrupt(shard, "its index")
            index = np.frombuffer(raw[:-4], dtype="<u8").reshape(self.shard_rows, 2)
        self._index[shard] = index
        return index

    def _rows_of(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_rows
        return start, min(start + self.shard_rows, self.array.shape[0])

    def _corrupt(self, shard: int, what: str):
        return DamagedData(self.root, self.name, self._rows_of(shard), f"{what} fails its checksum")

    def read(self, rows: np.ndarray) -> np.ndarray:
        """``array[rows]`` for sorted or unsorted in-range integer rows."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), *self.array.shape[1:]), dtype=self.dtype)
        shards = rows // self.shard_rows
        for shard in np.unique(shards):
            at = np.flatnonzero(shards == shard)
            self._read_shard(int(shard), rows[at] - shard * self.shard_rows, out, at)
        return out

    def _read_shard(self, shard: int, local: np.ndarray, out: np.ndarray, at: np.ndarray) -> None:
        try:
            fd = os.open(self._path(shard), os.O_RDONLY)
        except FileNotFoundError:
            fd = None
        try:
            index = self._shard_index(fd, shard)
            if index is None:
                raise DamagedData(self.root, self.name, self._rows_of(shard), f"its shard file {self._path(shard)} is missing")
            whole = None
            if len(local) > self.shard_rows // 2:
                # Most of the shard is wanted: one read of the file beats one per image.
                whole = np.frombuffer(_read_all(fd), dtype=np.uint8)
            for row, dest in zip(local, at):
                offset, length = index[row]
                if offset == _EMPTY:
                    first = shard * self.shard_rows + int(row)
                    raise DamagedData(self.root, self.name, (first, first + 1), "its chunk was never written")
                offset, length = int(offset), int(length)
                data = (whole[offset : offset + length] if whole is not None
                        else np.frombuffer(os.pread(fd, length, offset), np.uint8))
                if len(data) != length or not _checksum_ok(data):
                    raise self._corrupt(shard, f"the chunk of row {shard * self.shard_rows + int(row)}")
                self.decoder(data[:-4], out[dest])
        finally:
            if fd is not None:
                os.close(fd)
