"""Description sets (METHOD.md Step 1), `describe` against a real local HTTP server, and text
prototypes (Step 2) with a small randomly initialised text transformer."""
from __future__ import annotations

import copy
import json
import re
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from proalign.cli import main
from proalign.prototypes.descriptions import (DescriptionError, description_set_hash, list_description_sets,
                                              load_descriptions, save_descriptions, schema, validate,
                                              validation_errors)
from proalign.prototypes.descriptions.llm import chat_url, parse_reply
from proalign.prototypes.io import read_prototype_file
from proalign.prototypes.text import text_prototypes

REQUIRED_SETS = {"lung", "breast", "kidney", "colorectal", "prostate", "brain", "pan-cancer"}


def tiny_set(k: int = 3, m: int = 2, tag: str = "") -> dict:
    return {"schema_version": 1, "name": "tiny", "cohort": "test cohort", "organ": "test organ", "version": "1",
            "k": k, "m": m,
            "types": [{"name": f"type {i}{tag}",
                       "descriptions": [f"Sheets of cells of kind {i} seen in view {j}{tag} under the microscope."
                                        for j in range(m)]} for i in range(k)],
            "generator": {"model": "hand", "prompt": "", "date": "2026-01-01", "method": "curated"}}


# --- shipped sets ----------------------------------------------------------------------------------

def test_shipped_sets_validate_and_have_k16_m8():
    names = list_description_sets()
    assert REQUIRED_SETS <= set(names), names
    hashes = set()
    for name in names:
        ds = load_descriptions(name)
        validate(ds.to_dict(), source=name)
        assert (ds.k, ds.m, len(ds.types)) == (16, 8, 16), name
        assert ds.name == name and ds.generator["method"] == "curated"
        assert all(len(t.descriptions) == 8 for t in ds.types), name
        type_names = [t.name.lower() for t in ds.types]
        assert len(set(type_names)) == 16, f"{name}: duplicate type names"
        sentences = [re.sub(r"\s+", " ", s.lower()).strip() for s in ds.sentences]
        assert len(set(sentences)) == 128, f"{name}: duplicate sentences"
        for s in ds.sentences:  # one sentence each, a full stop at the end, none inside
            assert s.endswith(".") and not re.search(r"[.!?]\s", s), f"{name}: {s!r}"
            assert 6 <= len(s.split()) <= 45, f"{name}: {s!r}"
        hashes.add(ds.hash)
    assert len(hashes) == len(names)


def test_schema_file_is_the_contract():
    sch = schema()
    assert sch["properties"]["generator"]["properties"]["method"]["enum"] == ["curated", "llm"]
    assert set(sch["required"]) == {"schema_version", "name", "cohort", "organ", "version", "k", "m", "types",
                                    "generator"}
    assert validation_errors(tiny_set()) == []


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.pop("k"), "k: required"),
    (lambda d: d.update(schema_version=2), "schema_version"),
    (lambda d: d.update(name="Bad Name!"), "name"),
    (lambda d: d["types"][2]["descriptions"].__setitem__(1, 5), "types[2].descriptions[1]"),
    (lambda d: d["types"][1]["descriptions"].append("One more sentence that breaks the count of m."),
     "types[1].descriptions: has 3 sentences, but m is 2"),
    (lambda d: d["types"].pop(), "types: has 2 types, but k is 3"),
    (lambda d: d["types"][2].update(name="Type 0"), "types[2].name"),
    (lambda d: d["types"][1]["descriptions"].__setitem__(0, d["types"][0]["descriptions"][1].upper()),
     "types[1].descriptions[0]: repeats types[0].descriptions[1]"),
    (lambda d: d["generator"].update(method="magic"), "generator.method"),
    (lambda d: d["generator"].pop("model"), "generator.model: required"),
    (lambda d: d.update(extra=1), "extra: unknown field"),
    (lambda d: d["types"][0].update(descriptions="not a list"), "types[0].descriptions: must be array"),
    (lambda d: d.update(k=True), "k: must be integer"),
    (lambda d: d["types"][0]["descriptions"].__setitem__(0, "short"), "types[0].descriptions[0]"),
])
def test_schema_errors_name_the_field(mutate, field):
    d = tiny_set()
    mutate(d)
    errors = validation_errors(d)
    assert any(field in e for e in errors), errors
    with pytest.raises(DescriptionError) as ei:
        validate(d, source="mine.json")
    assert str(ei.value).startswith("mine.json: ") and field in str(ei.value)


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    d = tiny_set()
    d["types"][1]["name"] = ""
    bad.write_text(json.dumps(d))
    with pytest.raises(DescriptionError, match=r"bad\.json: types\[1\]\.name"):
        load_descriptions(bad)
    broken = tmp_path / "broken.json"
    broken.write_text('{"schema_version": 1,\n "name": }')
    with pytest.raises(DescriptionError, match=r"broken\.json: not valid JSON \(line 2"):
        load_descriptions(broken)
    with pytest.raises(DescriptionError, match="not a shipped description set"):
        load_descriptions("no-such-set")
    good = save_descriptions(tiny_set(), tmp_path / "sub" / "good.json")
    assert load_descriptions(good).type_names == ["type 0", "type 1", "type 2"]


