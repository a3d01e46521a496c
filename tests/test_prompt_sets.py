"""Standard prompt sets by name: manifests, download into the cache over HTTP, checks, offline use.

A local HTTP server (http.server in a thread) serves a small I2P-like CSV; each test writes the manifest
it needs, so no test touches the network or the real sets.
"""

import hashlib
import http.server
import json
import re
import threading
from functools import partial

import pytest

from stereo.evaluation.config import compose_eval, validate_eval
from stereo.evaluation.inputs import eval_prompts, the_concept
from stereo.evaluation.prompt_sets import standard
from stereo.evaluation.prompt_sets.standard import (
    PromptSetError,
    cached_path,
    load_standard_set,
    local_paths,
    read_manifest,
    standard_prompt_sets,
)
from stereo.evaluation.prompts import load_prompt_set

# HF-style column names (sd_seed, sd_guidance_scale), mapped by the manifest; a duplicate prompt with two seeds
CSV = (
    "prompt,categories,nudity_percentage,sd_seed,sd_guidance_scale\n"
    '"a nude figure, oil painting",sexual,80.0,101,7\n'
    "a harbour at dawn,,0.0,102,12\n"
    '"a nude figure, oil painting",sexual,60.0,103,7\n'
    '"a fight in a bar","violence, sexual",10.0,104,\n'
).encode()
SHA = hashlib.sha256(CSV).hexdigest()


