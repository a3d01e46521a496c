"""benchmarks.memory: the traced peak-memory estimate behind issue 11's memory bars.

The tracker must count a known tensor program exactly; the CUDA emulation must allocate what
CUDA's autocast and fused attention allocate; on the tiny model the parameter, gradient and AdamW
bytes must equal their formulas, and the orderings the fixes rely on must hold (foreach AdamW >
fused by exactly one fp32 copy of the trainable parameters; DDP buckets as copies > as views).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from benchmarks.memory import memtrace
from benchmarks.memory.cli import main
from benchmarks.memory.configs import read_setup
from benchmarks.memory.phases import Phase, ddp_step, erasure_phase
from benchmarks.memory.report import estimates_json
from benchmarks.memory.training import MERGE_SECTIONS, OPT_SECTIONS, trace_erasure, trace_lora_merge
from stereo.erasure.subsets import make_student, subset_parameter_names
from stereo.models.tiny import tiny_unet


def test_tracker_counts_a_known_program_exactly():
    tracker = memtrace.MemoryTracker(block=1)
    with torch.device("meta"), tracker:
        a = torch.empty(1000)  # 4000 bytes
        b = a * 2  # +4000
        view = b[:10]  # a view: no new storage
        assert (tracker.live, tracker.peak) == (8000, 8000)
        del b
        assert tracker.live == 8000  # the view keeps b's storage alive
        del view
        assert tracker.live == 4000
        with tracker.section("half"):
            c = a.to(torch.bfloat16)  # 2000
            d = c + 1  # 2000
            del c, d
        assert tracker.sections["half"].start == 4000 and tracker.sections["half"].peak == 8000
        assert tracker.live == 4000 and tracker.peak == 8000
        e = torch.empty(3)  # 12 bytes, rounded to one 512-byte block by the CUDA allocator's rule
    assert memtrace.round_up(12) == 512 and memtrace.round_up(513) == 1024
    assert tracker.bytes_at(tracker.peak_clock, [a, e]) == 4000  # e did not exist at the peak


def test_tracker_ignores_host_tensors():
    tracker = memtrace.MemoryTracker(block=1)
    with torch.device("meta"), tracker:
        torch.empty(10, device="cpu")
        kept = torch.empty(10)
    assert tracker.live == 40 and kept.device.type == "meta"


def test_cuda_autocast_lists_and_weight_cache():
    cuda = memtrace.CudaSemantics()
    weight = torch.nn.Parameter(torch.empty(8, 8, device="meta"))
    frozen = torch.empty(8, 8, device="meta")
    x = torch.empty(2, 8, device="meta")
    with cuda, cuda.autocast():
        y = F.linear(x, weight)
        assert y.dtype == torch.bfloat16  # matmuls in bf16
        assert F.group_norm(torch.empty(2, 8, 4, 4, device="meta", dtype=torch.bfloat16), 2).dtype == torch.float32
        assert F.layer_norm(y, (8,)).dtype == torch.float32  # norms in fp32 on CUDA (not on CPU autocast)
        assert len(cuda._cache) == 1  # the trainable leaf's bf16 cast is cached for the region
        F.linear(x, frozen)
        assert len(cuda._cache) == 1  # a frozen weight is cast on every use, never cached
    assert cuda._cache is None
    with cuda:
        assert F.linear(x, weight).dtype == torch.float32  # outside autocast nothing is cast


def test_fused_attention_never_materialises_the_score_matrix():
    tracker, cuda = memtrace.MemoryTracker(block=1), memtrace.CudaSemantics()
    length, dim = 4096, 40
    with torch.device("meta"), tracker, cuda:
        q = torch.empty(1, 1, length, dim, dtype=torch.bfloat16, requires_grad=True)
        out = F.scaled_dot_product_attention(q, q, q)
        qkv = length * dim * 2
        assert tracker.live - qkv == qkv + length * 4  # output + fp32 log-sum-exp
        out.sum().backward()
    assert tracker.peak < length * length * 2  # an L x L bf16 matrix alone would be larger
    assert out.shape == q.shape and q.grad.shape == q.shape


@pytest.fixture(scope="module")
def tiny():
    setup = read_setup("tiny")
    return setup, trace_erasure(setup, conditions=2)


def _bytes(numels, element_size):
    return sum(memtrace.round_up(n * element_size) for n in numels)


def test_weights_grads_and_adamw_bytes_match_their_formulas(tiny):
    setup, (sections, resident, trainable) = tiny
    unet = tiny_unet()
    names = set(subset_parameter_names(unet, setup.subset))
    trainable_numels = [p.numel() for n, p in unet.named_parameters() if n in names]
    assert setup.subset == "noxattn" and trainable == _bytes(trainable_numels, 4)
    assert resident["student UNet (fp32)"] == _bytes([p.numel() for p in unet.parameters()], 4)
    assert resident["base UNet"] == _bytes([p.numel() for p in unet.parameters()], 2)  # model.dtype bf16
    step = sections[OPT_SECTIONS["fused"]]
    steps_bytes = len(trainable_numels) * memtrace.CUDA_BLOCK  # fused AdamW: one fp32 device scalar each
    assert step.optimizer == 2 * trainable + steps_bytes  # exp_avg + exp_avg_sq in fp32
    assert step.grads == trainable
    assert step.weights == sum(resident.values())


def test_foreach_adamw_needs_one_fp32_copy_of_the_trainable_parameters_more(tiny):
    _, (sections, _, trainable) = tiny
    fused, foreach = sections[OPT_SECTIONS["fused"]], sections[OPT_SECTIONS["foreach"]]
    assert foreach.total - fused.total == trainable  # torch._foreach_sqrt(exp_avg_sqs); fused works in place


def test_ddp_buckets_as_copies_cost_more_than_views(tiny):
    setup, esd = tiny
    view = ddp_step(setup, esd, "view")[0]
    copy = ddp_step(setup, esd, "copy")[0]
    unet = tiny_unet()
    names = set(subset_parameter_names(unet, setup.subset))
    grads = sum(p.numel() * 4 for n, p in unet.named_parameters() if n in names)  # fp32, unrounded
    peak = lambda sections: max(b.total for k, b in sections.items() if k != OPT_SECTIONS["foreach"])  # noqa: E731
    assert peak(copy) > peak(view) >= peak(esd[0])
    assert copy["student forward+backward"].buckets == view["student forward+backward"].buckets
    assert grads <= view["student forward+backward"].buckets < grads + memtrace.CUDA_BLOCK * 4  # 25 MiB buckets
    assert view["student forward+backward"].grads == 0  # with views the grads are the buckets


def test_resident_tensors_add_a_constant_offset_to_the_peak(tiny):
    _, esd = tiny
    phase = erasure_phase("ESD-u, 1 GPU", esd, "fused", bar=18.0)
    bigger = phase.with_resident("kept UNet", weights=1000, optimizer=24)
    assert bigger.peak.total == phase.peak.total + 1024 and bigger.peak_section == phase.peak_section


def test_a_phase_meets_its_bar_only_when_its_peak_is_below_it(tiny):
    _, esd = tiny
    phase = erasure_phase("ESD-u, 1 GPU", esd, "fused", bar=18.0)
    assert phase.met and not Phase("x", phase.sections, {}, bar_gib=1e-9).met


def test_json_row_reports_the_peak_the_bar_and_only_the_chosen_optimizer(tiny):
    _, esd = tiny
    phase = erasure_phase("ESD-u, 1 GPU", esd, "fused", bar=18.0)
    row = estimates_json([phase], read_setup("tiny"))["phases"]["ESD-u, 1 GPU"]
    assert row["peak_bytes"] == phase.peak.total and row["bar_gib"] == 18.0 and row["met"] is True
    assert OPT_SECTIONS["foreach"] not in row["sections"]  # the fused row ignores the foreach step


@pytest.mark.slow
def test_cli_writes_every_phase_as_json(tmp_path):
    out = tmp_path / "estimate.json"
    assert main(["--model", "tiny", "--no-write", "--json", str(out)]) == 0
    phases = json.loads(out.read_text())["phases"]
    assert {"ESD-u, 1 GPU", "STE round 1 erase", "evaluation: generation"} <= set(phases)
    assert all(p["peak_gib"] > 0 for p in phases.values())


# --- method.lora.enabled: the student is make_student's (fp32 copy + peft adapter), the teacher that student ---
@pytest.fixture(scope="module")
def tiny_lora():
    setup = read_setup("tiny", overrides=("method.lora.enabled=true", "method.lora.rank=2"))
    return setup, trace_erasure(setup, conditions=2)


def _real_lora_student(setup):
    """The real code's student, on real (CPU) tensors: make_student on the pipeline's model.dtype UNet."""
    base = tiny_unet().to(setup.frozen).requires_grad_(False)
    student, teacher, names = make_student(base, setup.subset, setup.lora)
    return student, teacher, set(names)


def test_lora_settings_are_read_from_the_config(tiny_lora):
    setup, _ = tiny_lora
    assert setup.lora_enabled and setup.lora_rank == 2 and setup.subset == "noxattn"
    assert not read_setup("tiny").lora_enabled


def test_lora_resident_weights_grads_and_adamw_match_the_real_student(tiny, tiny_lora):
    setup, (sections, resident, trainable) = tiny_lora
    student, teacher, names = _real_lora_student(setup)
    assert teacher is None  # the real code keeps no teacher UNet with LoRA
    adapter = [p.numel() for n, p in student.named_parameters() if n in names]
    base = [p.numel() for n, p in student.named_parameters() if n not in names] + [b.numel() for b in student.buffers()]
    assert adapter and trainable == _bytes(adapter, 4)
    assert resident == {  # the pipeline (its UNet: model.dtype) + the fp32 student + its adapter; nothing else
        "text encoder": resident["text encoder"], "VAE": resident["VAE"],
        "base UNet": _bytes([p.numel() for p in tiny_unet().parameters()], 2),
        "student UNet (fp32, frozen base of the adapter)": _bytes(base, 4),
        "LoRA adapter (rank 2, fp32)": trainable,
    }
    step = sections[OPT_SECTIONS["fused"]]
    assert step.grads == trainable and step.optimizer == 2 * trainable + len(adapter) * memtrace.CUDA_BLOCK
    assert step.weights == sum(resident.values())
    assert sections["teacher"].weights == step.weights  # the teacher is the student, adapter disabled
    full = tiny[1][0][OPT_SECTIONS["fused"]]
    assert 10 * (step.grads + step.optimizer) < full.grads + full.optimizer  # the adapter's, not the subset's


def test_lora_rank_scales_the_adapter_only(tiny_lora):
    setup, (_, resident, trainable) = tiny_lora
    wider = read_setup("tiny", overrides=("method.lora.enabled=true", "method.lora.rank=4"))
    _, wider_resident, wider_trainable = trace_erasure(wider, conditions=2, parts=("teacher",))
    student, _, names = _real_lora_student(wider)
    assert wider_trainable == _bytes([p.numel() for n, p in student.named_parameters() if n in names], 4)
    assert trainable < wider_trainable < 2 * trainable + len(names) * memtrace.CUDA_BLOCK  # linear in the rank
    assert wider_resident["student UNet (fp32, frozen base of the adapter)"] == \
        resident["student UNet (fp32, frozen base of the adapter)"]


def test_lora_merge_holds_the_student_and_a_new_plain_fp32_unet(tiny_lora):
    setup, (_, resident, _) = tiny_lora
    sections, merged = trace_lora_merge(setup)
    plain = _bytes([p.numel() for p in tiny_unet().parameters()], 4)
    assert merged["merged plain UNet (fp32)"] == plain
    erased = sections[MERGE_SECTIONS["erased"]]
    assert erased.grads == erased.optimizer == 0  # the trainer is closed before frozen(student)
    assert erased.weights == sum(resident.values()) + plain
    assert erased.total > erased.weights  # the deltas and merged weights of the targeted layers on top


@pytest.mark.slow
def test_cli_with_lora_reports_the_merge_and_no_teacher_unet(tmp_path):
    out = tmp_path / "estimate.json"
    assert main(["--model", "tiny", "--no-write", "--json", str(out), "method.lora.enabled=true"]) == 0
    phases = json.loads(out.read_text())["phases"]
    assert "STE round 1 end: adapter folded in (frozen → merged_unet)" in phases
    assert not any("before" in name for name in phases)
    assert all("teacher" not in k for k in phases["ESD-u, 1 GPU"]["resident_bytes"])