def test_hash_stable_and_sensitive(tmp_path):
    d = tiny_set()
    h = description_set_hash(d)
    assert h == "5f8101926e3f2917"  # pinned: a change of the hashing breaks every cache and provenance record
    # Key order, formatting, metadata and the loading route do not change it.
    p = tmp_path / "t.json"
    p.write_text(json.dumps(dict(reversed(list(d.items()))), indent=4))
    meta = copy.deepcopy(d)
    meta["generator"].update(date="2030-12-31", model="other")
    meta.update(version="9", cohort="other words")
    assert description_set_hash(p) == description_set_hash(load_descriptions(p)) == description_set_hash(meta) == h
    # Any change of content or order does.
    variants = []
    v = copy.deepcopy(d); v["types"][1]["descriptions"][0] = v["types"][1]["descriptions"][0].replace("kind", "kinds")
    variants.append(v)
    v = copy.deepcopy(d); v["types"][0], v["types"][1] = v["types"][1], v["types"][0]
    variants.append(v)
    v = copy.deepcopy(d); v["types"][2]["descriptions"].reverse()
    variants.append(v)
    v = copy.deepcopy(d); v["types"][2]["name"] = "type two"
    variants.append(v)
    assert len({h, *(description_set_hash(x) for x in variants)}) == 5
    assert description_set_hash("lung") == load_descriptions("lung").hash != description_set_hash("brain")


# --- describe against a real HTTP server -----------------------------------------------------------

class FakeLLM:
    """A real HTTP server on 127.0.0.1 that answers scripted replies and records every request."""

    def __init__(self):
        self.script: list = []  # each: (status, body) or ("sleep", seconds, then)
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "body": body, "headers": dict(self.headers)})
                step = outer.script.pop(0) if len(outer.script) > 1 else outer.script[0]
                if callable(step):
                    step = step(body)
                if step[0] == "sleep":
                    threading.Event().wait(step[1])
                    step = step[2]
                status, payload = step
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def llm():
    server = FakeLLM()
    yield server
    server.close()


def chat(content: str, finish: str = "stop") -> tuple[int, dict]:
    return 200, {"id": "x", "model": "served-model", "choices": [{"index": 0, "finish_reason": finish,
                                                                   "message": {"role": "assistant", "content": content}}]}


def reply_types(k: int = 4, m: int = 3) -> dict:
    return {"organ": "lung", "types": [{"name": f"pattern {i}", "descriptions": [
        f"Tumor cells of pattern {i} form structure number {j} in a fibrous stroma." for j in range(m)]}
        for i in range(k)]}


def describe(llm: FakeLLM, *extra: str, k: int = 4, m: int = 3, env: dict | None = None):
    args = ["describe", "--cohort", "TCGA lung test", "--endpoint", llm.url, "--model", "tiny-llm", "--k", k, "--m", m,
            "--backoff", "0.01", *extra]
    return CliRunner().invoke(main, [str(a) for a in args], env=env or {})


def test_describe_valid_reply_end_to_end(llm, tmp_path, cli):
    """The installed console script against the server: body, headers, generator record, output."""
    llm.script = [chat(json.dumps(reply_types()))]
    out = tmp_path / "set.json"
    p = cli("describe", "--cohort", "TCGA lung test", "--endpoint", llm.url + "/", "--model", "tiny-llm", "--k", 4,
            "--m", 3, "--seed", 7, "--api-key-env", "MY_TEST_KEY", "--out", out, check=0, timeout=60,
            env={"MY_TEST_KEY": "sekret-123"})
    assert "wrote" in p.stderr
    assert len(llm.requests) == 1
    req = llm.requests[0]
    assert req["path"] == "/v1/chat/completions"
    body = req["body"]
    assert body["model"] == "tiny-llm" and body["temperature"] == 0 and body["seed"] == 7
    assert body["response_format"] == {"type": "json_object"}
    assert body["messages"][0]["role"] == "system" and "exactly 4" in body["messages"][1]["content"]
    assert req["headers"]["Authorization"] == "Bearer sekret-123"
    ds = load_descriptions(out)
    assert (ds.k, ds.m, ds.organ) == (4, 3, "lung") and ds.type_names[0] == "pattern 0"
    g = ds.generator
    assert g["method"] == "llm" and g["model"] == "tiny-llm" and g["endpoint"] == llm.url + "/chat/completions"
    assert g["settings"]["seed"] == 7 and g["settings"]["temperature"] == 0 and g["attempts"] == 1
    assert g["prompt"] == body["messages"][1]["content"] and re.match(r"\d{4}-\d\d-\d\dT", g["date"])
    assert "sekret" not in out.read_text()


