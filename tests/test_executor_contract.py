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
