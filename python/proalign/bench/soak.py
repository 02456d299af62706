"""Kill-and-read soak: `embed` on a generated archive, killed again and again, read all along.

    python -m proalign.bench.soak [--slides 2000] [--rounds 12] [--ray-rounds 4] [--seed 0]
        [--workers 2] [--json out.json]

Each round starts `proalign-engine embed` (its own process group) and, at a random moment, kills
the whole group with SIGKILL or SIGTERM (the local pool, then Ray). A second process reads the
store the whole time and checks every record it sees (header, checksum, finite values) and that
no slide's record ever changes once seen (a slide stored twice). After the kill rounds one run
finishes the archive. Then a full disk: a run into a small disk that fills mid-run, and a merge of
two shard stores into a small disk that fills mid-merge; each is rerun once the disk has room. At
the end every store equals a clean uninterrupted run bit for bit (embedding bytes and patch count).

The small disk is a tmpfs mount (needs root, e.g. CI) grown with `mount -o remount`; without
mount rights the file-size limit (RLIMIT_FSIZE) stands in for it. Exit code 1 when any check fails.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import StoreError
from ..store import open_store
from ..store.export import verify_store
from ..store.lmdb_store import decode_record

EXE = [str(Path(sys.executable).parent / "proalign-engine")]
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_DISABLE_USAGE_STATS": "1"}
D, K = 64, 4  # small features: the soak is about the store and the scheduler, not the kernels


# -- the archive and its clean store -------------------------------------------------------------
def make_archive(root: Path, n_slides: int, seed: int) -> tuple[Path, Path]:
    """n_slides TRIDENT-style feature files (N 50..600, d 64) and a prototype file."""
    from ..prototypes.io import save_prototypes
    from ..testing.synthetic_features import write_cohort

    feats = root / "features"
    write_cohort(feats, n_slides=n_slides, d=D, n_range=(50, 600), g=K, seed=seed)
    ppath = root / "prototypes.safetensors"
    save_prototypes(ppath, np.random.default_rng(seed).standard_normal((K, D)).astype(np.float32), {})
    return feats, ppath


def contents(store: Path) -> dict[str, tuple[bytes, int]]:
    """slide id -> (embedding bytes, patch count): what must equal the clean run bit for bit."""
    with open_store(store) as s:
        return {sid: (rec.embedding.tobytes(), rec.n_patches) for sid, rec in s.items(verify=True)}


def embed_cmd(feats: Path, ppath: Path, out: Path, *extra: str) -> list[str]:
    return [*EXE, "embed", "--features", str(feats), "--prototypes", str(ppath), "--out", str(out),
            "--no-progress", *extra]


def run(cmd: list[str], env: dict | None = None, fsize: int | None = None, timeout: float = 1800) -> int:
    """Run to the end; returns the exit code. fsize: a file-size limit (bytes) standing in for a full disk."""
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))) if fsize else None
    p = subprocess.run(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True, timeout=timeout, preexec_fn=limit)
    if p.returncode not in (0, 3):
        print(f"  exit {p.returncode}: {p.stderr.strip().splitlines()[-1:] if p.stderr.strip() else ''}")
    return p.returncode


# -- the reader ---------------------------------------------------------------------------------
def read_forever(store: Path, stop: Path, log: Path) -> None:
    """The reader process: scan the store until `stop` exists; write what it saw to `log`.
    A record that fails its checks is torn; one whose bytes change after it was seen was stored twice."""
    seen: dict[str, str] = {}
    torn: dict[str, str] = {}
    twice: list[str] = []
    scans = errors = 0
    while not stop.exists():
        try:
            with open_store(store) as s, s.read_txn() as txn:
                for k, v in txn.cursor():
                    sid = k.decode()
                    try:
                        rec = decode_record(v, sid, verify=True)
                        if not np.isfinite(rec.embedding.astype(np.float32)).all():
                            raise ValueError("NaN or inf in the embedding")
                    except Exception as e:  # noqa: BLE001 - any failure to read a record is a torn record
                        torn[sid] = str(e)
                        continue
                    digest = hashlib.sha1(v).hexdigest()
                    if seen.setdefault(sid, digest) != digest and sid not in twice:
                        twice.append(sid)
            scans += 1
        except StoreError:
            errors += 1  # not created yet, or being created
        time.sleep(0.01)
    log.write_text(json.dumps({"scans": scans, "open_errors": errors, "records_seen": len(seen),
                               "torn": torn, "stored_twice": twice}))


@contextmanager
def reader(store: Path) -> Iterator[dict]:
    """A reader process on `store` for the duration of the block; yields its findings at the end."""
    tmp = Path(tempfile.mkdtemp(prefix="soak-reader-"))
    stop, log = tmp / "stop", tmp / "log.json"
    p = subprocess.Popen([sys.executable, "-m", "proalign.bench.soak", "--reader", str(store), str(stop), str(log)])
    found: dict = {}
    try:
        yield found
    finally:
        stop.touch()
        p.wait(120)
        found.update(json.loads(log.read_text()) if log.exists() else {"reader_failed": p.returncode})
        shutil.rmtree(tmp, ignore_errors=True)


# -- kill rounds --------------------------------------------------------------------------------
def stored(store: Path) -> int:
    try:
        with open_store(store) as s:
            return len(s)
    except StoreError:
        return 0


def kill_round(cmd: list[str], store: Path, rng: np.random.Generator, env: dict, max_wait: float) -> dict:
    """Start `cmd` in its own process group and, once it stores slides, kill the group at a random
    moment. Returns what happened."""
    sig = signal.SIGKILL if rng.random() < 0.6 else signal.SIGTERM
    before = stored(store)
    p = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.time() + 300
    while stored(store) == before and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)  # start-up (imports, workers) is not what the soak is about: kill mid-run
    time.sleep(float(rng.uniform(0.0, max_wait)))
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass  # it finished first
    try:
        code = p.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        code = p.wait()
    return {"signal": sig.name, "exit": code, "stored_before": before, "stored_after": stored(store),
            "damage": damage(store)}


def damage(store: Path) -> dict:
    """verify_store's findings ({} when intact or not created yet)."""
    if not stored(store):
        return {}
    with open_store(store) as s:
        return verify_store(s)


