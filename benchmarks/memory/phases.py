"""Every phase of a STEREO run and its evaluation, built from the traced steps: what is resident in
each phase (extra UNets, kept AdamW state, the gallery) added to the step's peak."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from benchmarks.memory.configs import Setup, latent_size
from benchmarks.memory.evaluation import trace_generation, trace_ring_a_bell, trace_token_attack, trace_unlearndiffatk
from benchmarks.memory.memtrace import GIB, round_up
from benchmarks.memory.trace import Breakdown
from benchmarks.memory.training import MERGE_SECTIONS, OPT_SECTIONS, trace_erasure, trace_lora_merge

BARS_GIB = {"esd": 18.0, "ddp": 18.0, "ste": 20.0, "reo": 20.0}


@dataclass
class Phase:
    name: str
    sections: dict[str, Breakdown]
    resident: dict[str, int]
    bar_gib: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def peak_section(self) -> str:
        return max(self.sections, key=lambda s: self.sections[s].total)

    @property
    def peak(self) -> Breakdown:
        return self.sections[self.peak_section]

    @property
    def met(self) -> bool | None:
        return None if self.bar_gib is None else self.peak.total <= self.bar_gib * GIB

    def with_resident(self, name: str, weights: int = 0, optimizer: int = 0, note: str | None = None) -> "Phase":
        if not weights and not optimizer:
            return self
        sections = {k: b.plus(weights, optimizer) for k, b in self.sections.items()}
        notes = self.notes + ([note] if note else [])
        return Phase(self.name, sections, {**self.resident, name: weights + optimizer}, self.bar_gib, notes)

    def renamed(self, name: str, bar_gib: float | None = None, drop: tuple[str, ...] = ()) -> "Phase":
        sections = {k: b for k, b in self.sections.items() if k not in drop}
        return Phase(name, sections, dict(self.resident), bar_gib, list(self.notes))

    def as_dict(self) -> dict:
        peak = self.peak
        return {
            "phase": self.name, "peak_bytes": peak.total, "peak_gib": peak.total / GIB,
            "peak_section": self.peak_section,
            "weights_bytes": peak.weights, "grads_bytes": peak.grads, "optimizer_bytes": peak.optimizer,
            "ddp_buckets_bytes": peak.buckets, "activations_bytes": peak.activations,
            "bar_gib": self.bar_gib, "met": self.met, "resident_bytes": self.resident,
            "sections": {k: {**asdict(b), "activations": b.activations} for k, b in self.sections.items()},
            "notes": self.notes,
        }


def erasure_phase(name: str, traced, optimizer: str, bar: float | None) -> Phase:
    sections, resident, _ = traced
    other = OPT_SECTIONS["foreach" if optimizer == "fused" else "fused"]
    return Phase(name, sections, dict(resident), bar).renamed(name, bar, drop=(other,))


def estimate(setup: Setup, log=print) -> list[Phase]:
    """Every phase of the issue's list, after the fixes and (where something changed) before them."""
    began = time.perf_counter()
    tick = lambda what: log(f"  traced {what} ({time.perf_counter() - began:.1f} s)")  # noqa: E731
    bars = _bars(setup)
    esd = trace_erasure(setup, conditions=2)
    tick("ESD step")
    ddp_view, ddp_copy = (ddp_step(setup, esd, mode) for mode in ("view", "copy"))
    tick("DDP steps")
    negatives = setup.concept_prompts + setup.rounds * setup.concept_prompts
    reo_teacher = trace_erasure(setup, conditions=1 + setup.anchors_per_step + negatives, parts=("teacher",))
    reo = ({**esd[0], "teacher": reo_teacher[0]["teacher"]}, esd[1], esd[2])
    tick("REO teacher")
    # the attacked UNet is the erased student itself (checkpointing on) or, with LoRA, the plain UNet
    # merged_unet builds from the config: gradient checkpointing off
    ste_attack = trace_token_attack(setup, setup.inversion_batch, adamw=True,
                                    checkpointing=setup.gradient_checkpointing and not setup.lora_enabled)
    tick("STE attack")
    unet_bf16 = esd[1]["base UNet"]
    adamw_state = esd[0][OPT_SECTIONS["fused"]].optimizer
    gallery = round_up(setup.gallery_size * 4 * latent_size(setup) ** 2 * 4)  # fp32 latents
    if setup.lora_enabled:
        merge = trace_lora_merge(setup)
        tick("LoRA merge")
        return _lora_phases(setup, esd, ddp_view, ddp_copy, reo, reo_name_of(setup, negatives), ste_attack, merge,
                            gallery, tick)

    phases = [erasure_phase("ESD-u, 1 GPU", esd, "fused", bars.get("esd")),
              erasure_phase("ESD-u, 1 GPU — before: foreach AdamW", esd, "foreach", None),
              erasure_phase("ESD-u, 4-process DDP, per GPU (bucket view, fused)", ddp_view, "fused", bars.get("ddp")),
              erasure_phase("ESD-u, DDP — bucket view, foreach AdamW", ddp_view, "foreach", None),
              erasure_phase("ESD-u, DDP — buckets as copies, fused AdamW", ddp_copy, "fused", None),
              erasure_phase("ESD-u, DDP — before: buckets as copies, foreach AdamW", ddp_copy, "foreach", None)]
    for k in range(setup.rounds):
        phases += _ste_round(setup, k, esd, ste_attack, unet_bf16, adamw_state, gallery)
    reo_name = reo_name_of(setup, negatives)
    phases.append(erasure_phase(reo_name, reo, "fused", bars.get("reo")))
    phases.append(erasure_phase(reo_name + " — before: every round's UNet + AdamW kept, foreach", reo, "foreach",
                                None).with_resident("kept STE UNets + AdamW states", setup.rounds * unet_bf16,
                                                    setup.rounds * adamw_state))
    phases += _evaluation(setup, tick)
    return phases