def test_describe_fenced_reply_to_stdout(llm):
    # Braces outside the fence too: only taking the fenced block parses this.
    text = "Here is {the set}:\n```json\n" + json.dumps(reply_types(), indent=1) + "\n```\nAll {4} types."
    llm.script = [chat(text)]
    r = describe(llm)
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    validate(data)
    assert len(llm.requests) == 1 and data["types"][3]["name"] == "pattern 3"


def test_parse_reply_tolerates_wrappers():
    obj = {"types": []}
    for text in [json.dumps(obj), "```\n" + json.dumps(obj) + "\n```", "<think>hmm {</think>" + json.dumps(obj),
                 "Sure! " + json.dumps(obj) + " Hope it helps."]:
        assert parse_reply(text) == obj
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_reply("no json here")
    assert chat_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_url("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"


def test_describe_invalid_json_then_valid_sends_correction(llm):
    llm.script = [chat('{"types": [{"name": "pattern 0", "descriptions": ['), chat(json.dumps(reply_types()))]
    r = describe(llm)
    assert r.exit_code == 0, r.output
    assert len(llm.requests) == 2
    second = llm.requests[1]["body"]["messages"]
    assert second[-2] == {"role": "assistant", "content": '{"types": [{"name": "pattern 0", "descriptions": ['}
    assert second[-1]["role"] == "user" and "not valid JSON" in second[-1]["content"]
    assert json.loads(r.stdout)["generator"]["attempts"] == 2


def test_describe_schema_invalid_then_valid_names_field(llm):
    bad = reply_types()
    bad["types"][2]["descriptions"].pop()
    llm.script = [chat(json.dumps(bad)), chat(json.dumps(reply_types()))]
    r = describe(llm)
    assert r.exit_code == 0, r.output
    correction = llm.requests[1]["body"]["messages"][-1]["content"]
    assert "types[2].descriptions: has 2 sentences, but m is 3" in correction


def test_describe_500_then_valid(llm, caplog):
    llm.script = [(500, {"error": {"message": "overloaded"}}), chat(json.dumps(reply_types()))]
    r = describe(llm)
    assert r.exit_code == 0, r.output
    assert len(llm.requests) == 2
    assert llm.requests[1]["body"]["messages"] == llm.requests[0]["body"]["messages"]  # a plain resend
    assert "HTTP 500 (Internal Server Error: overloaded); retrying" in caplog.text


def test_describe_timeout_then_valid(llm, caplog):
    llm.script = [("sleep", 1.5, chat(json.dumps(reply_types()))), chat(json.dumps(reply_types()))]
    r = describe(llm, "--timeout", "0.3")
    assert r.exit_code == 0, r.output
    assert len(llm.requests) == 2 and "no answer within 0.3 s" in caplog.text


def test_describe_json_mode_rejected_falls_back(llm):
    def answer(body):
        if "response_format" in body:
            return 400, {"error": {"message": "response_format is not supported"}}
        return chat(json.dumps(reply_types()))
    llm.script = [answer]
    r = describe(llm, "--retries", "0")
    assert r.exit_code == 0, r.output
    assert ["response_format" in q["body"] for q in llm.requests] == [True, False]
    assert json.loads(r.stdout)["generator"]["settings"]["json_mode"] is False


def test_describe_always_invalid_exits_2(llm, tmp_path):
    llm.script = [chat("I cannot do that.")]
    out = tmp_path / "never.json"
    r = describe(llm, "--retries", "2", "--out", str(out))
    assert r.exit_code == 2
    assert "no valid description set after 3 attempt(s)" in r.stderr and "not valid JSON" in r.stderr
    assert len(llm.requests) == 3 and not out.exists()


def test_describe_401_exits_2_without_retry(llm, cli):
    llm.script = [(401, {"error": {"message": "invalid api key"}})]
    p = cli("describe", "--cohort", "x", "--endpoint", llm.url, "--model", "m", "--backoff", 0, timeout=60)
    assert p.returncode == 2, p.stderr
    assert "HTTP 401" in p.stderr and "invalid api key" in p.stderr and "--api-key-env" in p.stderr
    assert "Traceback" not in p.stderr and len(llm.requests) == 1


def test_describe_unreachable_and_bad_options_exit_2():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = CliRunner().invoke(main, ["describe", "--cohort", "x", "--endpoint", f"http://127.0.0.1:{port}/v1",
                                  "--model", "m", "--retries", "1", "--backoff", "0"])
    assert r.exit_code == 2 and "cannot reach the endpoint" in r.stderr and "2 attempt(s)" in r.stderr
    assert "is the server running?" in r.stderr
    r = CliRunner().invoke(main, ["describe", "--cohort", "x", "--endpoint", "http://127.0.0.1:1/v1", "--model", "m",
                                  "--api-key-env", "PROALIGN_SURELY_UNSET_VAR"], env={"PROALIGN_SURELY_UNSET_VAR": ""})
    assert r.exit_code == 2 and "PROALIGN_SURELY_UNSET_VAR" in r.stderr
    r = CliRunner().invoke(main, ["describe", "--cohort", "x", "--endpoint", "http://127.0.0.1:1/v1", "--model", "m",
                                  "--name", "Bad Name"])
    assert r.exit_code == 2 and "set name 'Bad Name'" in r.stderr
    r = CliRunner().invoke(main, ["describe", "--cohort", "x", "--endpoint", "localhost:8000", "--model", "m"])
    assert r.exit_code == 2 and "not an http(s) URL" in r.stderr


# --- text prototypes with a tiny real text transformer ---------------------------------------------

class TinyTextEncoder(torch.nn.Module):
    """A randomly initialised 2-layer transformer text tower over a hashing word tokenizer."""

    def __init__(self, seed: int, width: int = 32, joint_dim: int = 24, normalize: bool = True,
                 weights_id: str | None = "auto", vocab: int = 4096, max_len: int = 48):
        super().__init__()
        self.name, self.joint_dim, self.normalize, self.vocab, self.max_len = "tiny-text", joint_dim, normalize, vocab, max_len
        if weights_id == "auto":
            self.weights_id = f"tiny-seed{seed}"
        elif weights_id is not None:
            self.weights_id = weights_id
        self.calls = 0
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.tok = torch.nn.Embedding(vocab, width, padding_idx=0)
            self.pos = torch.nn.Parameter(torch.randn(max_len, width) * 0.1)
            layer = torch.nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
            self.tf = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
            self.proj = torch.nn.Linear(width, joint_dim, bias=False)
        self.eval()

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(texts), self.max_len, dtype=torch.long)
        for i, t in enumerate(texts):
            words = re.findall(r"[a-z0-9]+|[^\sa-z0-9]", t.lower())[: self.max_len - 1]
            row = [1] + [2 + zlib.crc32(w.encode()) % (self.vocab - 2) for w in words]
            ids[i, : len(row)] = torch.tensor(row)
        return ids

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = ids == 0
        h = self.tf(self.tok(ids) + self.pos[: ids.shape[1]].to(self.tok.weight.dtype), src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.proj((h * keep).sum(1) / keep.sum(1))

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        self.calls += 1
        with torch.no_grad():
            z = self.forward(self.tokenize(texts))
        return F.normalize(z, dim=-1) if self.normalize else z


def float64_prototypes(enc: TinyTextEncoder, ds) -> torch.Tensor:
    """t_k recomputed in float64, one sentence at a time (no batching, no padding effects)."""
    enc64 = copy.deepcopy(enc).double()
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 128 tiny forwards: thread hand-offs would cost more than the math
    try:
        with torch.no_grad():
            for t in ds.types:
                e = torch.cat([enc64.forward(enc64.tokenize([d])) for d in t.descriptions])
                e = e / e.norm(dim=1, keepdim=True)
                mean = e.mean(0)
                rows.append(mean / mean.norm())
    finally:
        torch.set_num_threads(threads)
    return torch.stack(rows)


@pytest.mark.parametrize("normalize", [True, False])
def test_text_prototypes_math(normalize):
    ds = load_descriptions("lung")
    enc = TinyTextEncoder(seed=3, normalize=normalize)
    t = text_prototypes(enc, ds, batch_size=50)  # 128 sentences in 3 uneven batches
    assert t.shape == (16, 24) and t.dtype == torch.float32
    assert torch.allclose(t.norm(dim=1), torch.ones(16), atol=1e-6)
    ref = float64_prototypes(enc, ds)
    assert torch.allclose(t.double(), ref, atol=2e-5), (t.double() - ref).abs().max()
    # Prompt ensembling is not "first sentence only" nor "mean without per-sentence normalisation".
    raw = torch.cat([enc.forward(enc.tokenize(d)).detach() for d in [ty.descriptions for ty in ds.types]]).double()
    first = F.normalize(raw.reshape(16, 8, -1)[:, 0], dim=-1)
    assert (t.double() - first).abs().max() > 1e-2
    if not normalize:
        unnorm = F.normalize(raw.reshape(16, 8, -1).mean(1), dim=-1)
        assert (t.double() - unnorm).abs().max() > 1e-4


def test_text_prototypes_cache_hit_and_invalidation(tmp_path):
    d = tiny_set(k=4, m=3)
    enc = TinyTextEncoder(seed=1)
    t1 = text_prototypes(enc, d, cache_dir=tmp_path)
    assert enc.calls == 1 and len(list(tmp_path.glob("*.safetensors"))) == 1
    # Same weights, same set: read from disk, encoder not called.
    enc_again = TinyTextEncoder(seed=1)
    t2 = text_prototypes(enc_again, load_descriptions(d), cache_dir=tmp_path)
    assert enc_again.calls == 0 and torch.equal(t1, t2)
    # The cache file is a prototype file `prototypes build --text-prototypes` reads.
    (path,) = tmp_path.glob("*.safetensors")
    c, meta = read_prototype_file(path)
    assert c.shape == (4, 24) and meta["description_set_hash"] == description_set_hash(d)
    assert meta["encoder"] == "tiny-text" and meta["weights"] == "weights_id:tiny-seed1"
    # One sentence changed: recomputed; only that type's prototype moves.
    d2 = copy.deepcopy(d)
    d2["types"][2]["descriptions"][1] = "Completely different words about necrotic debris and fibrin."
    t3 = text_prototypes(enc_again, d2, cache_dir=tmp_path)
    assert enc_again.calls == 1
    changed = (t3 - t1).abs().amax(dim=1) > 1e-6
    assert changed.tolist() == [False, False, True, False]
    # Other weights (another weights_id): recomputed.
    enc_other = TinyTextEncoder(seed=2)
    t4 = text_prototypes(enc_other, d, cache_dir=tmp_path)
    assert enc_other.calls == 1 and not torch.allclose(t4, t1)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3


def test_text_prototypes_cache_without_weights_id_and_damaged_file(tmp_path):
    d = tiny_set(k=3, m=2)
    a = TinyTextEncoder(seed=5, weights_id=None)
    ta = text_prototypes(a, d, cache_dir=tmp_path)
    b = TinyTextEncoder(seed=5, weights_id=None)  # same weights: state-dict identity matches
    assert torch.equal(text_prototypes(b, d, cache_dir=tmp_path), ta) and b.calls == 0
    c = TinyTextEncoder(seed=6, weights_id=None)  # other weights, same name: no false hit
    tc = text_prototypes(c, d, cache_dir=tmp_path)
    assert c.calls == 1 and not torch.allclose(tc, ta)
    for f in tmp_path.glob("*.safetensors"):
        f.write_bytes(b"garbage")
    e = TinyTextEncoder(seed=5, weights_id=None)
    assert torch.allclose(text_prototypes(e, d, cache_dir=tmp_path), ta) and e.calls == 1
    assert torch.equal(text_prototypes(TinyTextEncoder(seed=5, weights_id=None), d, cache_dir=tmp_path),
                       text_prototypes(e, d, cache_dir=tmp_path))


def test_text_prototypes_cache_for_a_wrapped_backbone(tmp_path):
    """An encoder object that is not an nn.Module but holds one as `backbone` (proalign.encoders)."""
    class Wrapper:
        def __init__(self, seed):
            self.backbone, self.name, self.joint_dim, self.weights_id = TinyTextEncoder(seed, weights_id=None), "w", 24, None

        def encode_text(self, texts):
            return self.backbone.encode_text(texts)

    d = tiny_set()
    a, b, c = Wrapper(1), Wrapper(1), Wrapper(2)
    ta = text_prototypes(a, d, cache_dir=tmp_path)
    assert torch.equal(text_prototypes(b, d, cache_dir=tmp_path), ta) and b.backbone.calls == 0
    assert not torch.allclose(text_prototypes(c, d, cache_dir=tmp_path), ta) and c.backbone.calls == 1


def test_text_prototypes_checks_encoder_output():
    class WrongDim(TinyTextEncoder):
        def encode_text(self, texts):
            return super().encode_text(texts)[:, :10]

    with pytest.raises(Exception, match="joint_dim"):
        text_prototypes(WrongDim(seed=0), tiny_set())