def ray_leftovers() -> list[int]:
    """Ray's daemons still alive (after a killed driver)."""
    out = subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def soak_rounds(feats: Path, ppath: Path, out: Path, rounds: int, scheduler: str, workers: int,
                rng: np.random.Generator, max_wait: float) -> list[dict]:
    env = RAY_ENV if scheduler == "ray" else {}
    cmd = embed_cmd(feats, ppath, out, "--workers", str(workers), "--scheduler", scheduler)
    results = []
    for r in range(rounds):
        res = kill_round(cmd, out, rng, env, max_wait)
        if scheduler == "ray":
            res["ray_daemons_left"] = len(ray_leftovers())
            subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True)
        print(f"  {scheduler} round {r}: {res['signal']} exit {res['exit']}, stored {res['stored_before']} -> "
              f"{res['stored_after']}" + (f", DAMAGE {res['damage']}" if res["damage"] else ""), flush=True)
        results.append(res)
    return results


# -- full disk ----------------------------------------------------------------------------------
class SmallDisk:
    """A folder on a disk of `size` bytes: a tmpfs mount when allowed, else a file-size limit."""

    def __init__(self, size: int):
        self.path = Path(tempfile.mkdtemp(prefix="soak-disk-"))
        self.size = size
        self.mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.path)],
                                      capture_output=True).returncode == 0

    @property
    def fsize(self) -> int | None:
        """The file-size limit a run gets when no tmpfs could be mounted."""
        return None if self.mounted else self.size

    def grow(self, size: int) -> None:
        if self.mounted:
            subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)
        self.size = size

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.path)], check=False)
        shutil.rmtree(self.path, ignore_errors=True)


def full_disk_run(feats: Path, ppath: Path, clean: dict, size: int) -> dict:
    """A run into a disk that fills mid-run, then the same command once the disk has room."""
    disk = SmallDisk(size)
    try:
        out = disk.path / "s.lmdb"
        with reader(out) as seen:
            first = run(embed_cmd(feats, ppath, out), fsize=disk.fsize)
            mid = stored(out)
            disk.grow(size * 16)
            second = run(embed_cmd(feats, ppath, out), fsize=disk.fsize)
        return {"disk": "tmpfs" if disk.mounted else "RLIMIT_FSIZE", "size": size, "first_exit": first,
                "stored_when_full": mid, "second_exit": second, "equal_to_clean": contents(out) == clean,
                "reader": seen}
    finally:
        disk.close()


def full_disk_merge(feats: Path, ppath: Path, work: Path, clean: dict, size: int) -> dict:
    """Two shard stores merged into a disk that fills mid-merge, then merged again with room."""
    shards = [work / f"shard{i}.lmdb" for i in range(2)]
    for i, s in enumerate(shards):
        if not s.exists():
            assert run(embed_cmd(feats, ppath, s, "--shard", f"{i}/2")) == 0, f"shard {i} failed"
    disk = SmallDisk(size)
    try:
        out = disk.path / "merged.lmdb"
        merge = [*EXE, "store", "merge", str(out), *map(str, shards)]
        with reader(out) as seen:
            first = run(merge, fsize=disk.fsize)
            mid = stored(out)
            when_full = damage(out)
            disk.grow(size * 16)
            second = run(merge, fsize=disk.fsize)
        return {"disk": "tmpfs" if disk.mounted else "RLIMIT_FSIZE", "size": size, "first_exit": first,
                "stored_when_full": mid, "damage_when_full": when_full, "second_exit": second,
                "equal_to_clean": contents(out) == clean, "reader": seen}
    finally:
        disk.close()