def reo_name_of(setup: Setup, negatives: int) -> str:
    return f"REO after {setup.rounds} rounds (teacher batch {1 + setup.anchors_per_step + negatives}×{setup.batch})"


LORA_ERASE_NOTE = ("LoRA: no teacher UNet; the teacher is the fp32 student with its adapter disabled, run under "
                   "autocast; grads and AdamW state are the adapter's only")


def _lora_phases(setup: Setup, esd, ddp_view, ddp_copy, reo, reo_name: str, attack, merge, gallery,
                 tick) -> list[Phase]:
    """method.lora.enabled: what the real code keeps resident (stereo.recipes.stereo, stereo.erasure.subsets).

    - every erasure: the pipeline (its UNet = the base, model.dtype) + make_student's fp32 copy of the UNet it
      starts from + the adapter, its grads and AdamW state; the teacher is the student, adapter disabled;
    - STE round k ends with `frozen(student)`: the adapter folded into a NEW plain fp32 UNet (merged_unet:
      the student, the deltas and merged weights of every targeted layer, and the new UNet at once);
    - STE round k's attack: that plain fp32 UNet (no gradient checkpointing: it is built from the config),
      and for k >= 1 round k-1's, still held by the STE loop (`unet` is the next round's start);
    - STE round k >= 1's erase: round k-1's plain fp32 UNet stays resident beside the student copied from it;
    - REO ends with export (merged_unet) and samples (frozen_copy: merge + a model.dtype copy).
    """
    bars = _bars(setup)
    erased_fp32 = merge[1]["merged plain UNet (fp32)"]
    merge_erased = {k: v for k, v in merge[0].items() if k == MERGE_SECTIONS["erased"]}
    phases = [erasure_phase("ESD-u, 1 GPU", esd, "fused", bars.get("esd")),
              erasure_phase("ESD-u, 4-process DDP, per GPU (bucket view, fused)", ddp_view, "fused", bars.get("ddp")),
              erasure_phase("ESD-u, DDP — buckets as copies, fused AdamW", ddp_copy, "fused", None)]
    phases[0].notes.append(LORA_ERASE_NOTE)
    phases.insert(1, Phase("ESD-u end: export + samples (adapter folded in: merged_unet, frozen_copy)", merge[0],
                           dict(merge[1]), bars.get("esd"), ["stereo/recipes/esd.py: ctx.export (export.formats with "
                                                             "unet/pipeline) and save_samples, after training"]))
    previous = "round k-1's erased UNet (merged, fp32; held by the STE loop)"
    for k in range(setup.rounds):
        erase = erasure_phase(f"STE round {k} erase", esd, "fused", bars.get("ste"))
        erase = erase.with_resident("gallery latents", gallery).with_resident(previous, erased_fp32 if k else 0)
        fold = Phase(f"STE round {k} end: adapter folded in (frozen → merged_unet)", merge_erased, dict(merge[1]),
                     bars.get("ste"), ["merged_unet holds the student, every targeted layer's delta and merged "
                                       "weight, and the new plain fp32 UNet at once"])
        fold = fold.with_resident("gallery latents", gallery).with_resident(previous, erased_fp32 if k else 0)
        sections, resident = attack
        hit = Phase(f"STE round {k} attack (concept inversion, merged UNet: no checkpointing)", sections,
                    dict(resident), bars.get("ste"), ["the attacked UNet is merged_unet's new plain UNet: gradient "
                                                      "checkpointing is not enabled on it"])
        hit = hit.with_resident("gallery latents", gallery).with_resident(
            "erased UNets of rounds k-1 and k (merged, fp32)", (2 if k else 1) * erased_fp32).with_resident(
            "fp32 attack activations (traced in bf16, counted twice)", sections["attack step"].activations)
        phases += [erase, fold, hit]
    phases.append(erasure_phase(reo_name, reo, "fused", bars.get("reo")))
    phases.append(Phase("REO end: export + samples (adapter folded in: merged_unet, frozen_copy)", merge[0],
                        dict(merge[1]), bars.get("reo")))
    phases += _evaluation(setup, tick)
    for phase in phases[-5:]:
        phase.notes.append("LoRA does not change evaluation: the evaluated model is the exported merged UNet")
    return phases


