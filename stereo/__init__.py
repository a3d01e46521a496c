"""stereo: adversarially robust concept erasure for text-to-image diffusion models.

STEREO (Srivatsan et al., CVPR 2025): STE searches for adversarial embeddings that revive an
erased concept; REO erases the concept and all of them at once, keeping anchor concepts.
"""

__version__ = "0.1.0"
