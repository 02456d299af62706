"""The scheduler's executors (in-process, local pool, Ray) all have the calls of the Executor
Protocol with its parameters: a new executor that drifts from the contract fails here, not mid-run."""
import inspect

import pytest

from proalign.pipeline.executors import Executor, InlineExecutor, ProcessExecutor
from proalign.pipeline.ray_executor import RayExecutor


@pytest.mark.parametrize("cls", [InlineExecutor, ProcessExecutor, RayExecutor])
def test_executor_has_the_protocol_calls(cls):
    assert isinstance(cls.name, str) and cls.name
    for call in ("submit", "wait", "close"):
        want = list(inspect.signature(getattr(Executor, call)).parameters)
        got = list(inspect.signature(getattr(cls, call)).parameters)
        assert got == want, (cls.__name__, call, got, want)
    assert "self.slots" in inspect.getsource(cls.__init__)  # every executor sets its slot count


def test_worker_specs_implement_the_protocol():
    """Both worker specs (feature files, slide files) are WorkerSpec instances (runtime check of
    the protocol's calls and fields) with the same call signatures, and survive pickling."""
    import dataclasses
    import pickle

    import numpy as np

    from proalign.pipeline.slide_worker import SlideEncoding, SlideFileSpec
    from proalign.pipeline.worker import FeatureFileSpec, WorkerSpec

    c = np.ones((2, 4), dtype=np.float32)
    specs = [FeatureFileSpec(c, "p.npy"), SlideFileSpec(c, "p.npy", SlideEncoding("vit_tiny", "w.pt"))]
    for spec in specs:
        assert isinstance(spec, WorkerSpec), type(spec).__name__
        for call in ("build", "record_key", "describe"):
            assert list(inspect.signature(getattr(type(spec), call)).parameters) == ["self"], call
        assert {"threads", "shard"} <= {f.name for f in dataclasses.fields(spec)}
        assert pickle.loads(pickle.dumps(spec)).shard is None
    assert not isinstance(object(), WorkerSpec)
