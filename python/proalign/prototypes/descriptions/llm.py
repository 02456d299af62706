"""A new description set from an LLM through any OpenAI-compatible chat endpoint (vLLM, Ollama,
llama.cpp server, a hosted API). Standard library only (urllib).

One request = `POST {endpoint}/chat/completions` with temperature 0, a fixed seed and JSON mode
(`response_format={"type": "json_object"}`; dropped once if the server rejects it). The reply
may be wrapped in code fences or a reasoning block; it is parsed, assembled into a full set and
validated. Bounded retries:
- HTTP 408/429/5xx, timeouts, refused connections, garbled HTTP bodies: wait `backoff * 2**i`;
- a reply that is not JSON or not a valid set: ask again at once, with the bad reply and a
  correcting message that lists the problems;
- 401/403/404 and other 4xx: stop at once (retrying cannot help).
Every failure ends in DescribeError (the CLI prints it and exits with code 2).
"""
from __future__ import annotations

import datetime as _dt
import http.client
import json
import logging
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable

from . import SCHEMA_VERSION, validation_errors
from ...errors import ProAlignError

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 30.0


class DescribeError(ProAlignError):
    """The LLM endpoint could not produce a valid description set."""


@dataclass
class DescribeSettings:
    endpoint: str
    model: str
    k: int = 16
    m: int = 8
    seed: int = 0
    retries: int = 3
    timeout: float = 60.0
    backoff: float = 1.0
    api_key: str | None = None
    json_mode: bool = True
    max_tokens: int | None = None


def chat_url(endpoint: str) -> str:
    """The chat-completions URL: a full `.../chat/completions` URL as given, else `{base}/chat/completions`."""
    u = endpoint.strip()
    if not re.match(r"^https?://", u):
        raise DescribeError(f"endpoint {endpoint!r} is not an http(s) URL (e.g. http://localhost:8000/v1)")
    u = u.rstrip("/")
    return u if u.endswith("/chat/completions") else u + "/chat/completions"


def _public_url(url: str) -> str:
    """The URL without user info or query string (never record credentials)."""
    p = urllib.parse.urlsplit(url)
    host = p.hostname or ""
    netloc = host + (f":{p.port}" if p.port else "")
    return urllib.parse.urlunsplit((p.scheme, netloc, p.path, "", ""))


SYSTEM_PROMPT = (
    "You are a senior anatomic pathologist who writes precise, teaching-quality morphological "
    "descriptions of haematoxylin and eosin (H&E) stained tissue as seen in whole-slide images. "
    "You answer with one JSON object only: no prose, no markdown."
)


def build_prompt(cohort: str, k: int, m: int, organ: str | None = None) -> str:
    """The user message that asks for K types with M descriptions each."""
    organ_line = f"The organ is: {organ}.\n" if organ else ""
    return (
        f"Cohort: {cohort}\n{organ_line}"
        f"List exactly {k} distinct tissue or morphology types that a pathologist sees in the H&E whole-slide "
        f"images of this cohort, so that together they cover most of the tissue area: tumour subtypes, grades and "
        f"growth patterns; tumour stroma; immune infiltrates; necrosis; the normal structures of the organ; and, "
        f"where useful, blood, fat and common artefacts.\n"
        f"For each type write exactly {m} different one-sentence descriptions of its appearance at 10-20x "
        f"magnification: architecture, cells, nuclei, cytoplasm, stroma and colour. Rules: each description is "
        f"a single sentence of 10 to 40 words ending with a full stop; describe what is visible, not clinical "
        f"facts, stains or molecular tests; vary the wording between sentences; never repeat a sentence; no "
        f"numbering; type names are short (1 to 6 words) and unique.\n"
        f"Reply with exactly this JSON shape and nothing else:\n"
        f'{{"organ": "<organ>", "types": [{{"name": "<type name>", "descriptions": ["<sentence 1>", ..., '
        f'"<sentence {m}>"]}}, ... {k} types in all]}}'
    )


