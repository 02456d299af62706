import importlib
import logging
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter (must be set before triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


def optional_import(name: str, why: str = ""):
    """Import an optional package for a test, or skip the test saying why it does not import.

    Any exception counts, not only ImportError: beside the local CPU torch wheel, torchvision (which
    timm, open_clip and conch import) raises RuntimeError ('operator torchvision::nms does not
    exist'). Packages named in $PROALIGN_REQUIRE_OFFICIAL (comma-separated; `make parity` sets it
    for the official packages it installs) fail the test instead: there they must import."""
    try:
        return importlib.import_module(name)
    except Exception as e:  # noqa: BLE001
        first = (str(e).strip().splitlines() or [""])[0]
        msg = f"{name} does not import here ({type(e).__name__}: {first})" + (f"; {why}" if why else "")
        required = {n.strip() for n in os.environ.get("PROALIGN_REQUIRE_OFFICIAL", "").split(",") if n.strip()}
        if name in required or name.split(".")[0] in required:
            pytest.fail(f"{msg}; PROALIGN_REQUIRE_OFFICIAL says it must", pytrace=False)
        pytest.skip(msg)


@pytest.fixture
def rng(request):
    """Fresh random inputs every run; the seed is printed on failure so it can be replayed."""
    seed = int(os.environ.get("PROALIGN_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
    print(f"random seed for {request.node.name}: {seed} (replay with PROALIGN_TEST_SEED={seed})")
    return np.random.default_rng(seed)


class _LiveStderrHandler(logging.StreamHandler):
    """A log handler writing to whatever sys.stderr is when a record comes (CliRunner swaps it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def run_cli(*args, check=None, timeout=300, env=None, process=False):
    """Run `proalign-engine ARGS`; returns an object with returncode, stdout and stderr.

    By default in this process with click's CliRunner (the command's own code, without an
    interpreter start per call: about 2-3 s less each): stdout and stderr apart, the log lines on
    stderr as `main` sets them up, an uncaught exception's traceback appended to stderr with exit 1,
    as the console script would end. `process=True` runs the installed console script in a
    subprocess instead: the end-to-end runs, and whatever needs its own process (signals, ulimit,
    the interpreter's exit). PROALIGN_TEST_CLI=process runs every call in a subprocess."""
    args = [str(a) for a in args]
    if process or os.environ.get("PROALIGN_TEST_CLI") == "process":
        exe = Path(sys.executable).parent / "proalign-engine"
        p = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **(env or {})})
    else:
        from click.testing import CliRunner

        from proalign.cli import main

        root = logging.getLogger()
        level, handlers, threads = root.level, list(root.handlers), torch.get_num_threads()
        handler = _LiveStderrHandler()  # what main's logging.basicConfig(stream=sys.stderr) sets up alone
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.DEBUG if {"-v", "--verbose"} & set(args) else logging.INFO)
        try:
            res = CliRunner(env=env).invoke(main, args, prog_name="proalign-engine")
        finally:
            for h in root.handlers[:]:
                if h not in handlers:
                    root.removeHandler(h)
            root.setLevel(level)
            torch.set_num_threads(threads)
        stderr = res.stderr
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            stderr += "Traceback (most recent call last):\n" + "".join(traceback.format_exception(res.exception))
        p = subprocess.CompletedProcess(["proalign-engine", *args], res.exit_code, res.stdout, stderr)
    if check is not None:
        assert p.returncode == check, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="module")
def conch(tmp_path_factory):
    """A small random-weight CONCH v1 folder (it records its architecture), 5 prototypes for it, the
    --encoder-arg flags that restate that architecture, and the overrides: (folder, args, prototypes, over)."""
    from proalign.prototypes.io import save_prototypes
    from proalign.testing.random_weights import write_random_conch

    root = tmp_path_factory.mktemp("conch")
    over = write_random_conch(root / "conch")
    c = np.random.default_rng(3).standard_normal((5, over["embed_dim"])).astype(np.float32)
    save_prototypes(root / "p.safetensors", c, {})
    args = [a for k, v in over.items() for a in ("--encoder-arg", f"{k}={v}")]
    return root / "conch", args, root / "p.safetensors", over


# -- tests that need a GPU or an optional package: marked, and counted at the end of the run ----------
# `-m gpu` selects the GPU tests, `-m optional` those needing an optional package (ray, openslide,
# nvidia-dali, timm, open_clip, conch, sklearn...), `-m "not gpu and not optional"` the core suite.
# A test skipped for a reason that names a GPU (or a package that does not import) counts as such
# even when unmarked; a skipif naming CUDA/GPU/nvcc marks its test `gpu` at collection.
_GPU_REASON = re.compile(r"\bcuda\b|\bgpu\b|nvcc|no CUDA", re.I)
_PACKAGE_REASON = re.compile(r"not installed|does not import|could not import|no module named", re.I)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU or the CUDA toolkit (skips without)")
    config.addinivalue_line("markers", "optional: needs an optional package (skips without it)")
    config.addinivalue_line("markers", "slow: an end-to-end run of many seconds (soak, Ray, signals and kills, "
                                       "two writers, slide timeouts, the quality suite, the demo, report rendering, "
                                       "whole-archive mpp runs): `make test-slow`, run by CI after `make test`")


def pytest_collection_modifyitems(config, items):
    for item in items:
        for m in item.iter_markers("skipif"):
            if _GPU_REASON.search(str(m.kwargs.get("reason", ""))):
                item.add_marker(pytest.mark.gpu)
                break


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    rep.needs = [n for n in ("gpu", "optional") if item.get_closest_marker(n)]


def _skip_reason(rep) -> str:
    lr = rep.longrepr
    why = str(lr[2]) if isinstance(lr, tuple) and len(lr) == 3 else str(lr or "")
    return why.removeprefix("Skipped: ")


def pytest_terminal_summary(terminalreporter):
    counts = {"gpu": {"ran": 0, "skipped": 0}, "optional": {"ran": 0, "skipped": 0}}
    missing: set[str] = set()
    for key in ("passed", "failed", "skipped", "error"):
        for rep in terminalreporter.stats.get(key, []):
            if not hasattr(rep, "when") or (key in ("passed", "failed") and rep.when != "call"):
                continue
            needs = list(getattr(rep, "needs", []))
            if key == "skipped":
                why = _skip_reason(rep)
                if not needs:
                    needs = (["gpu"] if _GPU_REASON.search(why) else []) or (
                        ["optional"] if _PACKAGE_REASON.search(why) else [])
                if "optional" in needs or _PACKAGE_REASON.search(why):
                    name = (re.search(r"could not import '([^']+)'", why)
                            or re.match(r"\s*([\w.\-]+?)(?: is)? (?:not installed|does not import)", why))
                    missing.add(name.group(1) if name else why[:40])
            for n in needs:
                counts[n]["ran" if key in ("passed", "failed", "error") else "skipped"] += 1
    if any(c["ran"] or c["skipped"] for c in counts.values()):
        tr = terminalreporter
        tr.write_sep("-", "tests that need a GPU or an optional package")
        tr.write_line(f"GPU (-m gpu): {counts['gpu']['ran']} ran, {counts['gpu']['skipped']} skipped"
                      + ("" if torch.cuda.is_available() else " (no CUDA GPU here)"))
        tr.write_line(f"optional packages (-m optional): {counts['optional']['ran']} ran, "
                      f"{counts['optional']['skipped']} skipped"
                      + (f" (not importable here: {', '.join(sorted(missing))})" if missing else ""))
        tr.write_line("see README, Tests: what to install to run them")
