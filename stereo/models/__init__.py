"""Model construction and loading: SD 1.4, 1.5, 2.1, 2.1-base and SDXL (hub id, local folder, single file),
tiny, sd14-random, toy; tiny rehearsals of each family (stereo.models.families)."""

from __future__ import annotations


def assemble_pipeline(*, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None,
                      feature_extractor=None):
    """A `StableDiffusionPipeline` of built components; without a safety checker (stereo's default:
    detectors judge the images) it is not required and no feature extractor is needed.

    Keyword-only, so each caller builds its components in its own order (the order of a seeded
    random build decides the weights).
    """
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=safety_checker, feature_extractor=feature_extractor,
        requires_safety_checker=safety_checker is not None,
    )
