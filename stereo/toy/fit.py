"""The one training loop of the toy world's detector, CLIP and VAE: AdamW under a one-cycle learning rate.

(The UNet has its own loop in `diffusion.train_unet`: restarts, EMA, checkpoints.)
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch


def one_cycle_fit(parameters: Iterable[torch.nn.Parameter], steps: int, lr: float,
                  batch_loss: Callable[[], torch.Tensor], *, name: str, weight_decay: float = 0.0,
                  pct_start: float = 0.1, log_every: int = 100) -> None:
    """`steps` AdamW updates on `batch_loss()` (which draws its own batch), the learning rate rising to
    `lr` over the first `pct_start` of the steps and annealing after (one-cycle, Smith & Topin 2019).

    Prints `[name] step i/steps loss L` every `log_every` steps and at the last (0: never).
    """
    opt = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=pct_start)
    for step in range(steps):
        loss = batch_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"[{name}] step {step}/{steps} loss {loss.item():.4f}", flush=True)
