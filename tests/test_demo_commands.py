"""The demo's random-weight model folder records its configuration, so `--weights` on it works with
no --encoder-arg; the demo ends with commands a newcomer can run next, and they work (issue 16
item 7)."""
from __future__ import annotations

import json
import shlex

import numpy as np
import pytest

from conftest import run_cli

from proalign.encoders import EncoderError, create_encoder
from proalign.encoders.base import ENCODER_CONFIG_FILE, CheckpointMismatchError
from proalign.testing.random_weights import TINY_CONCH, write_random_conch


@pytest.mark.slow
def test_demo_prints_next_commands_that_work(tmp_path, capsys):
    """The demo's smallest slides run (one generated slide, four feature files), then each printed
    command through the CLI; plus embed --archive on the demo's model folder without --encoder-arg."""
    from proalign.demo import main

    out = tmp_path / "demo"
    assert main(["--out", str(out), "--slides", "4", "--slide-files", "1"]) == 0
    text = capsys.readouterr().out
    assert (out / "conch_v1_random" / ENCODER_CONFIG_FILE).is_file()
    cmds = [line.strip() for line in text.split("next, on these outputs")[1].splitlines()[1:] if line.strip()]
    assert 2 <= len(cmds) <= 3 and all(c.startswith("proalign-engine ") for c in cmds), text
    assert any(" heatmap " in c and "--encoder-arg" not in c for c in cmds)
    for c in cmds:  # end to end: the installed console script, each command in its own process
        r = run_cli(*shlex.split(c)[1:], process=True)
        assert r.returncode == 0, f"{c}\n{r.stdout}\n{r.stderr}"
    assert (out / "DEMO-00_heatmap.png").stat().st_size > 0
    r = run_cli("embed", "--archive", out / "slides", "--encoder", "conch_v1", "--weights", out / "conch_v1_random",
                "--prototypes", out / "prototypes_lung_text.safetensors", "--patch-size", "128",
                "--out", tmp_path / "again.lmdb", "--no-progress")
    assert r.returncode == 0 and "1 embedded" in r.stdout, r.stderr


def test_features_only_demo_commands(tmp_path, capsys):
    from proalign.demo import main

    out = tmp_path / "demo"
    assert main(["--out", str(out), "--slides", "3", "--slide-files", "0"]) == 0
    cmds = [line.strip() for line in capsys.readouterr().out.split("next, on these outputs")[1].splitlines()[1:]
            if line.strip()]
    assert len(cmds) == 2
    for c in cmds:
        assert run_cli(*shlex.split(c)[1:]).returncode == 0, c


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("w") / "conch"
    write_random_conch(folder)
    return folder


def test_recorded_config_loads_and_explicit_arguments_win(tiny):
    doc = json.loads((tiny / ENCODER_CONFIG_FILE).read_text())
    assert doc["encoder"] == "conch_v1" and doc["config"]["layers"] == TINY_CONCH["layers"]
    enc = create_encoder("conch_v1", tiny)  # no overrides given: read from the folder
    assert enc.feature_dim == TINY_CONCH["embed_dim"] and enc.input_size == TINY_CONCH["image_size"]
    enc2 = create_encoder("conch_v1", tiny / "pytorch_model.bin")  # the file: its folder's config
    assert enc2.feature_dim == enc.feature_dim
    x = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    import torch

    px = torch.from_numpy(x)
    assert torch.equal(enc.encode_image(enc.preprocess(px)), enc2.encode_image(enc2.preprocess(px)))
    # an explicit argument wins over the file (here a wrong one, so the load fails naming the file)
    with pytest.raises(CheckpointMismatchError, match=ENCODER_CONFIG_FILE):
        create_encoder("conch_v1", tiny, layers=3)
    # the CLI: --encoder-arg wins too
    r = run_cli("prototypes", "build", "--features", tiny.parent, "--encoder", "conch_v1", "--weights", tiny,
                "--encoder-arg", "layers=3", "--out", tiny.parent / "p.npz")
    assert r.returncode != 0 and ENCODER_CONFIG_FILE in r.stderr, r.stderr
    assert "given explicitly instead of the file's: layers=3" in r.stderr, r.stderr


def test_config_that_disagrees_with_the_checkpoint_fails_naming_the_file(tiny, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    cfg = bad / ENCODER_CONFIG_FILE
    doc = json.loads(cfg.read_text())
    doc["config"]["width"] = 96  # the checkpoint's tensors are 64 wide
    cfg.write_text(json.dumps(doc))
    with pytest.raises(CheckpointMismatchError) as e:
        create_encoder("conch_v1", bad)
    msg = str(e.value)
    assert str(cfg) in msg and "width=96" in msg and "shapes" in msg
    # the CLI says the same and names the file
    r = run_cli("prototypes", "build", "--features", tmp_path, "--encoder", "conch_v1", "--weights", bad,
                "--out", tmp_path / "p.npz")
    assert r.returncode != 0 and str(cfg) in r.stderr and "Traceback" not in r.stderr, r.stderr
    # a config for another encoder, and one that does not parse
    doc["encoder"] = "uni_v1"
    cfg.write_text(json.dumps(doc))
    with pytest.raises(EncoderError, match="for encoder 'uni_v1', not 'conch_v1'"):
        create_encoder("conch_v1", bad)
    cfg.write_text("{not json")
    with pytest.raises(EncoderError, match="unreadable encoder config"):
        create_encoder("conch_v1", bad)
