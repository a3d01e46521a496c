"""Tests for stereo.anchors: built-in sets, validation, files, the OpenAI generator (mocked at
the HTTP transport), the disk cache, get_anchors' source order and the CLI."""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from stereo.anchors import (
    AnchorCache,
    AnchorGenerationError,
    AnchorGenerator,
    AnchorRequest,
    AnchorRules,
    builtin_concepts,
    get_anchors,
    load_anchor_file,
    load_builtin_anchors,
    mentions_concept,
    resolve_concept,
    reviewed_anchor_path,
    validate_anchors,
)
from stereo.anchors.__main__ import main as cli_main
from stereo.anchors.concepts import TOY_BACKGROUNDS, TOY_COLOURS, TOY_SHAPES

REAL_CONCEPTS = ["nudity", "vangogh", "church", "parachute", "garbage_truck", "tench"]
SECRET = "sk-test-DO-NOT-LEAK-0123456789abcdef"


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No real key, and a private cache root, in every test."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("STEREO_CACHE_DIR", str(tmp_path / "stereo-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# --- a fake OpenAI server at the HTTP transport ------------------------------------------------

def structured(prompts):
    """A chat-completion reply whose content is the structured-output JSON."""
    return content(json.dumps({"prompts": prompts}))


def content(text):
    def reply(request):
        return httpx.Response(200, json={
            "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "gpt-test",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
        })
    return reply


def status(code):
    def reply(request):
        return httpx.Response(code, json={"error": {"message": f"status {code}", "type": "test"}})
    return reply


def timeout(request):
    raise httpx.ReadTimeout("timed out", request=request)


class FakeServer:
    """Answers requests with the scripted replies in order (the last one repeats); records them."""

    def __init__(self, *replies):
        self.replies, self.requests = list(replies), []

    def handler(self, request):
        self.requests.append(request)
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        return reply(request)

    def client(self, api_key="test"):
        return openai.OpenAI(
            api_key=api_key, base_url="http://test.invalid/v1",
            http_client=httpx.Client(transport=httpx.MockTransport(self.handler)), max_retries=0,
        )

    def body(self, i):
        return json.loads(self.requests[i].content)


class SleepRecorder(list):
    def __call__(self, seconds):
        self.append(seconds)


def garbage_prompts(k, start=0):
    return [f"a garbage truck parked on street number {i}" for i in range(start, start + k)]


# --- built-in sets and validation ---------------------------------------------------------------

def test_builtin_concepts_are_the_expected_ones():
    assert set(builtin_concepts()) == set(REAL_CONCEPTS) | set(TOY_SHAPES)


@pytest.mark.parametrize("concept", REAL_CONCEPTS + list(TOY_SHAPES))
def test_builtin_set_is_large_valid_and_unique(concept):
    anchors = load_builtin_anchors(concept)
    assert len(anchors) >= 50
    valid, rejected = validate_anchors(anchors, concept)
    assert rejected == {} and valid == anchors
    assert len({" ".join(a.lower().split()) for a in anchors}) == len(anchors)


def test_nudity_anchors_depict_adults_only():
    minors = re.compile(r"\b(baby|babies|infant|child|children|toddler|kids?|boys?|girls?|cherubs?|teens?|"
                        r"teenagers?|young|youth|school)\b", re.IGNORECASE)
    assert [a for a in load_builtin_anchors("nudity") if minors.search(a)] == []


_COLOUR = "|".join(TOY_COLOURS)
_SHAPE = "|".join(TOY_SHAPES)
_BG = "|".join(TOY_BACKGROUNDS)
_OBJ = rf"(?:{_COLOUR}) (?:{_SHAPE})"
TOY_GRAMMAR = re.compile(
    rf"^(?:a {_OBJ}|a photo of a {_OBJ}|a {_OBJ} on a (?:{_BG}) background"
    rf"|a {_OBJ} and a {_OBJ}(?: on a (?:{_BG}) background)?|a (?:{_SHAPE}) on a (?:{_BG}) background)$"
)


@pytest.mark.parametrize("shape", TOY_SHAPES)
def test_toy_anchors_follow_the_caption_grammar_and_carry_context(shape):
    for anchor in load_builtin_anchors(shape):
        assert TOY_GRAMMAR.match(anchor), anchor
        words = anchor.split()
        assert shape in words
        context = [w for w in words if w in TOY_COLOURS or w in TOY_BACKGROUNDS
                   or (w in TOY_SHAPES and w != shape)]
        assert context, f"{anchor!r} has no context besides {shape}"


