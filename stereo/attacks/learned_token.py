"""A learned token: its vectors in a pipeline's text towers, and on disk as diffusers' textual-inversion file.

Every family: the token lives in each text tower of `stereo.conditioning.text_towers` (one for SD 1.x / 2.x,
two for SDXL). Its vectors are (n, d1 + d2) on SDXL: tower i reads its slice (`LearnedToken.per_tower`). On
disk, SD: {"<token>": (n, d)}, the file `pipe.load_textual_inversion(path)` reads; SDXL: {"clip_l": (n, d1),
"clip_g": (n, d2)}, the token's name in the file's metadata, loaded tower by tower as diffusers' SDXL examples do.

`add_token` registers it (tokenizer + embedding rows) as `load_textual_inversion` does; `install_token` does so
once; `injected` puts trainable vectors in place with a forward hook on each token-embedding table, so every
other row stays bit-identical and only the new vectors receive gradients (textual inversion, `inversion.py`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stereo.attacks.precision import Precision
from stereo.conditioning import text_towers

SDXL_KEYS = ("clip_l", "clip_g")  # diffusers' SDXL textual-inversion file: one tensor per text tower, in order


@dataclass
class LearnedToken:
    """A learned embedding: `token` (as typed in prompts) and its (n, D) vectors.

    `widths`: the text towers' widths (d1, d2) when the token is an SDXL one (D = d1 + d2, tower i
    reads its slice); empty for a one-tower (SD 1.x / 2.x) token.
    """

    token: str
    vectors: torch.Tensor
    losses: list[float] = field(default_factory=list)
    widths: tuple[int, ...] = ()

    def per_tower(self) -> list[torch.Tensor]:
        """The vectors each text tower reads: [(n, D)] for one tower, [(n, d1), (n, d2)] for SDXL."""
        return list(self.vectors.split(list(self.widths), dim=-1)) if self.widths else [self.vectors]


def tower_widths(pipe) -> tuple[int, ...]:
    """The token-embedding widths of the pipeline's text towers: (D,) for SD, (d1, d2) for SDXL."""
    return tuple(encoder.get_input_embeddings().weight.shape[-1] for _, encoder in text_towers(pipe))


def token_widths(pipe) -> tuple[int, ...]:
    """`LearnedToken.widths` of a token learned in `pipe`: () with one tower, the towers' widths with two."""
    widths = tower_widths(pipe)
    return widths if len(widths) > 1 else ()


def tower_pieces(pipe, vectors: torch.Tensor) -> list[torch.Tensor]:
    """Vectors (n, D) of a token of `pipe`, split into the slice each text tower reads."""
    return LearnedToken("", vectors, widths=token_widths(pipe)).per_tower()


def check_widths(pipe, learned: LearnedToken) -> None:
    """A token fits a pipeline when it has one slice per text tower, each as wide as that tower's table."""
    want, have = tower_widths(pipe), tuple(v.shape[-1] for v in learned.per_tower())
    if want != have:
        raise ValueError(f"token {learned.token!r} has vectors of widths {have} but this pipeline's text towers "
                         f"take {want}: a token learned on another model family (SD 1.x / 2.x tokens are one "
                         f"(n, D) tensor, SDXL tokens a clip_l + clip_g pair); learn or load one for this model")


def add_token(pipe, learned: LearnedToken) -> list[list[int]]:
    """Register the token in each of the pipeline's tokenizers and text encoders, as `load_textual_inversion`
    does (on SDXL one call per tower, as diffusers' SDXL example). Returns the token's ids per tower."""
    check_widths(pipe, learned)
    for (tokenizer, encoder), vectors in zip(text_towers(pipe), learned.per_tower()):
        vectors = vectors.to(encoder.device, encoder.dtype)
        pipe.load_textual_inversion({learned.token: vectors}, token=learned.token, tokenizer=tokenizer,
                                    text_encoder=encoder)
    return token_ids(pipe, learned.token, learned.vectors.shape[0])


def token_ids(pipe, token: str, num_vectors: int) -> list[list[int]]:
    """The ids of `token`'s n pieces in each tower's tokenizer (the towers may number them differently)."""
    names = [token] + [f"{token}_{i}" for i in range(1, num_vectors)]  # diffusers' multi-vector naming
    return [tokenizer.convert_tokens_to_ids(names) for tokenizer, _ in text_towers(pipe)]