def _strip_wrappers(text: str) -> str:
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.S | re.I).strip()
    fence = re.search(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)```", text, flags=re.S)
    return fence.group(1).strip() if fence else text


def parse_reply(text: str) -> Any:
    """The JSON value in an LLM reply, tolerating code fences, a <think> block and text around it."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the reply was empty")
    body = _strip_wrappers(text)
    try:
        return json.loads(body)
    except json.JSONDecodeError as e:
        first, last = body.find("{"), body.rfind("}")
        if 0 <= first < last:
            try:
                return json.loads(body[first:last + 1])
            except json.JSONDecodeError:
                pass
        raise ValueError(f"the reply is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e


def _slug(s: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")[:64].strip("-")
    return slug or "cohort"


def assemble(reply: Any, cohort: str, settings: DescribeSettings, organ: str | None, name: str | None,
             generator: dict) -> dict:
    """A full description-set dict from a parsed reply (its `types`, and `organ` unless given)."""
    if isinstance(reply, list):
        reply = {"types": reply}
    if not isinstance(reply, dict):
        raise ValueError(f"the reply must be a JSON object with a 'types' array, got {type(reply).__name__}")
    if "types" not in reply:
        raise ValueError(f"the reply has no 'types' field (found: {', '.join(map(str, reply)) or 'nothing'})")
    types = reply["types"]
    if isinstance(types, list):  # keep name/descriptions, trim whitespace; the schema judges the rest
        clean = []
        for t in types:
            if isinstance(t, dict):
                t = {key: t[key] for key in ("name", "descriptions") if key in t}
                if isinstance(t.get("name"), str):
                    t["name"] = t["name"].strip()
                if isinstance(t.get("descriptions"), list):
                    t["descriptions"] = [d.strip() if isinstance(d, str) else d for d in t["descriptions"]]
            clean.append(t)
        types = clean
    reply_organ = reply.get("organ") if isinstance(reply.get("organ"), str) and reply["organ"].strip() else None
    return {"schema_version": SCHEMA_VERSION, "name": name or _slug(cohort), "cohort": cohort,
            "organ": organ or (reply_organ.strip() if reply_organ else "unspecified"), "version": "1",
            "k": settings.k, "m": settings.m, "types": types, "generator": generator}


def correction_message(problems: list[str], k: int, m: int) -> str:
    listed = "\n".join(f"- {p}" for p in problems[:20])
    more = f"\n- ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    return (f"Your previous reply could not be used:\n{listed}{more}\n"
            f"Reply again with only the corrected JSON object: exactly {k} types with unique names, each with "
            f"exactly {m} different one-sentence descriptions, in the shape "
            f'{{"organ": "...", "types": [{{"name": "...", "descriptions": ["...", ...]}}, ...]}}.')


class _Transient(Exception):
    """A failure worth waiting and retrying (server error, timeout, connection refused)."""


class _RejectsJsonMode(Exception):
    pass


def _post(url: str, body: dict, settings: DescribeSettings) -> dict:
    headers = {"Content-Type": "application/json", "Accept": "application/json",
               "User-Agent": "proalign-engine-describe"}
    if settings.api_key:
        headers["Authorization"] = f"Bearer {settings.api_key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=settings.timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        detail = _error_detail(e)
        code = e.code
        if code in (401, 403):
            hint = ("no API key was sent: pass --api-key-env VAR naming an environment variable that holds it"
                    if not settings.api_key else "the API key was refused; check the variable --api-key-env names")
            raise DescribeError(f"{_public_url(url)} answered HTTP {code} ({detail}): {hint}") from None
        if code == 404:
            raise DescribeError(f"{_public_url(url)} answered HTTP 404 ({detail}): no chat-completions endpoint there "
                                f"or no model {settings.model!r}; give the server's base URL "
                                f"(e.g. http://localhost:8000/v1) or the full .../chat/completions URL") from None
        if code in (408, 409, 425, 429) or code >= 500:
            wait = e.headers.get("Retry-After") if e.headers else None
            raise _Transient(f"HTTP {code} ({detail})", wait) from None
        if code in (400, 422) and "response_format" in body:
            raise _RejectsJsonMode(f"HTTP {code} ({detail})") from None
        raise DescribeError(f"{_public_url(url)} answered HTTP {code}: {detail}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise _Transient(f"no answer within {settings.timeout:g} s") from None
        raise _Transient(f"cannot reach the endpoint ({reason})") from None
    except (socket.timeout, TimeoutError):
        raise _Transient(f"no answer within {settings.timeout:g} s") from None
    except (ConnectionError, http.client.HTTPException, OSError) as e:
        raise _Transient(f"connection failed ({type(e).__name__}: {e})") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _Transient(f"the HTTP body is not JSON: {raw[:120]!r}") from None


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        text = e.read().decode("utf-8", "replace")
    except Exception:  # the body is only for the message
        text = ""
    try:
        obj = json.loads(text)
        err = obj.get("error", obj) if isinstance(obj, dict) else obj
        text = err.get("message", json.dumps(err)) if isinstance(err, dict) else str(err)
    except (json.JSONDecodeError, AttributeError):
        pass
    text = " ".join(text.split())[:200]
    return f"{e.reason}: {text}" if text else str(e.reason)


def _content(resp: dict) -> tuple[str, str | None]:
    """(assistant text, finish_reason) of a chat-completions response."""
    try:
        choice = resp["choices"][0]
        msg = choice["message"]
        content = msg.get("content")
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content or "", choice.get("finish_reason")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise ValueError(f"the response has no choices[0].message.content: {json.dumps(resp)[:200]}") from None


def generate_description_set(cohort: str, settings: DescribeSettings, organ: str | None = None,
                             name: str | None = None, sleep: Callable[[float], None] = time.sleep) -> dict:
    """Ask the endpoint for a set; return the validated set dict (with its `generator` record)."""
    url = chat_url(settings.endpoint)
    if not cohort.strip():
        raise DescribeError("--cohort is empty")
    if name is not None and not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,63}", name):
        raise DescribeError(f"set name {name!r}: use 1-64 lower-case letters, digits, '_', '-' or '.'")
    if organ is not None and not organ.strip():
        raise DescribeError("--organ is empty")
    prompt = build_prompt(cohort, settings.k, settings.m, organ)
    base = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
    messages = list(base)
    json_mode = settings.json_mode
    attempts, last = 0, "no attempt made"
    i = 0
    while i <= settings.retries:
        attempts += 1
        body: dict = {"model": settings.model, "messages": messages, "temperature": 0, "seed": settings.seed,
                      "stream": False}
        if json_mode:
            body["response_format"] = {"type": "json_object"}
        if settings.max_tokens:
            body["max_tokens"] = settings.max_tokens
        try:
            resp = _post(url, body, settings)
        except _RejectsJsonMode as e:
            log.warning("the server rejected JSON mode (%s); asking again without it", e)
            json_mode = False  # once, and it does not use up a retry
            continue
        except _Transient as e:
            last = str(e.args[0])
            i += 1
            if i > settings.retries:
                break
            wait = min(settings.backoff * 2 ** (i - 1), MAX_BACKOFF_S)
            if len(e.args) > 1 and e.args[1]:
                try:
                    wait = min(max(wait, float(e.args[1])), MAX_BACKOFF_S)
                except ValueError:
                    pass
            log.warning("attempt %d: %s; retrying in %.2f s", attempts, last, wait)
            sleep(wait)
            continue
        generator = {"method": "llm", "model": settings.model, "prompt": prompt, "system_prompt": SYSTEM_PROMPT,
                     "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                     "endpoint": _public_url(url),
                     "settings": {"temperature": 0, "seed": settings.seed, "json_mode": json_mode,
                                  "max_tokens": settings.max_tokens, "timeout_s": settings.timeout,
                                  "retries": settings.retries},
                     "attempts": attempts, "response_model": resp.get("model"),
                     "system_fingerprint": resp.get("system_fingerprint")}
        reply_text = ""
        try:
            reply_text, finish = _content(resp)
            parsed = parse_reply(reply_text)
            data = assemble(parsed, cohort, settings, organ, name, generator)
            problems = validation_errors(data)
            if finish == "length":
                problems = ["the reply was cut off at the token limit; keep each sentence short"] + problems
            if not problems:
                return data
        except ValueError as e:
            problems = [str(e)]
        last = "invalid reply: " + "; ".join(problems[:5])
        log.warning("attempt %d: %s", attempts, last)
        i += 1
        # Keep the conversation short: the original request, the last bad reply, the correction.
        messages = base + ([{"role": "assistant", "content": reply_text}] if reply_text else []) + \
            [{"role": "user", "content": correction_message(problems, settings.k, settings.m)}]
    if last.startswith(("cannot reach", "connection failed")):
        raise DescribeError(f"{_public_url(url)}: {last} after {attempts} attempt(s); is the server running?")
    raise DescribeError(f"{_public_url(url)}: no valid description set after {attempts} attempt(s) "
                        f"({settings.retries} retries); last problem: {last}")


__all__ = ["DescribeError", "DescribeSettings", "SYSTEM_PROMPT", "assemble", "build_prompt", "chat_url",
           "correction_message", "generate_description_set", "parse_reply"]