def test_resolve_concept_accepts_keys_and_text():
    assert resolve_concept("garbage_truck").key == "garbage_truck"
    assert resolve_concept("  Garbage   Truck ").key == "garbage_truck"
    assert resolve_concept("garbage-truck").key == "garbage_truck"
    assert resolve_concept("Van Gogh").key == "vangogh"
    assert resolve_concept("naked").key == "nudity"
    unknown = resolve_concept("Golden Retriever")
    assert unknown.key == "golden_retriever" and unknown.synonyms == ("golden retriever",)
    with pytest.raises(ValueError, match="non-empty"):
        resolve_concept("  ")


@pytest.mark.parametrize("prompt, concept, expected", [
    ("a naked man on a beach", "nudity", True),
    ("a barely visible path in the woods", "nudity", False),  # 'bare' only as a whole word
    ("Van  Gogh's sunflowers in a vase", "vangogh", True),
    ("two churches on a hill", "church", True),
    ("a refuse truck at dawn", "garbage truck", True),
    ("a garbage can next to a truck", "garbage_truck", False),
    ("parachutes over the sea", "parachute", True),
    ("a red circle on a plain background", "circle", True),
    ("a red circles", "square", False),
])
def test_mentions_concept_matches_whole_words_and_synonyms(prompt, concept, expected):
    assert mentions_concept(prompt, concept) is expected


def test_validate_anchors_dedups_and_applies_bounds():
    rules = AnchorRules(min_words=3, max_words=8, max_chars=60)
    prompts = [
        "a tench in a pond",
        "A  Tench in a POND ",  # duplicate up to case and whitespace
        "tench",  # too short
        "a tench " + "very " * 10 + "big",  # too many words
        "a tench in a " + "x" * 80,  # too many characters
        "a carp in a pond",  # no mention
        "# a tench as comment",
        "a tench\tnear reeds",
    ]
    valid, rejected = validate_anchors(prompts, "tench", rules)
    assert valid == ["a tench in a pond", "a tench near reeds"]
    assert sum(rejected.values()) == 6 and rejected["duplicate"] == 1
    with pytest.raises(ValueError, match="min_words"):
        AnchorRules(min_words=5, max_words=2)


# --- anchor files -----------------------------------------------------------------------------

def test_load_anchor_file_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("# header\n\n  a church at dawn  \n# note\na church in snow\n", encoding="utf-8")
    assert load_anchor_file(path) == ["a church at dawn", "a church in snow"]


def test_load_anchor_file_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.txt.*no prompts"):
        load_anchor_file(empty)
    with pytest.raises(ValueError, match=r"missing\.txt"):
        load_anchor_file(tmp_path / "missing.txt")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match=r"binary\.txt"):
        load_anchor_file(binary)


# --- generation through the mocked OpenAI API -------------------------------------------------

def test_structured_reply_is_validated_cached_and_reused_without_key(tmp_path):
    good = garbage_prompts(4)
    server = FakeServer(structured(good + ["a fire engine", good[0].upper(), "truck"]))
    generator = AnchorGenerator(model="gpt-test", client=server.client(), sleep=SleepRecorder())
    anchors = get_anchors("garbage truck", 4, source="openai", cache_dir=tmp_path, generator=generator)
    assert anchors == good and len(server.requests) == 1
    body = server.body(0)
    assert body["model"] == "gpt-test"
    assert body["response_format"]["type"] == "json_schema"
    assert "garbage truck" in body["messages"][0]["content"]

    files = list(tmp_path.glob("*.json"))
    digest = AnchorRequest("garbage_truck", 4, "gpt-test", AnchorGenerator().template).digest
    assert [f.name for f in files] == [f"garbage_truck.{digest}.json"]
    entry = json.loads(files[0].read_text())
    assert entry["prompts"] == good
    assert (entry["model"], entry["concept"], entry["n"]) == ("gpt-test", "garbage_truck", 4)
    assert entry["template"] == AnchorGenerator().template and entry["created"]
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left no temp file

    # Same key (key spelling this time), no client and no OPENAI_API_KEY: served from disk.
    # (source="auto" would pick garbage_truck's built-in set; the CLI test covers auto + cache.)
    for source in ("cache", "openai"):
        again = get_anchors("garbage_truck", 4, source=source, cache_dir=tmp_path,
                            generator=AnchorGenerator(model="gpt-test"))
        assert again == good
    assert len(server.requests) == 1


