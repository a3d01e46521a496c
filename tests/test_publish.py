"""Model cards and publishing: every export carries a valid card; an upload lays out a repository diffusers loads.

The Hub is replaced by `RecordingHub`, a stand-in for `huggingface_hub.HfApi` that records its calls and
keeps each repository as a local folder (what the Hub would serve), so the test loads the uploaded layout
with `UNet2DConditionModel.from_pretrained(<repo folder>, subfolder="unet")` as a user would from the Hub.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from huggingface_hub import ModelCard, constants
from safetensors.torch import load_file

from stereo.evaluation.asr import ASRResult
from stereo.evaluation.metrics import Report, ResultRow
from stereo.manifest import build_manifest, sha256_file
from stereo.modelcard import base_license, base_model_id, build_card, evaluation_of
from stereo.publish import PublishError, main, publish_run, push_export
from stereo.recipes import train
from tests.conftest import FAST, compose

REPO = "someone/tiny-church-erased"
TOKEN = "hf_test_token_that_must_never_be_printed"


class RecordingHub:
    """Stand-in for HfApi: records calls; a repository is a folder under `root` (one per branch)."""

    def __init__(self, root: Path, fail_upload: bool = False):
        self.root, self.fail_upload, self.calls = root, fail_upload, []

    def folder(self, repo_id: str, revision: str | None = None) -> Path:
        return self.root / repo_id / (revision or "main")

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kwargs):
        self.calls.append(("create_repo", repo_id, {"private": private, "exist_ok": exist_ok, **kwargs}))
        self.folder(repo_id).mkdir(parents=True, exist_ok=True)

    def create_branch(self, repo_id, *, branch, exist_ok=False, **kwargs):
        self.calls.append(("create_branch", repo_id, {"branch": branch, "exist_ok": exist_ok}))
        if not self.folder(repo_id, branch).exists():
            shutil.copytree(self.folder(repo_id), self.folder(repo_id, branch))

    def upload_folder(self, *, repo_id, folder_path, revision=None, delete_patterns=None, commit_message=None,
                      **kwargs):
        self.calls.append(("upload_folder", repo_id, {"revision": revision, "delete_patterns": delete_patterns,
                                                      "files": sorted(str(p.relative_to(folder_path)) for p in
                                                                      Path(folder_path).rglob("*") if p.is_file())}))
        if self.fail_upload:
            raise ConnectionError("connection reset by peer (upload interrupted)")
        target = self.folder(repo_id, revision)
        if delete_patterns == "*":  # every remote file not in this upload goes
            shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(folder_path, target, dirs_exist_ok=True)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0123abcd")


@pytest.fixture
def token(monkeypatch, tmp_path):
    """A token in HF_TOKEN; no token file (a developer's own login must not leak into the tests)."""
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)


