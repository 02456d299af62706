"""`store salvage`: real stores, damaged at random offsets (pages overwritten, the file truncated, a
meta page or a branch page zeroed), over several seeds. Every record whose pages are intact is
saved bit for bit, nothing that fails its checksum is copied, the damaged store is not touched,
and `embed` into the new store redoes exactly the slides that were not saved."""
import json
import os
import shutil
from pathlib import Path

import lmdb
import numpy as np
import pytest

import proalign
from proalign.errors import StoreError
from proalign.prototypes.io import save_prototypes
from proalign.store import open_store
from proalign.store.lmdb_pages import PageFile
from proalign.store.lmdb_store import decode_record, encode_record
from proalign.store.salvage import salvage_store
from proalign.testing.synthetic_features import write_cohort


def _raw(path: Path) -> dict[str, bytes]:
    """Every record's bytes as LMDB reads them (read-only, no lock file)."""
    env = lmdb.open(str(path), readonly=True, lock=False, subdir=True)
    with env.begin() as txn:
        out = {k.decode(): bytes(v) for k, v in txn.cursor()}
    env.close()
    return out


def _build(path: Path, rng, n: int = 240) -> tuple[dict[str, bytes], dict[str, set[bytes]], str]:
    """A store written one record per transaction, as `embed` writes it: small records (inside leaf
    pages) and large ones (overflow pages), then some rewritten (as a redo does), so the file holds
    freed pages with older copies. Returns the records, every version each slide ever had, and the
    slide written last."""
    history: dict[str, set[bytes]] = {}
    order = [f"slide-{i:03d}" for i in range(n)]
    order += [order[i] for i in rng.choice(n, n // 6, replace=False)]
    with open_store(path, write=True) as s:
        for step, sid in enumerate(order):
            width = 1200 if int(sid[-3:]) % 3 == 0 else 24
            meta = {"method": "proalign", "time": f"2026-01-01T{step // 3600:02d}:{step // 60 % 60:02d}:{step % 60:02d}",
                    "feature_source": {"path": f"/data/features/{sid}.h5"}}
            args = (rng.standard_normal((3, width)).astype(np.float16), int(rng.integers(1000, 10000)), meta)  # same-size records
            s.put(sid, *args)
            history.setdefault(sid, set()).add(encode_record(*args))  # the bytes put stores
    want = _raw(path)
    assert all(want[sid] in history[sid] for sid in want)
    return want, history, order[-1]


def _record_pages(path: Path, want: dict[str, bytes]) -> dict[str, set[int]]:
    """The pages holding each record's current copy: its leaf page and overflow pages, found by
    walking the intact file's tree (checked against LMDB's own reading first)."""
    pages = {}
    with PageFile(path / "data.mdb") as pf:
        walk = pf.walk(pf.metas[0].main_root)
        assert not walk.problems
        for pgno in walk.leaves:
            for node in pf.leaf_nodes(pgno, pf.page(pgno)):
                sid = node.key.decode()
                assert pf.data(node) == want[sid]
                run = set()
                if node.overflow is not None:
                    run = set(range(node.overflow, node.overflow + -(-(16 + node.size) // pf.psize)))
                pages[sid] = {pgno} | run
    assert set(pages) == set(want)
    return pages


def _damage(path: Path, kind: str, rng) -> set[int]:
    """Damage data.mdb in place; returns the pages touched."""
    data = path / "data.mdb"
    size = data.stat().st_size
    with PageFile(data) as pf:
        ps, metas = pf.psize, pf.metas
        tree = pf.walk(metas[0].main_root).pages
        branches = sorted(p for p in tree if pf.children(p, pf.page(p)) is not None)
    if kind == "overwrite":  # 16 KiB of garbage at any offset past the meta pages (the disk fault)
        off, n = int(rng.integers(2 * ps, size - 1)), 16 << 10
        with open(data, "r+b") as f:
            f.seek(off)
            f.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        return set(range(off // ps, (min(off + n, size) - 1) // ps + 1))
    if kind == "pages":  # a few whole pages overwritten with garbage
        hit = set(int(p) for p in rng.choice(np.arange(2, size // ps), 3, replace=False))
        with open(data, "r+b") as f:
            for p in hit:
                f.seek(p * ps)
                f.write(rng.integers(0, 256, ps, dtype=np.uint8).tobytes())
        return hit
    if kind == "truncate":
        cut = int(rng.integers(size // 4, size - 1))
        os.truncate(data, cut)
        return set(range(cut // ps, size // ps + 1))
    pages = {"newest meta": [metas[0].page], "older meta": [metas[1].page], "both metas": [0, 1],
             "branch": branches[:1]}[kind]
    with open(data, "r+b") as f:
        for page in pages:
            f.seek(page * ps)
            f.write(bytes(ps))
    return set(pages)


def _snapshot(folder: Path) -> dict[str, tuple]:
    """Every file and folder under `folder`: names, sizes, mtimes and bytes."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns,) + ((p.stat().st_size, p.read_bytes()) if p.is_file()
                                                                    else ()) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["overwrite", "pages", "truncate", "newest meta", "older meta", "both metas",
                                  "branch"])
def test_salvage_saves_every_intact_record_bit_for_bit(tmp_path, kind, seed):
    rng = np.random.default_rng([seed, len(kind)])
    damaged = tmp_path / "damaged.lmdb"
    want, history, last = _build(damaged, rng)
    where = _record_pages(damaged, want)
    hit = _damage(damaged, kind, rng)
    intact = {sid for sid, pages in where.items() if not pages & hit}
    before = _snapshot(damaged)
    rep = salvage_store(damaged, tmp_path / "new.lmdb")
    assert _snapshot(damaged) == before  # not a byte, not an mtime, no lock file added
    got = _raw(tmp_path / "new.lmdb")
    if kind in ("newest meta", "older meta", "both metas", "truncate"):  # LMDB refuses these: the page scan reads them
        assert rep.method == "pages" and rep.why_pages
    if kind == "newest meta":
        # the last transaction's meta page is gone: like LMDB's own previous-snapshot recovery, the
        # slide it wrote may come back as it was before, or be listed, but never silently wrong
        assert last in got or last in rep.not_saved
        intact.discard(last)
    missing = intact - set(got)
    assert not missing, f"intact records not saved: {sorted(missing)} ({rep.not_saved})"
    assert set(got) <= set(want) and not set(got) & set(rep.not_saved) and set(rep.not_saved) <= set(want)
    for sid, value in got.items():
        decode_record(value, sid, verify=True)  # nothing that fails its checksum
        if sid in intact or len(history[sid]) == 1:
            assert value == want[sid], sid  # the current record, bit for bit
        else:  # a rewritten slide whose current copy is damaged: never another slide's record, and an
            assert value in history[sid], sid  # older version only where the report flags it
            assert value == want[sid] or sid in rep.outside_tree or (kind == "newest meta" and sid == last), sid
    if kind == "both metas":  # no record count left: the salvage cannot claim it saved everything
        assert rep.recorded_entries is None and not rep.complete
    elif kind != "newest meta":
        assert rep.saved + len(rep.not_saved) + rep.unknown_lost == len(want)
    assert json.loads(Path(rep.report_path).read_text())["saved"] == len(got)


@pytest.mark.parametrize("rewrites", [False, True])
def test_page_scan_of_a_sound_store_equals_lmdb(tmp_path, rng, rewrites):
    """The page reader, checked against LMDB itself on intact files: same records, same bytes."""
    path = tmp_path / "s.lmdb"
    want, _, _ = _build(path, rng, n=150) if rewrites else (None, None, None)
    if not rewrites:
        with open_store(path, write=True) as s:
            for i in range(150):
                s.put(f"{i:04d}-é", rng.standard_normal(int(rng.integers(1, 3000))).astype(np.float32), i, {})
        want = _raw(path)
    for method in ("lmdb", "pages"):
        rep = salvage_store(path, tmp_path / method, method=method)
        assert rep.method == method and rep.complete and not rep.outside_tree
        assert _raw(tmp_path / method) == want
    assert salvage_store(path, tmp_path / "auto").method == "lmdb"


def test_record_failing_its_checksum_is_not_copied(tmp_path, rng, cli):
    """The B-tree is sound, one record's bytes are not: LMDB reads the file, the record is listed."""
    path = tmp_path / "s.lmdb"
    want, _, _ = _build(path, rng, n=30)
    big = next(sid for sid in sorted(want) if len(want[sid]) > 4096)
    data = (path / "data.mdb").read_bytes()
    at = data.index(want[big]) + len(want[big]) - 10  # inside the embedding of an overflow record
    with open(path / "data.mdb", "r+b") as f:
        f.seek(at)
        f.write(bytes([data[at] ^ 0xFF]))
    r = cli("store", "salvage", path, "--out", tmp_path / "new.lmdb", check=1)
    assert f"NOT SAVED {big}: checksum mismatch" in r.stderr and "read through LMDB" in r.stdout
    assert "Saved 29 record(s)" in r.stdout
    got = _raw(tmp_path / "new.lmdb")
    assert set(got) == set(want) - {big} and all(got[k] == want[k] for k in got)


def test_refusals(tmp_path, rng):
    path = tmp_path / "s.lmdb"
    _build(path, rng, n=5)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(StoreError, match="already exists and is not an empty folder"):
        salvage_store(path, tmp_path / "taken")
    with pytest.raises(StoreError, match="is the damaged store itself"):
        salvage_store(path, path / ".." / "s.lmdb")
    with pytest.raises(StoreError, match="no store at"):
        salvage_store(tmp_path / "taken", tmp_path / "new")
    # a store held by a running writer: refused, with a second writer and a merge, in one test
    # (test_store.py test_second_writer_gets_a_clear_error)
    salvage_store(path, tmp_path / "taken2")  # an empty folder is fine
    (tmp_path / "empty").mkdir()
    assert salvage_store(path, tmp_path / "empty").complete


def test_salvage_then_embed_redoes_exactly_the_slides_not_saved(tmp_path, cli, rng):
    """The issue's case: 16 KiB of an embedded store's data.mdb overwritten. verify says damaged and
    embed refuses (exit 2); salvage saves the intact records; embed into the new store redoes the
    rest, and the result equals the undamaged store."""
    feats = tmp_path / "features"
    write_cohort(feats, n_slides=60, d=64, n_range=(20, 60), g=4, seed=int(rng.integers(1000)))
    ppath = tmp_path / "p.safetensors"
    save_prototypes(ppath, rng.standard_normal((4, 64)).astype(np.float32), {})
    store = tmp_path / "s.lmdb"
    cli("embed", "--features", feats, "--prototypes", ppath, "--out", store, "--dtype", "float32", check=0)
    clean = _raw(store)
    damaged = tmp_path / "d.lmdb"
    for seed in range(20):  # an offset that breaks the file for LMDB itself, as in the issue
        shutil.copytree(store, damaged, dirs_exist_ok=True)
        _damage(damaged, "overwrite", np.random.default_rng(seed))
        if "the store file is damaged" in cli("store", "verify", damaged, check=1).stdout:
            break
    else:
        pytest.fail("no seed damaged the file's pages")
    before = _snapshot(damaged)
    r = cli("store", "salvage", damaged, "--out", tmp_path / "new.lmdb")
    assert r.returncode in (0, 1) and "report: " in r.stdout
    assert _snapshot(damaged) == before
    rep = json.loads(Path(r.stdout.split("report: ")[1].strip()).read_text())
    saved = _raw(tmp_path / "new.lmdb")
    assert rep["saved"] == len(saved) and all(saved[k] == clean[k] for k in saved)
    for sid in rep["not_saved"]:
        assert f"NOT SAVED {sid}: " in r.stderr
    r = cli("embed", "--features", feats, "--prototypes", ppath, "--out", tmp_path / "new.lmdb", "--dtype",
            "float32", check=0)
    assert f"{60 - len(saved)} embedded, {len(saved)} already stored" in r.stdout
    redone = json.loads(Path(r.stdout.split("report: ")[1].strip()).read_text())["done"]
    assert set(redone) == set(clean) - set(saved)
    with proalign.open_store(store) as a, proalign.open_store(tmp_path / "new.lmdb") as b:
        assert list(a) == list(b)
        for sid in a:
            np.testing.assert_array_equal(a[sid], b[sid])


def _misleading_copy(path: Path, want: dict[str, bytes]) -> bool:
    """Does the file hold a stale leaf copy of a slide whose overflow pointer now leads to another
    slide's record, newer than the slide's own (a page freed and reused since)?"""
    with PageFile(path / "data.mdb") as pf:
        for _, nodes in pf.all_leaves():
            for node in nodes:
                sid = node.key.decode()
                if node.overflow is None or pf.data(node) == want[sid]:
                    continue
                try:
                    other = decode_record(pf.data(node), sid, verify=True).meta
                except StoreError:
                    continue
                own = decode_record(want[sid], sid).meta
                if Path(other["feature_source"]["path"]).stem != sid and other["time"] > own["time"]:
                    return True
    return False


def test_a_stale_pointer_into_reused_pages_is_not_followed(tmp_path):
    """Freed pages are reused: an old leaf copy of slide A may point at overflow pages that now hold
    slide B's newer record, which passes its checksum. With a meta page lost (stale copies cannot
    be told apart by the free list) the salvage must still store A's own record under A."""
    for seed in range(60):
        path = tmp_path / f"s{seed}.lmdb"
        want, _, _ = _build(path, np.random.default_rng([seed, 99]))
        if _misleading_copy(path, want):
            break
        shutil.rmtree(path)
    else:
        pytest.fail("no store with a stale pointer into reused pages was made")
    _damage(path, "older meta", np.random.default_rng(0))
    rep = salvage_store(path, tmp_path / "new.lmdb")
    assert rep.method == "pages" and rep.complete and _raw(tmp_path / "new.lmdb") == want
