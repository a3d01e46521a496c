"""ESD recipe (Gandikota et al. 2023): erase the selected concept prompts from the base UNet."""

from __future__ import annotations

from stereo.erasure.session import Session
from stereo.erasure.trainer import ErasureTrainer, ESDObjective


def run_esd(session: Session) -> dict:
    """Fine-tune the configured subset toward eps_0(∅) - eta (eps_0(c) - eps_0(∅)); export the result."""
    cfg = session.cfg
    prompts = session.concept_prompts()
    objective = ESDObjective(negatives=session.encode(prompts), uncond=session.encode([""])[0], eta=cfg.method.eta)
    student, teacher, names = session.make_student()
    with ErasureTrainer(
        session.accelerator, student, teacher, session.pipe.scheduler, objective, session.trainer_settings(),
        checkpoint_dir=session.output_dir / "checkpoints", on_log=session.log,
        on_sample=session.sampler(prompts, "esd"),
    ) as trainer:
        result = trainer.run()
        unet = session.accelerator.unwrap_model(trainer.student).eval()
    export_dir = session.export(unet, names, erased=prompts, final_loss=result.losses[-1] if result.losses else None)
    samples = session.save_samples(unet, prompts, "esd")
    return {"export_dir": export_dir, "samples": samples, "losses": result.losses,
            "local_losses": result.local_losses, "unet": unet,
            "trainable": names, "seconds": result.seconds}