def test_too_few_valid_anchors_asks_again_listing_the_ones_kept():
    server = FakeServer(structured(garbage_prompts(3) + ["a bus"]), structured(garbage_prompts(5, 3)))
    generator = AnchorGenerator(client=server.client(), sleep=SleepRecorder())
    assert generator.generate("garbage truck", 6) == garbage_prompts(6)
    assert len(server.requests) == 2
    follow_up = server.body(1)["messages"][-1]["content"]
    assert all(p in follow_up for p in garbage_prompts(3))
    assert "write 3 new ones" in follow_up


def test_too_few_valid_anchors_after_max_requests_is_a_clear_error():
    server = FakeServer(structured(["a bus on a street", "a car in the rain"]))
    generator = AnchorGenerator(client=server.client(), max_requests=3, sleep=SleepRecorder())
    with pytest.raises(AnchorGenerationError, match=r"only 0 of 5 .*after 3 requests"):
        generator.generate("garbage truck", 5)
    assert len(server.requests) == 3


@pytest.mark.parametrize("bad", [content("this is not json"), content('{"wrong": ["x"]}'),
                                 content('{"prompts": "not a list"}')])
def test_malformed_reply_is_retried_then_a_clear_error(bad):
    server = FakeServer(bad)
    sleep = SleepRecorder()
    generator = AnchorGenerator(client=server.client(), max_attempts=4, base_delay=1.0, sleep=sleep)
    with pytest.raises(AnchorGenerationError, match="failed 4 times in a row.*ValidationError"):
        generator.generate("church", 3)
    assert len(server.requests) == 4
    assert sleep == [1.0, 2.0, 4.0]  # exponential backoff, nothing after the last attempt


def test_malformed_then_valid_reply_recovers():
    server = FakeServer(content("{oops"), structured(["a church on a hill", "a chapel by the sea"]))
    generator = AnchorGenerator(client=server.client(), sleep=SleepRecorder())
    assert generator.generate("church", 2) == ["a church on a hill", "a chapel by the sea"]


@pytest.mark.parametrize("transient", [status(429), status(500), status(503), timeout])
def test_rate_limit_timeout_and_5xx_are_retried_with_backoff(transient):
    server = FakeServer(transient, transient, structured(["a tench in a pond", "a tench on ice"]))
    sleep = SleepRecorder()
    generator = AnchorGenerator(client=server.client(), base_delay=0.5, max_delay=0.75, sleep=sleep)
    assert generator.generate("tench", 2) == ["a tench in a pond", "a tench on ice"]
    assert len(server.requests) == 3
    assert sleep == [0.5, 0.75]  # 0.5 * 2**k, capped at max_delay


def test_client_errors_are_not_retried():
    server = FakeServer(status(401))
    sleep = SleepRecorder()
    generator = AnchorGenerator(client=server.client(), sleep=sleep)
    with pytest.raises(openai.AuthenticationError):
        generator.generate("tench", 2)
    assert len(server.requests) == 1 and sleep == []


def test_client_is_built_lazily():
    generator = AnchorGenerator()  # no key anywhere: constructing must not fail
    assert generator.client is None
    with pytest.raises(openai.OpenAIError, match="api_key"):
        generator.generate("tench", 2)


def test_template_must_format_with_concept_and_n():
    with pytest.raises(ValueError, match="template"):
        AnchorGenerator(template="give me {count} prompts about {concept}")
    server = FakeServer(structured(["a parachute over a lake at dawn"]))
    generator = AnchorGenerator(client=server.client(), template="List {n} prompts with {concept}.")
    generator.generate("parachute", 1)
    assert server.body(0)["messages"][0]["content"] == "List 1 prompts with parachute."