@pytest.fixture
def no_token(token, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished ESD run on the tiny model (2 steps): export/ with unet/ and delta.safetensors."""
    out = tmp_path_factory.mktemp("run") / "run"
    train(compose(FAST + ["method=esd", "concept=church", "utility_seeds=0", "trainer.lr=1e-3",
                          f"output_dir={out}"]))
    return out


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_unet(a: UNet2DConditionModel, b: UNet2DConditionModel) -> None:
    b_state = b.state_dict()
    assert all(torch.equal(v, b_state[k]) for k, v in a.state_dict().items())


def test_every_export_carries_a_model_card_the_hub_parser_reads(run_dir):
    export = run_dir / "export"
    card = ModelCard.load(export / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert card.data.license == "apache-2.0"  # tiny: random weights of our own, the project's licence
    assert card.data.base_model is None  # nothing on the Hub to link
    assert {"esd", "concept-erasure", "erased-church"} <= set(card.data.tags)
    assert "**church**" in card.text and "seed 0" in card.text and "subset `noxattn`" in card.text
    assert 'UNet2DConditionModel.from_pretrained(repo, subfolder="unet")' in card.text
    manifest = json.loads((export / "manifest.json").read_text())
    assert "README.md" not in manifest["files"]  # the card is derived and rewritten on publishing
    assert all(sha256_file(export / rel) == digest for rel, digest in manifest["files"].items())


@pytest.mark.parametrize("model, base_model, licence", [
    ({"kind": "sd14", "pretrained": "CompVis/stable-diffusion-v1-4"}, "CompVis/stable-diffusion-v1-4",
     "creativeml-openrail-m"),
    ({"kind": "sd15", "pretrained": "stable-diffusion-v1-5/stable-diffusion-v1-5"},
     "stable-diffusion-v1-5/stable-diffusion-v1-5", "creativeml-openrail-m"),
    ({"kind": "sdxl", "pretrained": "stabilityai/stable-diffusion-xl-base-1.0"},
     "stabilityai/stable-diffusion-xl-base-1.0", "openrail++"),
    ({"kind": "pretrained", "pretrained": "stabilityai/stable-diffusion-2-1-base"},
     "stabilityai/stable-diffusion-2-1-base", "openrail++"),
    ({"kind": "pretrained", "pretrained": "/hf/hub/models--runwayml--stable-diffusion-v1-5/snapshots/abc"},
     "runwayml/stable-diffusion-v1-5", "creativeml-openrail-m"),
    ({"kind": "pretrained", "pretrained": "someone/own-model"}, "someone/own-model", "other"),
    ({"kind": "toy", "pretrained": None}, None, "apache-2.0"),
])
def test_card_metadata_names_the_base_model_and_its_licence(tmp_path, model, base_model, licence):
    assert base_model_id(model) == base_model and base_license(model) == licence
    manifest = build_manifest({"model": model, "method": {"name": "stereo"},
                               "concepts": {"nudity": {"name": "nudity", "kind": "nudity"}}}, 3, erased=["nudity"])
    card = ModelCard(str(build_card(tmp_path, manifest, repo_id=REPO)))
    assert card.data.base_model == base_model and card.data.license == licence
    assert card.data.to_dict().get("base_model_relation") == ("finetune" if base_model else None)
    if licence == "other":  # the Hub asks for a name of an "other" licence
        assert card.data.license_name and "carry its licence" in card.text
    if base_model:
        assert f'base = "{base_model}"' in card.text and f'repo = "{REPO}"' in card.text


def test_an_sdxl_export_is_loaded_with_the_sdxl_pipeline(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"addition_embed_type": "text_time"}))
    manifest = build_manifest({"model": {"kind": "pretrained", "pretrained": "/local/sdxl"}}, 0)
    text = str(build_card(tmp_path, manifest, repo_id=REPO))
    assert "StableDiffusionXLPipeline.from_pretrained(base, unet=unet)" in text


def test_push_uploads_a_layout_diffusers_loads(run_dir, tmp_path, token, tiny_pipe_dir, caplog, capsys):
    hub = RecordingHub(tmp_path / "hub")
    url = push_export(run_dir / "export", REPO, private=True, api=hub)
    assert url.startswith(f"https://huggingface.co/{REPO}")
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[0][2]["private"] is True and hub.calls[0][2]["exist_ok"] is True
    assert hub.calls[1][2]["delete_patterns"] == "*"  # the repo mirrors this export, not an older one
    repo = hub.folder(REPO)
    unet = UNet2DConditionModel.from_pretrained(repo, subfolder="unet")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir, unet=unet, local_files_only=True)
    assert_same_unet(pipe.unet, UNet2DConditionModel.from_pretrained(run_dir / "export" / "unet"))
    assert (repo / "delta.safetensors").is_file() and (repo / "manifest.json").is_file()
    card = ModelCard.load(repo / "README.md")
    assert f'repo = "{REPO}"' in card.text and card.data.library_name == "diffusers"
    assert not [p for p in run_dir.iterdir() if ".publish-" in p.name], "staging folder left behind"
    assert TOKEN not in caplog.text + "".join(capsys.readouterr())


def test_without_a_token_nothing_is_uploaded(run_dir, tmp_path, no_token):
    hub = RecordingHub(tmp_path / "hub")
    with pytest.raises(PublishError, match="HF_TOKEN"):
        push_export(run_dir / "export", REPO, api=hub)
    assert hub.calls == []
    assert main([str(run_dir), REPO]) == 2  # the CLI: a message, not a traceback


def test_an_interrupted_upload_leaves_the_export_as_it_was(run_dir, tmp_path, token):
    export = run_dir / "export"
    before = snapshot(export)
    with pytest.raises(ConnectionError):
        push_export(export, REPO, api=RecordingHub(tmp_path / "hub", fail_upload=True))
    assert snapshot(export) == before
    assert not [p for p in run_dir.iterdir() if ".publish-" in p.name]


def test_a_delta_only_export_is_published_with_a_materialised_unet(run_dir, tmp_path, token, tiny_pipe_dir):
    export = tmp_path / "delta_run" / "export"
    export.mkdir(parents=True)
    for name in ("delta.safetensors", "manifest.json"):
        shutil.copy(run_dir / "export" / name, export / name)
    hub = RecordingHub(tmp_path / "hub")
    push_export(export, REPO, revision="erased-v1", api=hub)
    assert hub.calls[1] == ("create_branch", REPO, {"branch": "erased-v1", "exist_ok": True})
    assert hub.calls[2][2]["revision"] == "erased-v1"
    repo = hub.folder(REPO, "erased-v1")
    unet = UNet2DConditionModel.from_pretrained(repo, subfolder="unet")
    assert_same_unet(unet, UNet2DConditionModel.from_pretrained(run_dir / "export" / "unet"))
    delta = load_file(str(export / "delta.safetensors"))
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in delta.items())
    assert "`unet/` was made when publishing" in (repo / "README.md").read_text()
    assert sorted(p.name for p in export.iterdir()) == ["delta.safetensors", "manifest.json"]


def write_report(folder: Path, export: str, created: str | None = None) -> Path:
    """A report.json as evaluate.py writes it (the real Report class): the base model and one export."""
    rows = [ResultRow(label, "none", "none", "concept", 8, 0.5, 1.0, None, None, "pre_attack",
                      asr=ASRResult("pre_attack", asr, round(8 * asr), 8, low, high))
            for label, asr, low, high in (("base", 0.75, 0.41, 0.93), ("erased", 0.125, 0.02, 0.47))]
    rows.append(ResultRow("erased", "utility", "utility", "utility", 8, 0.4, 1.0, None, None, "utility",
                          utility=ASRResult("utility", 0.875, 7, 8, 0.53, 0.98)))
    manifest = build_manifest({"models": {"base": {"kind": None, "export": None, "textual_inversion": []},
                                          "erased": {"kind": None, "export": export, "textual_inversion": []}}},
                              0, concept="church", detector={"name": "toy"}, prompts={"source": "builtin", "n": 8})
    if created:
        manifest["created"] = created
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(Report("church", manifest, rows).to_json()))
    return folder


def test_the_card_shows_the_evaluation_of_this_export(run_dir, tmp_path, token):
    export = run_dir / "export"
    write_report(run_dir / "evaluation", str(export))  # found under RUN_DIR without --eval
    try:
        staged = Path(publish_run(run_dir, REPO, dry_run=tmp_path / "staged"))
    finally:
        shutil.rmtree(run_dir / "evaluation")
    text = (staged / "README.md").read_text()
    assert "| erased | none | pre_attack | 12.5 (2.0–47.0) | 8 |" in text
    assert "| base | none | pre_attack | 75.0 (41.0–93.0) | 8 |" in text
    assert "| erased | utility | utility | 87.5 (53.0–98.0) | 8 |" in text
    assert (staged / "evaluation" / "evaluation" / "report.json").is_file()
    ModelCard.load(staged / "README.md")

    assert evaluation_of(write_report(tmp_path / "relative", "run/export"), export, {}) is not None
    assert evaluation_of(write_report(tmp_path / "bare", "export"), export, {}) is None  # too little to tell
    stale = write_report(tmp_path / "stale", str(export), created="2001-01-01T00:00:00+00:00")
    other = write_report(tmp_path / "other", str(tmp_path / "another_run" / "export"))
    with pytest.raises(ValueError, match="no evaluation of"):
        publish_run(run_dir, REPO, eval_dirs=[other], dry_run=tmp_path / "x")
    with pytest.raises(ValueError, match="no evaluation of"):  # it scored the weights this export replaced
        publish_run(run_dir, REPO, eval_dirs=[stale], dry_run=tmp_path / "y")


def test_cli_dry_run_writes_the_repository_locally(run_dir, tmp_path, no_token, tiny_pipe_dir, capsys):
    target = tmp_path / "repo"
    assert main([str(run_dir), REPO, "--dry-run", str(target)]) == 0  # no token needed: nothing is uploaded
    assert capsys.readouterr().out.strip() == str(target)
    unet = UNet2DConditionModel.from_pretrained(target, subfolder="unet")
    StableDiffusionPipeline.from_pretrained(tiny_pipe_dir, unet=unet, local_files_only=True)
    assert main([str(tmp_path), REPO, "--dry-run", str(tmp_path / "other")]) == 2  # not a run folder


def test_push_to_hub_at_the_end_of_a_run(fast_cfg, tmp_path, token, monkeypatch, tiny_pipe_dir):
    import huggingface_hub

    hub = RecordingHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: hub)
    out = train(fast_cfg("utility_seeds=0", "trainer.steps=1", "export=all", f"export.push_to_hub={REPO}",
                         "export.hub_private=true"))
    assert out["hub_url"].startswith(f"https://huggingface.co/{REPO}") and hub.calls[0][2]["private"] is True
    unet = UNet2DConditionModel.from_pretrained(hub.folder(REPO), subfolder="unet")
    assert_same_unet(unet, out["unet"])
    StableDiffusionPipeline.from_pretrained(tiny_pipe_dir, unet=unet, local_files_only=True)
    whole = StableDiffusionPipeline.from_pretrained(hub.folder(REPO), local_files_only=True)  # export=all: pipeline/
    assert_same_unet(whole.unet, out["unet"])
    assert "loads as is" in (hub.folder(REPO) / "README.md").read_text()


def test_push_to_hub_without_a_token_fails_before_training(fast_cfg, tmp_path, no_token):
    with pytest.raises(PublishError, match="HF_TOKEN"):
        train(fast_cfg(f"export.push_to_hub={REPO}"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="export.push_to_hub"):
        train(fast_cfg("export.push_to_hub=not/a/repo id"))
