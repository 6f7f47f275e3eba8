"""The [training] config: validated without importing torch, in step with the algorithm registry."""

import pytest

from hyphae.node.config import ConfigError, load_config
from hyphae.node.training_config import ALGORITHMS, PRESETS, TrainConfig


def test_algorithm_names_match_the_training_registry() -> None:
    from hyphae.training.algorithms import ALGORITHMS as REGISTRY

    assert set(ALGORITHMS) == set(REGISTRY)


def test_preset_names_match_the_training_presets() -> None:
    from hyphae.training import PRESETS as MODELS

    assert set(PRESETS) == set(MODELS)


def test_real_model_settings_reach_the_training_config(tmp_path) -> None:
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    path = tmp_path / "c.toml"
    path.write_text(f'[training]\nmodel = "{model}"\ngrad_accum = 4\nprecision = "bf16"\n'
                    'activation_checkpointing = true\ntext_field = "content"\n')
    cfg = load_config(file=path, env={}, flags={"training.compile": True}).training
    assert (cfg.model, cfg.grad_accum, cfg.precision, cfg.text_field) == (model, 4, "bf16", "content")
    assert cfg.activation_checkpointing and cfg.compile and cfg.tokenizer is None


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
        ({"preset": "llama-7b"}, "preset must be one of"),
        ({"grad_accum": 0}, "grad_accum must be >= 1"),
        ({"precision": "fp16"}, "precision must be one of auto, fp32, bf16"),
        ({"compile": "yes"}, "compile must be true or false"),
        ({"text_field": ""}, "text_field must be a non-empty string"),
        ({"model": "/nonexistent/model"}, "must be a directory holding config.json"),
        ({"tokenizer": "/nonexistent/tok.json"}, "must be a tokenizer.json file"),
        ({"model": 3}, "model must be a path"),
    ],
)
def test_bad_training_values_are_refused(table: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(table)
