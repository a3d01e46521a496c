"""STE's finished rounds on disk: they are STE's checkpoints, and what REO reads back (`method.stage=reo`).

    ste/round_k/<concept>.safetensors   the adversarial embedding found for each concept (a diffusers
                                        textual-inversion file; SDXL: the {"clip_l", "clip_g"} pair)
    ste/round_k/unet_delta.safetensors  the erased subset of that round (the next round starts from it)
    ste/round_k/grid.png                concept before / after the round, adversarial prompt after
    ste/round_k/done.json               written last: the round is finished
    ste/tokens.json                     every token of the run, in order
A killed round has no `done.json` and reruns from its start with the same seeds.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from stereo.attacks.learned_token import LearnedToken, add_token, has_token, load_token, save_token
from stereo.erasure.context import RunContext
from stereo.erasure.previews import draw
from stereo.generation import image_grid
from stereo.manifest import write_json_atomic
from stereo.models.loading import load_unet_weights

DONE = "done.json"


@dataclass
class AdversarialToken:
    """An embedding STE found for `concept` in `round`, and the prompt that uses it."""

    concept: str
    round: int
    learned: LearnedToken
    prompt: str
    file: Path


def is_finished(round_dir: Path) -> bool:
    return (round_dir / DONE).is_file()


def save_round(ctx: RunContext, round_dir: Path, erased, trained_names, tokens: list[AdversarialToken],
               targets: list[str], before, seconds: float) -> None:
    """Tokens, the erased subset and a grid, then `done.json`; written by the main process, the others wait."""
    if ctx.accelerator.is_main_process:
        round_dir.mkdir(parents=True, exist_ok=True)
        for t in tokens:
            save_token(t.learned, t.file)
        state = erased.state_dict()
        save_file({n: state[n].detach().cpu().contiguous() for n in trained_names},
                  str(round_dir / "unet_delta.safetensors"))
        _round_grid(ctx, round_dir, before, erased, tokens)
        write_json_atomic(round_dir / DONE, {  # written last: marks the round as finished
            "round": tokens[0].round, "erased": targets, "seconds": seconds,
            "tokens": [{"concept": t.concept, "token": t.learned.token, "prompt": t.prompt, "file": t.file.name,
                        "final_inversion_loss": t.learned.losses[-1] if t.learned.losses else None}
                       for t in tokens],
        })
    ctx.accelerator.wait_for_everyone()


def write_token_index(ctx: RunContext, root: Path, found: list[AdversarialToken]) -> None:
    if ctx.accelerator.is_main_process:
        write_json_atomic(root / "tokens.json", [
            {"concept": t.concept, "round": t.round, "token": t.learned.token, "prompt": t.prompt,
             "file": str(t.file.relative_to(root))} for t in found])


def _round_grid(ctx: RunContext, round_dir: Path, before, erased, tokens: list[AdversarialToken]) -> None:
    """Columns: concept prompt before the round, concept prompt after, adversarial prompt after; rows: seeds."""
    seeds = (0, 1)
    concept_prompt = {t.concept: ctx.cfg.concepts[t.concept].prompts[0] for t in tokens}
    columns = [(unet, prompt) for token in tokens
               for unet, prompt in ((before, concept_prompt[token.concept]), (erased, concept_prompt[token.concept]),
                                    (erased, token.prompt))]
    images = {}
    for unet in (before, erased):  # one swap (and at most one half-precision copy) per UNet
        wanted = [(c, seed) for c, (u, _) in enumerate(columns) if u is unet for seed in seeds]
        images.update(zip(wanted, draw(ctx, unet, [columns[c][1] for c, _ in wanted], [s for _, s in wanted])))
    grid = [images[c, seed] for seed in seeds for c in range(len(columns))]
    image_grid(grid, cols=len(columns)).save(round_dir / "grid.png")


def load_round(pipe, round_dir: Path, unet):
    """A finished round: its erased UNet (start UNet + saved tensors, fp32 as STE keeps it) and its tokens."""
    erased = copy.deepcopy(unet).float()
    load_unet_weights(erased, round_dir / "unet_delta.safetensors")
    return erased, _load_round_tokens(pipe, round_dir)


def _load_round_tokens(pipe, round_dir: Path) -> list[AdversarialToken]:
    """The tokens a finished round found, added to the pipeline's tokenizers and text encoders."""
    done = json.loads((round_dir / DONE).read_text())
    tokens = []
    for entry in done["tokens"]:
        learned = load_token(round_dir / entry["file"])
        if not has_token(pipe, learned.token):
            add_token(pipe, learned)
        tokens.append(AdversarialToken(entry["concept"], done["round"], learned, entry["prompt"],
                                       round_dir / entry["file"]))
    return tokens


def finished_rounds(ste_dir: str | Path) -> list[Path]:
    """The finished round folders of an STE folder (`<run>/ste` or the run folder itself), in round order."""
    root = Path(ste_dir)
    root = root / "ste" if (root / "ste").is_dir() else root
    rounds = sorted(root.glob("round_*"), key=lambda p: int(p.name.split("_")[1]))
    return [r for r in rounds if is_finished(r)]


def load_ste_tokens(pipe, ste_dir: str | Path) -> list[AdversarialToken]:
    """The tokens of a finished STE folder (`<run>/ste` or the run folder itself), added to the pipeline."""
    finished = finished_rounds(ste_dir)
    if not finished:
        raise FileNotFoundError(f"no finished STE round (round_*/{DONE}) under {ste_dir}; run method.stage=ste first")
    return [token for round_dir in finished for token in _load_round_tokens(pipe, round_dir)]
