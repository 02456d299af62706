"""Reading an LMDB data file page by page, without LMDB, for salvaging a damaged store.

What this relies on is LMDB's documented on-disk layout (64-bit builds, LMDB 0.9 data version 1):
- the file is an array of pages of `psize` bytes; page n starts at byte n * psize;
- every page starts with a 16-byte header: pgno (u64, the page's own number), pad (u16), flags
  (u16: 1 branch, 2 leaf, 4 overflow, 8 meta), then lower and upper (u16 each; an overflow page
  holds its page count (u32) there instead);
- pages 0 and 1 are meta pages: after the header, magic 0xBEEFC0DE (u32), version (u32), address
  (u64), map size (u64), two database records (free-page DB, main DB: pad u32 (the free DB's
  holds the page size), flags u16, depth u16, branch, leaf and overflow page counts, entries and
  root page (u64 each)), the last page number and the transaction id (u64 each); LMDB uses
  the valid meta page with the larger transaction id;
- a branch or leaf page holds (lower - 16) / 2 u16 offsets of its nodes from byte 16 on; a node
  is lo, hi, flags, ksize (u16 each) then the key. In a leaf node the data size is lo | hi << 16
  and the data follows the key, unless flag 1 (big data): then the data is the u64 number of the
  first of the overflow pages holding it (after their 16-byte header). In a branch node the
  child page number is lo | hi << 16 | flags << 32;
- the free-page DB maps a transaction id to the pages it freed: u64 count, then the page numbers.

Nothing here trusts a byte it has not checked: a page counts only when its header names its own
number and its node offsets and sizes stay inside the page (and file), so a damaged, zeroed,
misplaced or missing page is skipped, never followed. The file is read with pread (no mmap: a
truncated file would kill the process with SIGBUS).
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Iterator

HEADER = 16
P_BRANCH, P_LEAF, P_OVERFLOW, P_META = 0x01, 0x02, 0x04, 0x08
P_LEAF2, P_SUBP = 0x20, 0x40
F_BIGDATA = 0x01
MAGIC = 0xBEEFC0DE
DATA_VERSION = 1
P_INVALID = 2**64 - 1
PAGE_SIZES = (4096, 8192, 16384, 32768, 65536, 2048, 1024, 512)
MAX_DEPTH = 64  # far deeper than any real B-tree: a deeper walk is a loop in damaged pages


@dataclass(frozen=True)
class Meta:
    page: int  # 0 or 1
    txnid: int
    psize: int
    last_pgno: int
    free_root: int
    main_root: int
    main_entries: int


@dataclass(frozen=True)
class Node:
    """One leaf node: its key, and where its data lies in the file (offset, size)."""
    page: int
    key: bytes
    offset: int  # file offset of the data (in the leaf page, or after an overflow page's header)
    size: int
    overflow: int | None = None  # first overflow page, for big data


@dataclass
class Walk:
    """The pages of one B-tree reached from its root, and what could not be followed."""
    pages: set[int] = field(default_factory=set)
    leaves: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class PageFile:
    """data.mdb opened read-only; pages are read with pread and checked before use."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        self.metas, self.meta_problems = self._read_metas()
        self.psize = self.metas[0].psize if self.metas else self._guess_psize()
        self.n_pages = self.size // self.psize

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "PageFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, offset: int, n: int) -> bytes:
        return os.pread(self.fd, n, offset) if 0 <= offset < self.size else b""

    # -- meta pages ---------------------------------------------------------------------------
    def _read_metas(self) -> tuple[list[Meta], list[str]]:
        """The valid meta pages, newest (largest txnid) first, and why the others are not."""
        metas, problems = [], []
        psize = None
        for i in (0, 1):
            # page 1 starts one page in: the page size comes from page 0 or, if that is damaged,
            # from the first candidate size at which page 1 reads as a meta page
            for ps in ([psize] if psize else [None] if i == 0 else PAGE_SIZES):
                m, why = self._meta_at(i, ps)
                if m is not None:
                    break
            if m is None:
                problems.append(f"meta page {i}: {why}")
                continue
            psize = m.psize  # page 1 must then agree with it
            metas.append(m)
        return sorted(metas, key=lambda m: -m.txnid), problems

    def _meta_at(self, i: int, psize: int | None) -> tuple[Meta | None, str]:
        b = self.read(i * (psize or 0), HEADER + 136)
        if len(b) < HEADER + 136:
            return None, "missing (file too short)"
        pgno, _, flags = struct.unpack_from("<QHH", b, 0)
        magic, version = struct.unpack_from("<II", b, 16)
        if pgno != i or not flags & P_META or magic != MAGIC:
            return None, "not a meta page (zeroed or overwritten)"
        if version != DATA_VERSION:
            return None, f"LMDB data version {version}, expected {DATA_VERSION}"
        ps = struct.unpack_from("<I", b, 40)[0]
        if ps not in PAGE_SIZES or (psize is not None and ps != psize):
            return None, f"bad page size {ps}"
        free_root = struct.unpack_from("<Q", b, 80)[0]
        main_entries, main_root = struct.unpack_from("<QQ", b, 120)
        last_pgno, txnid = struct.unpack_from("<QQ", b, 136)
        return Meta(i, txnid, ps, last_pgno, free_root, main_root, main_entries), ""

    def _guess_psize(self) -> int:
        """No meta page readable: the page size at which most pages name their own number."""
        def score(ps: int) -> int:
            n = min(self.size // ps, 2048)
            return sum(struct.unpack_from("<Q", self.read(i * ps, 8).ljust(8, b"\0"))[0] == i for i in range(2, n))
        return max(PAGE_SIZES, key=score)

    # -- pages and nodes ----------------------------------------------------------------------
    def page(self, pgno: int) -> bytes | None:
        """Page `pgno` when it is wholly in the file and its header names it, else None."""
        if not 0 <= pgno < self.n_pages:
            return None
        b = self.read(pgno * self.psize, self.psize)
        if len(b) != self.psize or struct.unpack_from("<Q", b, 0)[0] != pgno:
            return None
        return b

    def _node_offsets(self, b: bytes, kind: int) -> list[int] | None:
        flags, lower, upper = struct.unpack_from("<HHH", b, 10)
        if flags & (P_BRANCH | P_LEAF | P_OVERFLOW | P_META | P_LEAF2 | P_SUBP) != kind:
            return None
        if not HEADER <= lower <= upper <= self.psize or (lower - HEADER) % 2:
            return None
        offs = struct.unpack_from(f"<{(lower - HEADER) // 2}H", b, HEADER)
        if any(not upper <= o <= self.psize - 8 for o in offs):
            return None
        return list(offs)

    def children(self, pgno: int, b: bytes) -> list[int] | None:
        """The child pages of branch page `pgno` (`b` its bytes), or None if it is no sound branch page."""
        offs = self._node_offsets(b, P_BRANCH)
        if offs is None:
            return None
        out = []
        for o in offs:
            lo, hi, fl, ksize = struct.unpack_from("<HHHH", b, o)
            if o + 8 + ksize > self.psize:
                return None
            out.append(lo | hi << 16 | fl << 32)
        return out

    def leaf_nodes(self, pgno: int, b: bytes) -> list[Node] | None:
        """The nodes of leaf page `pgno` (`b` its bytes), or None if it is no sound leaf page. A
        node whose data cannot lie where it says (past the page, an overflow run that is not there
        or too short) is left out."""
        offs = self._node_offsets(b, P_LEAF)
        if offs is None:
            return None
        base, out = pgno * self.psize, []
        for o in offs:
            lo, hi, fl, ksize = struct.unpack_from("<HHHH", b, o)
            size, kend = lo | hi << 16, o + 8 + ksize
            key = b[o + 8:kend]
            if fl & F_BIGDATA:
                if kend + 8 > self.psize:
                    continue
                ov = struct.unpack_from("<Q", b, kend)[0]
                if self._overflow_ok(ov, size):
                    out.append(Node(pgno, key, ov * self.psize + HEADER, size, ov))
            elif fl == 0 and kend + size <= self.psize:
                out.append(Node(pgno, key, base + kend, size))
            # other flags (sub-databases, duplicates) are not used by an embedding store
        return out

    def _overflow_ok(self, pgno: int, size: int) -> bool:
        h = self.read(pgno * self.psize, HEADER) if 2 <= pgno < self.n_pages else b""
        if len(h) != HEADER:
            return False
        no, _, flags, count = struct.unpack_from("<QHHI", h, 0)
        return (no == pgno and flags & (P_OVERFLOW | P_BRANCH | P_LEAF | P_META) == P_OVERFLOW
                and HEADER + size <= count * self.psize and pgno * self.psize + HEADER + size <= self.size)

    def data(self, node: Node) -> bytes:
        return self.read(node.offset, node.size)

    # -- trees --------------------------------------------------------------------------------
    def walk(self, root: int) -> Walk:
        """Every page of the B-tree under `root` that can be reached through sound pages."""
        w = Walk()
        if root == P_INVALID:
            return w
        stack = [(root, 0)]
        while stack:
            pgno, depth = stack.pop()
            if pgno in w.pages or depth > MAX_DEPTH:
                w.problems.append(f"page {pgno} is reached twice or too deep (a loop in damaged pages)")
                continue
            b = self.page(pgno)
            if b is None:
                w.problems.append(f"page {pgno} is missing or damaged")
                continue
            kids = self.children(pgno, b)
            if kids is not None:
                w.pages.add(pgno)
                stack.extend((k, depth + 1) for k in reversed(kids))
            elif self.leaf_nodes(pgno, b) is not None:
                w.pages.add(pgno)
                w.leaves.append(pgno)
            else:
                w.problems.append(f"page {pgno} is neither a sound branch nor leaf page")
        return w

    def free_pages(self, meta: Meta) -> set[int] | None:
        """The pages LMDB's free-page DB lists as free in `meta`'s snapshot, or None when that DB
        cannot be read whole (then no page can be told apart as free)."""
        w = self.walk(meta.free_root)
        if w.problems:
            return None
        free: set[int] = set()
        for pgno in w.leaves:
            for node in self.leaf_nodes(pgno, self.page(pgno)) or []:
                ids = self.data(node)
                if len(ids) < 8 or len(ids) % 8:
                    return None
                n = struct.unpack_from("<Q", ids, 0)[0]
                if 8 + 8 * n > len(ids):
                    return None
                free.update(struct.unpack_from(f"<{n}Q", ids, 8))
        return free

    def all_leaves(self) -> Iterator[tuple[int, list[Node]]]:
        """Every page of the file that reads as a sound leaf page (current, stale or orphaned),
        with its nodes."""
        block = max(1, (16 << 20) // self.psize)
        for first in range(2, self.n_pages, block):
            buf = self.read(first * self.psize, block * self.psize)
            for i in range(len(buf) // self.psize):
                pgno = first + i
                b = buf[i * self.psize:(i + 1) * self.psize]
                if struct.unpack_from("<Q", b, 0)[0] == pgno and struct.unpack_from("<H", b, 10)[0] & P_LEAF:
                    nodes = self.leaf_nodes(pgno, b)
                    if nodes is not None:
                        yield pgno, nodes
