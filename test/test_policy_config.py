"""Controller config: file + env overrides, and one-line errors naming the key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lynx_policy.config import ConfigError, load_config, read_admin_token
from lynx_policy.throttle import Backoff

TOML = """
mode = "adaptive"
[[slo]]
metric = "itl"
quantile = 0.99
target_ms = 80
[[slo]]
metric = "ttft"
quantile = 0.9
target_ms = 2000
[link]
bind = "tcp://0.0.0.0:5790"
plaintext_tcp = true
[observe]
prometheus_url = "http://prometheus:9090"
[policy]
name = "budget"
budgets = [{max_batch = 16, all_layers = 8}, {max_batch = 4096, all_layers = 6}]
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_toml_file_with_env_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "c.toml", TOML)
    config = load_config(path, environ={"LYNX_POLICY__LOOP__INTERVAL_S": "2.5",
                                        "LYNX_POLICY__ADMIN__HOST": "0.0.0.0",
                                        "LYNX_POLICY__ADAPTIVE__BUCKETS": "[8, 64]",
                                        "UNRELATED": "x"})
    assert config.mode == "adaptive"
    assert [(t.metric, t.target_ms) for t in config.slo] == [("itl", 80.0), ("ttft", 2000.0)]
    assert config.link.bind == "tcp://0.0.0.0:5790"
    assert config.policy.budgets[1].all_layers == 6
    assert config.loop.interval_s == 2.5 and config.admin.host == "0.0.0.0"
    assert config.adaptive.buckets == [8, 64]


def test_json_file_and_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "c.json", json.dumps({"mode": "static"})), environ={})
    assert config.mode == "static"
    assert config.link.bind == "ipc:///tmp/lynx-default.sock"
    assert config.admin.port == 5791
    assert load_config(None, environ={}).mode == "off"


@pytest.mark.parametrize(("text", "env", "expected"), [
    ('mode = "turbo"', {}, "$.mode"),
    ("[loop]\ninterval_s = -1", {}, "$.loop.interval_s"),
    ("[loop]\ninterval_s = 1", {"LYNX_POLICY__LOOP__INTERVAL_S": "soon"}, "$.loop.interval_s"),
    ("[link]\nbind = 'tcp://x'", {}, "tcp://host:port"),
    ("[link]\nbindd = 'ipc:///tmp/x.sock'", {}, "bindd"),
    ("[[slo]]\nmetric = 'itl'\n[[slo]]\nmetric = 'itl'", {}, "duplicate SLO"),
    ("[policy]\nname = 'budget'", {}, "needs at least one entry"),
    ("[policy]\nname='budget'\nbudgets=[{max_batch=8, all_layers=1}]", {}, "quality floor"),
    ("mode = ", {}, "not valid toml"),
    ("[adaptive]\nbuckets = [8, 8]", {}, "strictly increasing"),
    ("[observe]\nprometheus_url = 'prometheus:9090'", {}, "http://"),
])
def test_bad_config_is_one_line_naming_the_problem(tmp_path: Path, text: str,
                                                   env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "c.toml", text), environ=env)
    message = str(err.value)
    assert expected in message and "\n" not in message
    assert str(tmp_path / "c.toml") in message


def test_unreadable_and_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml", environ={})
    with pytest.raises(ConfigError, match=r"use \.toml or \.json"):
        load_config(write(tmp_path, "c.yaml", "mode: off"), environ={})


def test_admin_token_sources(tmp_path: Path) -> None:
    config = load_config(None, environ={})
    with pytest.raises(ConfigError, match="no admin token"):
        read_admin_token(config, environ={})
    with pytest.raises(ConfigError, match=">= 16 characters"):
        read_admin_token(config, environ={"LYNX_ADMIN_TOKEN": "short"})
    assert read_admin_token(config, environ={"LYNX_ADMIN_TOKEN": "x" * 20}) == "x" * 20
    token_file = write(tmp_path, "token", "file-token-0123456789\n")
    config = load_config(None, environ={"LYNX_POLICY__ADMIN__TOKEN_FILE": str(token_file)})
    assert read_admin_token(config, environ={}) == "file-token-0123456789"


def test_cli_reports_bad_config_in_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "c.toml", "[loop]\ninterval_s = 'often'\n")
    result = subprocess.run([sys.executable, "-m", "lynx_policy.cli", "serve", "--config",
                             str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "$.loop.interval_s" in result.stderr
    good = write(tmp_path, "ok.toml", TOML)
    result = subprocess.run([sys.executable, "-m", "lynx_policy.cli", "check-config",
                             "--config", str(good)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and json.loads(result.stdout)["mode"] == "adaptive"


def test_backoff_steps_and_recovers() -> None:
    backoff = Backoff([1.0, 2.0, 5.0])
    assert not backoff.degraded and not backoff.succeeded()
    assert [backoff.failed() for _ in range(5)] == [1.0, 2.0, 5.0, 5.0, 5.0]
    assert backoff.degraded and backoff.succeeded() and not backoff.degraded


def test_shipped_example_config_is_valid_and_documents_every_key() -> None:
    import lynx_policy
    from lynx_policy.config import ControllerConfig

    example = Path(lynx_policy.__file__).parent / "controller.example.toml"
    config = load_config(example, environ={})
    assert config.mode == "adaptive"
    text = example.read_text()
    for section in ControllerConfig.__struct_fields__:
        sub = getattr(config, section)
        if isinstance(sub, str) and section != "mode":
            assert f"# {section} = " in text, section  # top-level keys (ladder)
        for key in getattr(type(sub), "__struct_fields__", ()):
            if section not in ("policy", "slo"):
                assert f"\n{key} = " in text or f"# {key} = " in text, f"{section}.{key}"
