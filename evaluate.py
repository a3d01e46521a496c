"""Evaluate erased models under attack: `python evaluate.py concept=nudity attack=[none,ring_a_bell]`.

See conf/evaluate.yaml and docs/evaluation.md.
"""

import hydra
from omegaconf import DictConfig

from stereo.config import register_configs
from stereo.evaluation.config import register_eval_configs

register_configs()
register_eval_configs()


def register_toy_world() -> None:
    """The toy world's detector (`detector: {name: toy}`) and FID features (`metrics.fid.extractor=toy`)."""
    from stereo.toy import detector, features

    detector.register()
    features.register()


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from stereo.evaluation.runner import evaluate

    register_toy_world()
    evaluate(cfg)


if __name__ == "__main__":
    main()