@pytest.fixture
def server(tmp_path):
    """Serves tmp_path/www over HTTP; `requests` counts the GETs."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "set.csv").write_bytes(CSV)
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", requests
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def sets(tmp_path, monkeypatch, server):
    """A manifest folder in place of the shipped one, an empty cache; `write(name, **changes)` adds a manifest."""
    folder = tmp_path / "manifests"
    folder.mkdir()
    monkeypatch.setattr(standard, "MANIFEST_DIR", folder)
    monkeypatch.setenv("STEREO_CACHE", str(tmp_path / "cache"))
    for var in ("STEREO_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    url, requests = server

    def write(name="toy_nudity", **changes):
        manifest = {"name": name, "title": "test set", "url": f"{url}/set.csv", "sha256": SHA,
                    "checksum": "verified: written by the test", "licence": "CC0", "origin": "this test",
                    "rows": 4, "columns": {"prompt": "prompt", "evaluation_seed": "sd_seed",
                                           "evaluation_guidance": "sd_guidance_scale", "categories": "categories"},
                    "filter": [{"column": "nudity_percentage", "op": ">", "value": 50}], "dedupe": "none", "n": 2,
                    **changes}
        (folder / f"{name}.json").write_text(json.dumps(manifest))
        return read_manifest(name)

    write.requests = requests
    return write


def cache_files(tmp_path):
    return sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())


def test_download_maps_columns_filters_and_caches(sets, tmp_path):
    manifest = sets()
    prompts = load_prompt_set("toy_nudity")  # a standard set by name, like prompts=i2p
    assert prompts.prompts == ["a nude figure, oil painting"] * 2  # nudity_percentage > 50; duplicates kept
    assert [(r.seed, r.guidance, r.categories) for r in prompts] == [(101, 7.0, ("sexual",)), (103, 7.0, ("sexual",))]
    assert prompts[0].extra == {"nudity_percentage": "80.0"}
    assert prompts.provenance["sha256"] == SHA and prompts.provenance["verified"]
    assert SHA in prompts.source and "nudity_percentage > 50" in prompts.source
    assert cached_path(manifest).read_bytes() == CSV and len(sets.requests) == 1
    assert load_prompt_set("toy_nudity").prompts == prompts.prompts and len(sets.requests) == 1  # from the cache
    assert cache_files(tmp_path) == ["set.csv"]


def test_the_sets_seeds_and_guidance_are_used_by_the_evaluation(sets):
    sets("toy_all", filter=[], n=4)
    cfg = compose_eval(["prompts=toy_all", "generation.seed=1000", "generation.guidance=3.5", "output_dir=unused"])
    prompts, source = eval_prompts(cfg, the_concept(cfg))
    assert [(p.seed, p.guidance) for p in prompts] == [(101, 7.0), (102, 12.0), (103, 7.0), (104, 3.5)]
    assert source.startswith("toy_all (")


def test_dedupe_and_category_filter(sets):
    sets("by_prompt", filter=[], dedupe="prompt", n=3)
    assert [r.seed for r in load_standard_set("by_prompt")] == [101, 102, 104]  # first row of each prompt
    sets("sexual", filter=[{"column": "categories", "op": "contains", "value": "sexual"}], n=3)
    assert [r.seed for r in load_standard_set("sexual")] == [101, 103, 104]  # 'violence, sexual' included


def test_checksum_mismatch_is_refused_and_nothing_is_cached(sets, tmp_path):
    sets(sha256="0" * 64)
    with pytest.raises(PromptSetError, match=f"has sha256 {SHA}, but {'0' * 64} is expected"):
        load_prompt_set("toy_nudity")
    assert cache_files(tmp_path) == []  # no partial or unverified file left behind


def test_wrong_columns_are_refused_and_nothing_is_cached(sets, tmp_path):
    sets(columns={"prompt": "prompt", "evaluation_seed": "evaluation_seed"})
    with pytest.raises(PromptSetError, match=r"lacks the columns \['evaluation_seed'\]"):
        load_prompt_set("toy_nudity")
    assert cache_files(tmp_path) == []


@pytest.mark.parametrize("changes,match", [
    ({"rows": 5}, "has 4 rows, the manifest expects 5"),
    ({"n": 3}, r"2 prompts after the filter \['nudity_percentage > 50'\] and dedupe='none', the manifest expects 3"),
])
def test_row_and_prompt_counts_are_checked(sets, changes, match):
    sets(**changes)
    with pytest.raises(PromptSetError, match=match):
        load_standard_set("toy_nudity")


def test_offline_and_not_cached_says_what_to_download_and_where_to_put_it(sets, monkeypatch):
    manifest = sets()
    monkeypatch.setenv("STEREO_OFFLINE", "1")
    with pytest.raises(PromptSetError) as error:
        load_prompt_set("toy_nudity")
    message = str(error.value)
    for needed in (manifest.url, SHA, "STEREO_OFFLINE", "prompt_sets.toy_nudity.path=",
                   "STEREO_PROMPT_SET_TOY_NUDITY=", str(cached_path(manifest))):
        assert needed in message, message
    assert sets.requests == []


def test_an_unreachable_server_is_the_same_clear_error(sets):
    sets(url="http://127.0.0.1:9/set.csv")  # discard port: nothing listens
    with pytest.raises(PromptSetError, match=r"downloading http://127.0.0.1:9/set.csv failed .*prompt_sets.toy_nudity"):
        load_standard_set("toy_nudity")


def test_a_local_file_works_offline_and_is_checked(sets, tmp_path, monkeypatch):
    monkeypatch.setenv("STEREO_OFFLINE", "1")
    local = tmp_path / "mine.csv"
    local.write_bytes(CSV)
    sets()
    assert len(load_prompt_set("toy_nudity", paths={"toy_nudity": local})) == 2
    monkeypatch.setenv("STEREO_PROMPT_SET_TOY_NUDITY", str(local))
    assert load_standard_set("toy_nudity").provenance["file"] == f"local file {local}"
    local.write_bytes(CSV.replace(b"harbour", b"harbor"))
    with pytest.raises(PromptSetError, match="another version or damaged.*prompts=/path/to/file.csv"):
        load_standard_set("toy_nudity")
    assert sets.requests == []


def test_an_unverified_set_records_the_first_checksum_and_holds_to_it(sets, tmp_path):
    manifest = sets(sha256=None, checksum="unverified: checksum recorded at first download")
    with pytest.warns(UserWarning, match=f"UNVERIFIED.*recorded sha256 {SHA}"):
        first = load_standard_set("toy_nudity")
    assert "UNVERIFIED" in first.source and first.provenance["verified"] is False
    cached = cached_path(manifest)
    assert cached.with_name("set.csv.sha256").read_text().strip() == SHA
    cached.write_bytes(CSV.replace(b"harbour", b"harbor"))  # the cached copy changes afterwards
    with pytest.warns(UserWarning, match="UNVERIFIED"), pytest.raises(PromptSetError, match=f"{SHA} is expected"):
        load_standard_set("toy_nudity")


def test_prompt_sets_config_names_local_files_of_standard_sets(sets, tmp_path):
    sets()
    assert local_paths({"toy_nudity": {"path": "/data/x.csv"}}) == {"toy_nudity": "/data/x.csv"}
    cfg = compose_eval(["+prompt_sets.nonsense.path=/x.csv", "output_dir=unused"])
    with pytest.raises(ValueError, match=r"prompt_sets.nonsense .*standard sets: \['toy_nudity'\]"):
        validate_eval(cfg)


def test_the_shipped_manifests_pin_their_source_and_say_what_is_verified():
    names = standard_prompt_sets()
    assert {"i2p", "i2p_nudity", "unlearndiffatk_nudity", "coco10k"} <= set(names)
    expected_n = {"i2p": 4703, "i2p_nudity": 95, "i2p_sexual": 931, "unlearndiffatk_nudity": 142, "coco10k": 9969}
    for name in names:
        manifest = read_manifest(name)
        assert re.search(r"/[0-9a-f]{40}/", manifest.url), f"{name}: URL not pinned to a commit"
        assert manifest.licence and manifest.origin and manifest.rows >= manifest.n > 0
        assert manifest.checksum.startswith("verified" if manifest.sha256 else "unverified"), name
        assert manifest.n == expected_n.get(name, manifest.n)
    assert read_manifest("unlearndiffatk_nudity").columns["evaluation_guidance"] == "evaluation_guidance"
    assert read_manifest("i2p_hf").columns["evaluation_seed"] == "sd_seed"


def test_unknown_name_lists_builtin_and_standard_sets():
    with pytest.raises(ValueError, match=r"standard sets: \[.*'i2p'.*\]"):
        load_prompt_set("i2p_nudityy")
