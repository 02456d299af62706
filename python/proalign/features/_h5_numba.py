"""Compiled half of the row-chunk reader (`h5_chunks.py`): numba, cached on disk.

Imported only when a file is read, and only where numba imports. `pread`/`preadv` are called
from compiled code through two intrinsics that name the C library's functions (resolved by
name when the code is loaded, so the compiled code can be cached); everything here is checked
against h5py's own reads by tests/test_h5_chunks.py.

Return codes: >= 0 success (a count), REFUSED (the layout is not plain: h5py reads it),
TRUNCATED (the file ends before a chunk or node it lists), IO_ERROR (a read failed: the caller
retries in Python, which raises the system's error).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import cfunc, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

REFUSED = -1
TRUNCATED = -2
IO_ERROR = -3
IOV_MAX = 1024


@intrinsic
def _pread(typingctx, fd, ptr, n, off):
    """ssize_t pread(int fd, void *buf, size_t n, off_t off), buf given as an address."""
    sig = types.int64(types.int64, types.uint64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        i64, i8p = ir.IntType(64), ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i64, [ir.IntType(32), i8p, i64, i64]),
                                            "pread")
        fd_, ptr_, n_, off_ = args
        return builder.call(fn, [builder.trunc(fd_, ir.IntType(32)), builder.inttoptr(ptr_, i8p), n_, off_])

    return sig, codegen


@intrinsic
def _preadv(typingctx, fd, iov, count, off):
    """ssize_t preadv(int fd, const struct iovec *iov, int count, off_t off), iov as an address."""
    sig = types.int64(types.int64, types.uint64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        i32, i64, i8p = ir.IntType(32), ir.IntType(64), ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i64, [i32, i8p, i32, i64]), "preadv")
        fd_, iov_, count_, off_ = args
        return builder.call(fn, [builder.trunc(fd_, i32), builder.inttoptr(iov_, i8p), builder.trunc(count_, i32),
                                 off_])

    return sig, codegen


_TREE = np.uint64(0x45455254)  # "TREE" read as a little-endian u32
_LOW32 = np.uint64(0xFFFFFFFF)
_BYTE = np.uint64(0xFF)
_32, _40, _48 = np.uint64(32), np.uint64(40), np.uint64(48)


@njit(cache=True, nogil=True)
def walk_btree1(fd, root, file_size, ndims, row_axis, n_chunks, rows_per_chunk, chunk_bytes, row_bytes, max_gap,
                table, out):
    """Walk a version-1 B-tree of raw-data chunks (node type 1), listing its chunks into table
    (4, n_chunks): first row, address, stored size, filter mask; with an `out` of n_chunks *
    chunk_bytes bytes, also read each leaf's chunks into it as soon as the leaf is read (the
    copy then overlaps the disk's reading ahead, as a plain read's does).

    A node: "TREE", type, level, entries used (u16), two sibling addresses, then per entry a key
    (size u32, filter mask u32, offset: ndims u64 in elements, the last 0) and a child address
    (a chunk in a leaf, else a node one level down). Every field after the 8-byte first word is
    8 bytes, so a node is read as little-endian 64-bit words, ndims + 2 per entry (the caller
    checks the host is little-endian). Every chunk is checked before it is read (full size, no
    filter, its block of rows not seen before, inside the file); the count at the end. Returns
    the number of chunks (n_chunks: every block present), or REFUSED / TRUNCATED / IO_ERROR."""
    read = out.size > 0
    words = ndims + 2
    buf = np.empty(3 + 64 * words + ndims + 1, dtype=np.uint64)  # 2K entries for the default K = 32
    cur = np.empty(n_chunks + 1, dtype=np.int64)
    nxt = np.empty(n_chunks + 1, dtype=np.int64)
    seen = np.zeros(n_chunks, dtype=np.bool_)
    leaf_addr = np.empty(64, dtype=np.int64)
    leaf_dst = np.empty(64, dtype=np.int64)
    iov = np.empty((IOV_MAX, 2), dtype=np.uint64)
    scratch = np.empty(max(max_gap, 1), dtype=np.uint8)
    cur[0] = root
    n_cur = 1
    level = -1
    count = 0
    for depth in range(32):
        n_nxt = 0
        for i in range(n_cur):
            at = cur[i]
            if at < 0 or at + 24 > file_size:
                return TRUNCATED
            want = min(8 * buf.size, file_size - at)
            if _pread(fd, buf.ctypes.data, want, at) != want:
                return IO_ERROR
            head = buf[0]
            if head & _LOW32 != _TREE or (head >> _32) & _BYTE != 1:  # a node of raw-data chunks
                return REFUSED
            lev = np.int64((head >> _40) & _BYTE)
            if depth == 0:
                level = lev
            elif lev != level:
                return REFUSED
            used = np.int64(head >> _48)
            need = 8 * (3 + used * words + ndims + 1)
            if need > want:
                if at + need > file_size:
                    return TRUNCATED
                if need > 8 * buf.size:  # a file made with a larger K
                    buf = np.empty(need // 8, dtype=np.uint64)
                if _pread(fd, buf.ctypes.data, need, at) != need:
                    return IO_ERROR
            if level > 0:
                for e in range(used):
                    if n_nxt > n_chunks:
                        return REFUSED
                    nxt[n_nxt] = np.int64(buf[3 + e * words + words - 1])
                    n_nxt += 1
                continue
            if count + used > n_chunks:
                return REFUSED  # more chunks than blocks of rows
            if used > leaf_addr.size:
                leaf_addr = np.empty(used, dtype=np.int64)
                leaf_dst = np.empty(used, dtype=np.int64)
            ordered = True
            for e in range(used):
                p = 3 + e * words
                row = np.int64(-1)
                for d in range(ndims):
                    o = np.int64(buf[p + 1 + d])
                    if d == row_axis:
                        row = o
                    elif o != 0:
                        return REFUSED  # a chunk past the first along another axis
                size = np.int64(buf[p] & _LOW32)
                mask = np.int64(buf[p] >> _32)
                addr = np.int64(buf[p + words - 1])
                if size != chunk_bytes or mask != 0 or row < 0 or row % rows_per_chunk != 0:
                    return REFUSED  # filtered or partial chunks: h5py's path
                block = row // rows_per_chunk
                if block >= n_chunks or seen[block]:
                    return REFUSED
                seen[block] = True
                if addr < 0 or addr + chunk_bytes > file_size:
                    return TRUNCATED
                table[0, count] = row
                table[1, count] = addr
                table[2, count] = size
                table[3, count] = mask
                count += 1
                leaf_addr[e] = addr
                leaf_dst[e] = row * row_bytes
                if e > 0 and addr < leaf_addr[e - 1] + chunk_bytes:
                    ordered = False
            if read and used > 0:
                if ordered:
                    rc = _read_sorted(fd, leaf_addr, leaf_dst, np.arange(used), used, chunk_bytes, max_gap, iov,
                                      scratch, out)
                else:  # not in file order, or overlapping: sort, and read overlapping chunks alone
                    rc = _read_sorted(fd, leaf_addr, leaf_dst, np.argsort(leaf_addr[:used], kind="mergesort"),
                                      used, chunk_bytes, max_gap, iov, scratch, out)
                if rc != 0:
                    return rc
        if level == 0:
            return count if count == n_chunks else REFUSED
        level -= 1
        cur, nxt = nxt, cur
        n_cur = n_nxt
    return REFUSED


@njit(cache=True, nogil=True)
def read_chunks(fd, idx, count, n_chunks, rows_per_chunk, chunk_bytes, row_bytes, file_size, max_gap, out):
    """Check a chunk listing idx (4, >= count: first row, address, size, filter mask) proves the
    plain layout (one full-size unfiltered chunk per block of rows, all inside the file), then
    read every chunk into out[row * row_bytes:][:chunk_bytes]. Returns 0 or REFUSED / TRUNCATED /
    IO_ERROR."""
    if count != n_chunks:
        return REFUSED
    rows = idx[0, :count]
    addr = idx[1, :count]
    ordered = True
    seen = np.zeros(n_chunks, dtype=np.bool_)
    for i in range(count):
        r = rows[i]
        if idx[2, i] != chunk_bytes or idx[3, i] != 0 or r < 0 or r % rows_per_chunk != 0:
            return REFUSED
        if r // rows_per_chunk >= n_chunks or seen[r // rows_per_chunk]:
            return REFUSED
        seen[r // rows_per_chunk] = True
        if addr[i] < 0 or addr[i] + chunk_bytes > file_size:
            return TRUNCATED
        if i > 0 and addr[i] < addr[i - 1] + chunk_bytes:
            ordered = False
    order = np.arange(count) if ordered else np.argsort(addr, kind="mergesort")
    iov = np.empty((IOV_MAX, 2), dtype=np.uint64)
    scratch = np.empty(max(max_gap, 1), dtype=np.uint8)
    return _read_sorted(fd, addr, rows * row_bytes, order, count, chunk_bytes, max_gap, iov, scratch, out)


@njit(cache=True, nogil=True)
def _read_sorted(fd, addr, dst, order, count, chunk_bytes, max_gap, iov, scratch, out):
    """Read chunk order[t] (chunk_bytes at addr[.], ascending in t) into out[dst[.]:][:chunk_bytes]
    with preadv: one call per stretch of the file, the gaps up to max_gap read into scratch;
    chunks back to back in the file and in out are one iovec entry; a chunk overlapping the one
    before it starts a new call. Returns 0 or TRUNCATED / IO_ERROR."""
    base_out = np.uint64(out.ctypes.data)
    base_scratch = np.uint64(scratch.ctypes.data)
    n = 0  # entries in the pending call
    pos = np.int64(0)  # file position of its first byte
    nbytes = np.int64(0)  # bytes it reads
    last_data = False  # the last entry is chunk data that ends at dst_end in out
    dst_end = np.int64(-1)
    prev = np.int64(0)  # end of the previous chunk in the file
    for t in range(count):
        j = order[t]
        a = addr[j]
        d = dst[j]
        if t > 0:
            gap = a - prev
            if gap > max_gap or gap < 0 or n >= IOV_MAX - 1:
                rc = _flush(fd, iov, n, pos, nbytes)
                if rc != 0:
                    return rc
                n = 0
            elif gap > 0:
                iov[n, 0] = base_scratch
                iov[n, 1] = gap
                n += 1
                nbytes += gap
                last_data = False
            elif last_data and d == dst_end:  # back to back in the file and in out: one entry
                iov[n - 1, 1] += chunk_bytes
                nbytes += chunk_bytes
                dst_end += chunk_bytes
                prev = a + chunk_bytes
                continue
        if n == 0:
            pos = a
            nbytes = 0
        iov[n, 0] = base_out + np.uint64(d)
        iov[n, 1] = chunk_bytes
        n += 1
        nbytes += chunk_bytes
        last_data = True
        dst_end = d + chunk_bytes
        prev = a + chunk_bytes
    if n:
        return _flush(fd, iov, n, pos, nbytes)
    return 0


@njit(cache=True, nogil=True)
def _flush(fd, iov, n, pos, nbytes):
    got = _preadv(fd, iov.ctypes.data, n, pos)
    if got == nbytes:
        return 0
    if got < 0:
        return IO_ERROR
    # short: end of file, a signal, or over 2 GiB in one call; go on entry by entry
    done = got
    at = pos
    for k in range(n):
        length = np.int64(iov[k, 1])
        if done >= length:
            done -= length
            at += length
            continue
        off = done
        done = 0
        while off < length:
            r = _pread(fd, iov[k, 0] + np.uint64(off), length - off, at + off)
            if r < 0:
                return IO_ERROR
            if r == 0:
                return TRUNCATED
            off += r
        at += length
    return 0


# int cb(const hsize_t *offset, unsigned filter_mask, haddr_t addr, hsize_t size, void *data): the
# callback H5Dchunk_iter calls per chunk; data: [count, capacity, row axis, overflow, then
# (first row, address, size, filter mask) per chunk]
_CHUNK_ITER_SIG = types.intc(types.CPointer(types.uint64), types.uint32, types.uint64, types.uint64,
                             types.CPointer(types.int64))


@cfunc(_CHUNK_ITER_SIG, cache=True)
def on_chunk(offset, filter_mask, addr, size, data):
    n = data[0]
    if n >= data[1]:
        data[3] = 1
        return 1  # more chunks than blocks of rows: stop (h5py's path)
    at = 4 + 4 * n
    data[at] = offset[data[2]]
    data[at + 1] = addr
    data[at + 2] = size
    data[at + 3] = filter_mask
    data[0] = n + 1
    return 0
