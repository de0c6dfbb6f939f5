"""Loading config.yaml, and starting the real `python proxy.py` process."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from keystile.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_shipped_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYSTILE_MASTER_KEY", "sk-local-master-key-change-me")

    config = load_config(ROOT / "config.yaml")

    assert config.model_names == ["gpt-3.5-turbo"]
    assert config.deployments[0].provider == "mock"
    assert config.service_account_params == ("user",)
    assert config.master_key == "sk-local-master-key-change-me"
    assert config.database_path == ROOT / "keystile.db"


def test_environment_references_and_relative_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UPSTREAM_KEY", "sk-upstream")
    path = write(tmp_path, """
model_list:
  - model_name: m
    litellm_params: {model: openai/m, api_base: "http://127.0.0.1:1/v1/", api_key: os.environ/UPSTREAM_KEY}
general_settings:
  database_url: sqlite:///data/keys.db
""")

    config = load_config(path)

    assert config.deployments[0].api_key == "sk-upstream"
    assert config.deployments[0].api_base == "http://127.0.0.1:1/v1"
    assert config.database_path == tmp_path / "data" / "keys.db"
    assert config.master_key is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model_list: [", "line 1"),
        ("model_list: {}", "model_list: must be a list"),
        ("general_settings: {master_key: sk-short}", "master_key: must start with sk- and be at least 20"),
        ("general_settings: {master_key: os.environ/NOT_SET_ANYWHERE}",
         "general_settings.master_key: environment variable NOT_SET_ANYWHERE is not set"),
        ("model_list: [{model_name: m, litellm_params: {model: bedrock/x}}]",
         "model_list[0].litellm_params.model: must be openai/<model>"),
        ("model_list: [{model_name: m, litellm_params: {model: openai/x, timeout: soon}}]",
         "model_list[0].litellm_params.timeout: must be a number, got a string"),
        ("general_settings: {database_url: 'postgresql://x'}", "only SQLite"),
        ("general_settings: {enforced_params: [user, '']}", "enforced_params[1]"),
    ],
)
def test_bad_files_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)


def test_unknown_keys_are_warned_about_not_dropped_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, "litellm_settings: {drop_params: true}\n"
                           "general_settings: {alerting: [slack]}\n")

    with caplog.at_level(logging.WARNING):
        load_config(path)

    assert "general_settings.alerting is not understood" in caplog.text
    assert "litellm_settings.drop_params is not understood" in caplog.text


def _run(args: list[str], env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "proxy.py"), *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_bad_config_exits_2_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, "general_settings: {master_key: 12}\n")

    result = _run(["--config", str(path)], dict(os.environ))

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"error: {path}: general_settings.master_key: must be a string, got a number"
    )


def test_startup_logs_address_models_database_and_no_secret(tmp_path: Path) -> None:
    path = write(tmp_path, """
model_list:
  - model_name: gpt-3.5-turbo
    litellm_params: {model: openai/gpt-3.5-turbo, api_base: "http://127.0.0.1:9/v1", api_key: sk-upstream-secret-zzzz}
general_settings:
  master_key: os.environ/KEYSTILE_MASTER_KEY
""")
    env = dict(os.environ, KEYSTILE_MASTER_KEY="sk-master-secret-value-0123")
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "proxy.py"), "--config", str(path), "--host", "127.0.0.1",
         "--port", "0", "--db", str(tmp_path / "k.db")],
        env=env, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
    finally:
        process.terminate()
        _, rest = process.communicate(timeout=20)

    assert re.search(r"listening on http://127\.0\.0\.1:\d+ models=gpt-3.5-turbo "
                     r"database=.*k\.db", line), line
    assert process.returncode == 0
    output = line + rest
    assert "sk-master-secret" not in output and "sk-upstream-secret" not in output
