"""Erase a concept: `python train.py concept=church` (see conf/train.yaml and README)."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from stereo.config import register_configs

register_configs()


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from stereo.recipes import train

    cfg.output_dir = HydraConfig.get().runtime.output_dir  # per-job folder in --multirun sweeps
    if cfg.model.kind == "toy":  # the toy world's detector scores the end-of-run utility check
        from stereo.toy import detector

        detector.register()
    train(cfg)


if __name__ == "__main__":
    main()