def ddp_step(setup: Setup, esd, mode: str):
    """DDP: only the student's forward/backward and the optimiser step change; before them the grads
    are None and the buckets, allocated once, are simply there (a constant offset)."""
    traced, resident, trainable = trace_erasure(setup, 2, ddp=mode, parts=("student forward+backward", "optimizer"))
    buckets = traced[OPT_SECTIONS["fused"]].buckets
    early = {k: b.plus(buckets=buckets) for k, b in esd[0].items() if k in ("x_t chain", "teacher")}
    return {**early, **traced}, resident, trainable


def _bars(setup: Setup) -> dict[str, float]:
    """Issue 11's bars (GiB) are SD 1.4 figures; other models are estimated without a bar."""
    return BARS_GIB if setup.model == "sd14-random" else {}


def _ste_round(setup, k, esd, attack, unet_bf16, adamw_state, gallery) -> list[Phase]:
    bars = _bars(setup)
    unet_fp32 = 2 * unet_bf16  # STE's erased UNets keep the student's fp32 weights (the STE recipe)
    erase = erasure_phase(f"STE round {k} erase", esd, "fused", bars.get("ste"))
    erase = erase.with_resident("gallery latents", gallery).with_resident(
        "teacher (round k-1's erased UNet, fp32)", unet_fp32 if k else 0)
    before = erasure_phase(f"STE round {k} erase — before: earlier rounds kept, foreach", esd, "foreach", None)
    before = before.with_resident("gallery latents", gallery).with_resident(
        "kept earlier rounds' UNets (one is the teacher) + AdamW", k * unet_bf16, k * adamw_state)
    sections, resident = attack
    hit = Phase(f"STE round {k} attack (concept inversion)", sections, dict(resident), bars.get("ste"))
    hit = hit.with_resident("gallery latents", gallery).with_resident(
        "erased UNets of rounds k-1 and k (fp32)", (2 if k else 1) * unet_fp32).with_resident(
        "fp32 attack activations (traced in bf16, counted twice)", sections["attack step"].activations)
    hit_before = Phase(f"STE round {k} attack — before", sections, dict(resident)).with_resident(
        "gallery latents", gallery).with_resident("kept UNets + AdamW of rounds 0..k", (k + 1) * unet_bf16,
                                                  (k + 1) * adamw_state)
    return [erase, before, hit, hit_before]


def _evaluation(setup: Setup, tick) -> list[Phase]:
    """Evaluating an erased model: its pipeline with the base pipeline beside it (galleries, Ring-A-Bell)."""
    phases = []
    runs = [("concept inversion", lambda: trace_token_attack(setup, setup.eval_inversion_batch, checkpointing=False,
                                                              adamw=True)),
            ("soft prompt", lambda: trace_token_attack(setup, setup.eval_soft_prompt_batch, checkpointing=False,
                                                        adamw=False)),
            ("UnlearnDiffAtk", lambda: trace_unlearndiffatk(setup)),
            ("Ring-A-Bell", lambda: trace_ring_a_bell(setup)),
            ("generation", lambda: trace_generation(setup))]
    for name, run in runs:
        sections, resident = run()
        tick(name)
        pipe = sum(resident[k] for k in ("text encoder", "VAE", "base UNet"))
        label = f"evaluation: {name}" if name == "generation" else f"evaluation attack: {name}"
        phases.append(Phase(label, sections, resident).with_resident("the other pipeline (base / evaluated)", pipe))
    return phases
