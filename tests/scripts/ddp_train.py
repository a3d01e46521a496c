"""Run by tests/test_distributed.py under torchrun: train on 2 CPU processes, report per rank."""

import copy
import gc
import json
import os
import sys
import weakref
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from stereo.recipes import train  # noqa: E402
from tests.conftest import FAST, compose  # noqa: E402


def checksum(unet) -> float:
    return float(sum(p.double().sum() * (i + 1) for i, p in enumerate(unet.parameters())))


def gradient_syncs_with_accumulation(steps: int, grad_accum: int) -> dict:
    """ESD on the tiny UNet with gradient accumulation, counting how often DDP all-reduces the gradients.

    A comm hook sees every bucket of every all-reduce; bucket 0 is in each one, so its calls count syncs.
    Also reports whether closing the trainer freed the DDP wrapper (its gradient buckets) and the optimiser.
    """
    from accelerate import Accelerator
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from stereo.erasure.objectives import ESDObjective
    from stereo.erasure.subsets import select_trainable
    from stereo.erasure.trainer import ErasureTrainer, TrainerSettings
    from stereo.models.tiny import sd_scheduler, tiny_unet

    torch.manual_seed(0)
    teacher = tiny_unet()
    student = copy.deepcopy(teacher)
    select_trainable(student, "xattn")
    objective = ESDObjective(negatives=torch.randn(2, 77, 64), uncond=torch.randn(77, 64))
    settings = TrainerSettings(steps=steps, lr=1e-3, grad_accum=grad_accum, ddim_steps=4, latent_size=8)
    syncs = []

    def counting_allreduce(process_group, bucket):
        if bucket.index() == 0:
            syncs.append(1)
        return allreduce_hook(process_group, bucket)

    accelerator = Accelerator(cpu=True)
    with ErasureTrainer(accelerator, student, teacher, sd_scheduler(), objective, settings) as trainer:
        trainer.student.register_comm_hook(None, counting_allreduce)
        trainer.run()
        wrapper, optimizer = weakref.ref(trainer.student), weakref.ref(trainer.optimizer)
    gc.collect()
    return {"gradient_syncs": len(syncs), "accumulated_checksum": checksum(trainer.student),
            "released": wrapper() is None and optimizer() is None and not accelerator._models}


def main(out: Path) -> None:
    accumulation = gradient_syncs_with_accumulation(steps=2, grad_accum=2)  # before train() ends the process group
    cfg = compose(FAST + ["method=esd", "concept=church", f"output_dir={out / 'run'}", "trainer.cpu=true",
                          "trainer.steps=2", "trainer.lr=1e-3", "export.formats=[delta]"])
    result = train(cfg)  # ends the process group: read the rank from torchrun's environment
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps({
        "num_processes": int(os.environ["WORLD_SIZE"]), "checksum": checksum(result["unet"]),
        "first_loss": result["local_losses"][0], "moved": bool(result["losses"]), **accumulation,
    }))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
