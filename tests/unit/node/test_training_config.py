"""The [training] config: validated without importing torch, in step with the algorithm registry."""

import pytest

from hyphae.node.config import ConfigError, load_config
from hyphae.node.training_config import ALGORITHMS, TrainConfig


def test_algorithm_names_match_the_training_registry() -> None:
    from hyphae.training.algorithms import ALGORITHMS as REGISTRY

    assert set(ALGORITHMS) == set(REGISTRY)


def test_flags_and_file_reach_the_training_config(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[training]\nbatch_size = 4\n[training.algorithm_config]\ninner_steps = 20\n")
    cfg = load_config(file=path, env={}, flags={"training.max_steps": 50, "training.algorithm": "ddp"})
    assert cfg.training.batch_size == 4 and cfg.training.max_steps == 50
    assert cfg.training.algorithm == "ddp" and cfg.training.algorithm_config == {"inner_steps": 20}


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ({"batch": 4}, "unknown training setting"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"eval_every": -1}, "eval_every must be >= 0"),
        ({"seed": "x"}, "seed must be int"),
        ({"algorithm_config": 3}, "algorithm_config must be a table"),
    ],
)
def test_bad_training_values_are_refused(table: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(table)