def test_api_key_never_reaches_cache_logs_or_repr(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    for name in (None, "openai", "httpx", "stereo"):
        caplog.set_level(logging.DEBUG, logger=name)
    dogs = ["a golden retriever in the snow", "a golden retriever on a sofa"]
    server = FakeServer(status(429), structured(dogs))
    client = server.client(api_key=SECRET)
    # auto: no built-in set, no reviewed file, no cache entry, a key -> generated and cached
    sleep = SleepRecorder()
    generator = AnchorGenerator(client=client, sleep=sleep)
    assert get_anchors("golden retriever", 2, cache_dir=tmp_path, generator=generator) == dogs
    assert len(sleep) == 1
    assert server.requests[-1].headers["authorization"] == f"Bearer {SECRET}"  # it was really used
    assert caplog.text  # logs were captured (the retry warning at least)
    assert SECRET not in caplog.text
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text()
    assert SECRET not in repr(generator) and SECRET not in repr(AnchorCache(tmp_path))


# --- get_anchors: sources and errors ---------------------------------------------------------

def test_no_builtin_no_cache_no_key_names_the_three_fixes(tmp_path):
    with pytest.raises(LookupError) as info:
        get_anchors("golden retriever", 10, cache_dir=tmp_path)
    message = str(info.value)
    assert "built-in concept" in message and "nudity" in message
    assert str(tmp_path / "golden_retriever.txt") in message and "anchors_file=" in message
    assert "OPENAI_API_KEY" in message


def test_auto_prefers_builtin_then_reviewed_file_then_cache(tmp_path):
    assert get_anchors("tench", 5) == load_builtin_anchors("tench")[:5]
    assert get_anchors("tench") == load_builtin_anchors("tench")
    reviewed = reviewed_anchor_path("Golden Retriever", tmp_path)
    reviewed.parent.mkdir(parents=True, exist_ok=True)
    reviewed.write_text("# reviewed\na golden retriever on a beach\na golden retriever asleep\n")
    assert get_anchors("golden retriever", cache_dir=tmp_path) == [
        "a golden retriever on a beach", "a golden retriever asleep"]
    explicit = tmp_path / "mine.txt"
    explicit.write_text("a tench in a bucket\n")
    assert get_anchors("tench", anchors_file=explicit) == ["a tench in a bucket"]
    with pytest.raises(ValueError, match="mine2.txt"):
        get_anchors("tench", anchors_file=tmp_path / "mine2.txt")


def test_get_anchors_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="valid sources are"):
        get_anchors("tench", source="gpt")
    with pytest.raises(ValueError, match=r"n=1000 .* only 57"):
        get_anchors("tench", 1000)
    with pytest.raises(ValueError, match="positive integer"):
        get_anchors("tench", 0)
    with pytest.raises(ValueError, match="built-in concepts are"):
        get_anchors("golden retriever", source="builtin")
    with pytest.raises(LookupError, match="source='openai'"):
        get_anchors("golden retriever", 5, source="cache", cache_dir=tmp_path)


def test_cache_key_and_location():
    base = AnchorRequest("church", 10, "m", "t {concept} {n}")
    variants = [AnchorRequest("chapel", 10, "m", base.template), AnchorRequest("church", 11, "m", base.template),
                AnchorRequest("church", 10, "m2", base.template), AnchorRequest("church", 10, "m", "u")]
    assert len({base.digest} | {v.digest for v in variants}) == 5
    assert re.fullmatch(r"[0-9a-f]{64}", base.digest)
    assert AnchorCache().root == Path(os.environ["STEREO_CACHE_DIR"]) / "anchors"


def test_corrupt_cache_entry_is_a_clear_error(tmp_path):
    cache = AnchorCache(tmp_path)
    request = AnchorRequest("church", 2, "m", "t")
    cache.save(request, ["a church", "a chapel"])
    assert cache.load(request) == ["a church", "a chapel"]
    cache.path(request).write_text("{truncated")
    with pytest.raises(ValueError, match="corrupt.*delete it"):
        cache.load(request)


# --- CLI --------------------------------------------------------------------------------------

def test_cli_prints_and_writes_a_builtin_set(tmp_path, capsys):
    out = tmp_path / "review" / "garbage_truck.txt"
    assert cli_main(["concept=garbage truck", "n=5", f"out={out}"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == load_builtin_anchors("garbage_truck")[:5]
    assert load_anchor_file(out) == printed
    assert out.read_text().startswith("# anchors for concept 'garbage truck'")


def test_cli_serves_a_cached_set_and_reports_bad_arguments(tmp_path, capsys):
    server = FakeServer(structured(["a golden retriever in snow", "a golden retriever at a lake"]))
    get_anchors("golden retriever", 2, source="openai", cache_dir=tmp_path,
                generator=AnchorGenerator(client=server.client()))
    for source in ("auto", "cache"):
        assert cli_main(["concept=golden_retriever", "n=2", f"source={source}", f"cache_dir={tmp_path}"]) == 0
        assert capsys.readouterr().out.splitlines() == ["a golden retriever in snow", "a golden retriever at a lake"]
    assert len(server.requests) == 1
    assert cli_main(["concpt=church"]) == 2
    assert "keys: concept, n" in capsys.readouterr().err


def test_cli_runs_as_a_module(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "stereo.anchors", "concept=Van Gogh", "n=3"],
                          check=False, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == load_builtin_anchors("vangogh")[:3]
    failed = subprocess.run([sys.executable, "-m", "stereo.anchors", "concept=golden retriever"],
                            check=False, capture_output=True, text=True, env=env, timeout=60)
    assert failed.returncode == 2 and "OPENAI_API_KEY" in failed.stderr