# -- the whole soak -----------------------------------------------------------------------------
def soak(n_slides: int, rounds: int, ray_rounds: int, workers: int, seed: int, max_wait: float,
         disk_size: int, work: Path) -> dict:
    t0 = time.perf_counter()
    feats, ppath = make_archive(work, n_slides, seed)
    clean_path = work / "clean.lmdb"
    assert run(embed_cmd(feats, ppath, clean_path)) == 0, "the clean run failed"
    clean = contents(clean_path)
    rng = np.random.default_rng(seed)
    out = work / "soaked.lmdb"
    with reader(out) as seen:
        kills = soak_rounds(feats, ppath, out, rounds, "local", workers, rng, max_wait)
        kills += soak_rounds(feats, ppath, out, ray_rounds, "ray", workers, rng, max_wait)
        final = run(embed_cmd(feats, ppath, out, "--workers", str(workers)))
    result = {"slides": n_slides, "rounds": rounds, "ray_rounds": ray_rounds, "kills": kills,
              "final_exit": final, "equal_to_clean": contents(out) == clean, "reader": seen}
    result["full_disk_run"] = full_disk_run(feats, ppath, clean, disk_size)
    result["full_disk_merge"] = full_disk_merge(feats, ppath, work, clean, disk_size)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["problems"] = problems(result)
    return result


def problems(res: dict) -> list[str]:
    """Every check the soak makes, as a list of what failed (empty: all passed)."""
    bad = []
    for i, k in enumerate(res["kills"]):
        # SIGTERM: the run finishes the slides in flight and exits 3 (0 if it was done anyway); a
        # slide failing because of the kill (exit 1) or the run dying of it (-15) is a bug
        # (-15 only once every slide was stored: the signal came after the run, as it exited)
        expected = {0, 3} if k["signal"] == "SIGTERM" else {0, -signal.SIGKILL}
        if k["stored_after"] == res["slides"]:
            expected.add(-signal.SIGTERM)
        if k["exit"] not in expected:
            bad.append(f"kill round {i}: {k['signal']} gave exit code {k['exit']}")
        if k["damage"]:
            bad.append(f"kill round {i}: store damaged {k['damage']}")
        if k.get("ray_daemons_left"):
            bad.append(f"kill round {i}: {k['ray_daemons_left']} Ray daemons outlived the killed run")
    for name, r in [("soak", res), ("full disk mid-run", res["full_disk_run"]),
                    ("full disk mid-merge", res["full_disk_merge"])]:
        if not r["equal_to_clean"]:
            bad.append(f"{name}: the store differs from the clean run")
        seen = r["reader"]
        if seen.get("reader_failed") is not None:
            bad.append(f"{name}: the reader process failed (exit {seen['reader_failed']})")
        if seen.get("torn"):
            bad.append(f"{name}: the reader saw torn records {sorted(seen['torn'])[:5]}")
        if seen.get("stored_twice"):
            bad.append(f"{name}: slides stored twice {seen['stored_twice'][:5]}")
    if res["final_exit"] != 0:
        bad.append(f"the finishing run exited {res['final_exit']}")
    for name in ("full_disk_run", "full_disk_merge"):
        r = res[name]
        if r["first_exit"] == 0:
            bad.append(f"{name}: the disk never filled (raise --slides or lower --disk-kib)")
        if r["second_exit"] != 0:
            bad.append(f"{name}: the rerun with room exited {r['second_exit']}")
        if r.get("damage_when_full"):
            bad.append(f"{name}: the store was damaged when the disk filled {r['damage_when_full']}")
    return bad


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--reader"]:  # the reader process (see `reader`)
        read_forever(Path(argv[1]), Path(argv[2]), Path(argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slides", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=12, help="kill rounds with the local pool")
    ap.add_argument("--ray-rounds", type=int, default=4, help="kill rounds with Ray (0: none)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-wait", type=float, default=4.0, help="longest a round runs before its kill (s)")
    ap.add_argument("--disk-kib", type=int, default=2048, help="size of the small disk that fills")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        res = soak(a.slides, a.rounds, a.ray_rounds, a.workers, a.seed, a.max_wait, a.disk_kib << 10, Path(tmp))
    signals = [k["signal"] for k in res["kills"]]
    print(f"\nsoak: {a.slides} slides, {len(signals)} kills ({signals.count('SIGKILL')} SIGKILL, "
          f"{signals.count('SIGTERM')} SIGTERM; {a.ray_rounds} with Ray), reader scans {res['reader']['scans']}, "
          f"records seen {res['reader']['records_seen']}, {res['seconds']} s")
    for name in ("full_disk_run", "full_disk_merge"):
        r = res[name]
        print(f"{name}: {r['disk']} {r['size'] >> 10} KiB: exit {r['first_exit']} with {r['stored_when_full']} "
              f"stored, rerun with room exit {r['second_exit']}, equal to clean: {r['equal_to_clean']}")
    print("result: " + ("every check passed" if not res["problems"] else "FAILED\n  " + "\n  ".join(res["problems"])))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    sys.exit(1 if res["problems"] else 0)


if __name__ == "__main__":
    main()
