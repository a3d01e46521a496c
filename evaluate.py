"""Evaluate erased models under attack: `python evaluate.py concept=nudity attack=[none,ring_a_bell]`.

See conf/evaluate.yaml and docs/evaluation.md.
"""

import hydra
from omegaconf import DictConfig

from stereo.config import register_configs
from stereo.evaluation.config import register_eval_configs

register_configs()
register_eval_configs()


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from stereo.evaluation.runner import evaluate

    evaluate(cfg)


if __name__ == "__main__":
    main()
