"""Closed-run settings: where the secret comes from, and the errors that say what to fix."""

from __future__ import annotations

import pytest

from hyphae.node.config import ConfigError, config_to_json, load_config
from hyphae.node.run_admission import load_admission


def test_secret_from_env_or_file_and_never_in_the_shown_config(tmp_path) -> None:
    secret = tmp_path / "s"
    secret.write_text("x" * 40 + "\n")
    secret.chmod(0o600)
    config = load_config(env={}, flags={"run_secret_file": str(secret), "data_dir": str(tmp_path)})
    admission, creator = load_admission(config, env={})
    assert admission.closed and admission.key is not None and creator is None
    assert "x" * 40 not in str(config_to_json(config))
    from_env, _ = load_admission(load_config(env={}, flags={}), env={"HYPHAE_RUN_SECRET": "y" * 32})
    assert from_env.closed and from_env.key != admission.key
    assert not load_admission(load_config(env={}, flags={}), env={})[0].closed


@pytest.mark.parametrize("content, message", [(None, "cannot read run_secret_file"), ("", "is empty"),
                                              ("short", "at least 16")])
def test_bad_secret_files_say_what_to_fix(tmp_path, content, message) -> None:
    path = tmp_path / "s"
    if content is not None:
        path.write_text(content)
        path.chmod(0o600)
    with pytest.raises(ConfigError, match=message):
        load_admission(load_config(env={}, flags={"run_secret_file": str(path)}), env={})


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o660])
def test_a_secret_file_others_may_read_or_write_is_refused_with_the_chmod_to_run(tmp_path, mode) -> None:
    path = tmp_path / "s"
    path.write_text("x" * 40)
    path.chmod(mode)
    with pytest.raises(ConfigError, match=rf"permissions {mode:04o} .* too open.*chmod 600 {path}"):
        load_admission(load_config(env={}, flags={"run_secret_file": str(path)}), env={})
    path.chmod(0o400)  # owner-only, even read-only, is fine
    assert load_admission(load_config(env={}, flags={"run_secret_file": str(path)}), env={})[0].closed


def test_a_missing_allowlist_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read the allowlist"):
        load_admission(load_config(env={}, flags={"run_allowlist": str(tmp_path / "none.json")}), env={})
