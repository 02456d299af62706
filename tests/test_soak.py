"""A short kill-and-read soak (issue 14; `python -m proalign.bench.soak` is the long one): the
whole process group killed mid-run with SIGKILL and SIGTERM, the local pool and Ray, a reader
checking every record all along, a full disk mid-run and mid-merge; the store ends equal to a
clean run bit for bit."""
import json

import pytest

from proalign.bench import soak


@pytest.mark.slow
@pytest.mark.optional
def test_short_soak(tmp_path, capsys):
    pytest.importorskip("ray")
    with pytest.raises(SystemExit) as end:
        # seed 2: the local pool killed with SIGKILL then SIGTERM, the Ray run with SIGTERM (the
        # writer's own kill-and-resume, one signal at a time: test_archive.py)
        soak.main(["--slides", "240", "--rounds", "2", "--ray-rounds", "1", "--max-wait", "0.5",
                   "--disk-kib", "160", "--seed", "2", "--json", str(tmp_path / "soak.json")])
    res = json.loads((tmp_path / "soak.json").read_text())
    assert res["problems"] == [] and end.value.code == 0, res["problems"]
    assert len(res["kills"]) == 3 and res["equal_to_clean"]
    assert [k["signal"] for k in res["kills"]] == ["SIGKILL", "SIGTERM", "SIGTERM"], res["kills"]
    # the kills landed mid-run and the reader really read (a soak that saw nothing checks nothing)
    assert any(0 < k["stored_after"] < 240 for k in res["kills"]), res["kills"]
    assert res["reader"]["records_seen"] == 240 and res["reader"]["scans"] > 10
    for name in ("full_disk_run", "full_disk_merge"):
        r = res[name]
        assert r["first_exit"] == 3 and r["second_exit"] == 0 and r["equal_to_clean"], r
    assert 0 < res["full_disk_run"]["stored_when_full"] < 240
