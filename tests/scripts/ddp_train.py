"""Run by tests/test_distributed.py under torchrun: train on 2 CPU processes, report per rank."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from stereo.train import train  # noqa: E402
from tests.conftest import FAST, compose  # noqa: E402


def main(out: Path) -> None:
    cfg = compose(FAST + ["method=esd", "concept=church", f"output_dir={out / 'run'}", "trainer.cpu=true",
                          "trainer.steps=2", "trainer.lr=1e-3", "export.formats=[delta]"])
    result = train(cfg)
    from accelerate import PartialState

    state = PartialState()
    unet = result["unet"]
    checksum = float(sum(p.double().sum() * (i + 1) for i, p in enumerate(unet.parameters())))
    (out / f"rank{state.process_index}.json").write_text(json.dumps({
        "num_processes": state.num_processes, "checksum": checksum, "first_loss": result["local_losses"][0],
        "moved": bool(result["losses"]),
    }))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