def write_token_rows(pipe, ids: list[list[int]], vectors: torch.Tensor) -> None:
    """Rows `ids[i]` of tower i's token-embedding table become its slice of `vectors` (n, D), in the table's dtype."""
    pieces = tower_pieces(pipe, vectors)
    with torch.no_grad():
        for (_, encoder), tower_ids, piece in zip(text_towers(pipe), ids, pieces):
            table = encoder.get_input_embeddings().weight
            table[tower_ids] = piece.to(table.device, table.dtype)


def has_token(pipe, token: str, any_tower: bool = False) -> bool:
    """True when every tokenizer of the pipeline knows `token` (`any_tower`: when one does)."""
    known = [token in tokenizer.get_vocab() for tokenizer, _ in text_towers(pipe)]
    return any(known) if any_tower else all(known)


def install_token(pipe, learned: LearnedToken) -> None:
    """Put a learned token in the pipeline, or overwrite its vectors if the pipeline has it already."""
    check_widths(pipe, learned)
    if not has_token(pipe, learned.token):
        add_token(pipe, learned)
        return
    write_token_rows(pipe, token_ids(pipe, learned.token, learned.vectors.shape[0]), learned.vectors)


@contextlib.contextmanager
def injected(pipe, ids: list[list[int]], vectors: torch.Tensor, precision: Precision | None = None):
    """While active, rows `ids[i]` of tower i's token-embedding lookup are replaced by its slice of `vectors`
    (with gradient).

    With a `precision` (the first tower's; each tower casts to its own), the looked-up embeddings of a
    forward that autocasts become fp32, so the gradient reaching the vectors is never held in half precision.
    """
    pieces = tower_pieces(pipe, vectors)
    handles = []
    for (_, encoder), tower_ids, piece in zip(text_towers(pipe), ids, pieces):
        tower_precision = None if precision is None else Precision.of(encoder)
        handles.append(encoder.get_input_embeddings().register_forward_hook(
            _replace_rows(torch.tensor(tower_ids, device=encoder.device), piece, tower_precision)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _replace_rows(ids_t: torch.Tensor, vectors: torch.Tensor, precision: Precision | None):
    def hook(module, inputs, output):
        out = (precision.input(output) if precision else output).clone()
        for j, token_id in enumerate(ids_t):
            out[inputs[0] == token_id] = vectors[j].to(out.dtype)
        return out

    return hook


def save_token(learned: LearnedToken, path: str | Path) -> Path:
    """A diffusers textual-inversion file. One tower: {token: (n, D)}, `pipe.load_textual_inversion(path)`
    adds the token. SDXL: {"clip_l": (n, d1), "clip_g": (n, d2)} (the token's name in the metadata), loaded
    tower by tower as diffusers' SDXL example does:
        state = safetensors.torch.load_file(path)
        pipe.load_textual_inversion(state["clip_l"], token=..., text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)   # and clip_g: text_encoder_2, tokenizer_2
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "diffusers-textual-inversion"}
    if learned.widths:
        if len(learned.widths) != len(SDXL_KEYS):
            raise ValueError(f"token {learned.token!r} has {len(learned.widths)} towers; a textual-inversion file "
                             f"holds one (SD) or two ({', '.join(SDXL_KEYS)}: SDXL)")
        state = dict(zip(SDXL_KEYS, learned.per_tower()))
        metadata["token"] = learned.token
    else:
        state = {learned.token: learned.vectors}
    save_file({k: v.float().contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def load_token(path: str | Path, token: str | None = None) -> LearnedToken:
    """A textual-inversion file of `save_token` (or diffusers' formats): one tensor {token: vectors}, or an SDXL
    pair {"clip_l", "clip_g"}. Its name: `token` when given, else the file's (SD: its key; SDXL: the metadata's,
    else "<file stem>")."""
    state = load_file(str(path))
    if set(state) == set(SDXL_KEYS):
        with safe_open(str(path), "pt") as handle:
            name = token or (handle.metadata() or {}).get("token") or f"<{Path(path).stem}>"
        pieces = [v if v.ndim == 2 else v[None] for v in (state[k] for k in SDXL_KEYS)]
        return LearnedToken(name, torch.cat(pieces, dim=-1), widths=tuple(v.shape[-1] for v in pieces))
    if len(state) != 1:
        raise ValueError(f"{path} holds {len(state)} tensors ({', '.join(sorted(state))}); a textual-inversion file "
                         f"holds one (token -> vectors) or, for SDXL, two ({', '.join(SDXL_KEYS)})")
    name, vectors = next(iter(state.items()))
    return LearnedToken(token or name, vectors if vectors.ndim == 2 else vectors[None])
