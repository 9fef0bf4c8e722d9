"""scripts/make_venv.py: uv sees the packages pip is configured to see, and bad arguments get a usage line."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_venv.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_venv", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pips_configuration_from_the_environment_wins_over_its_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Prepare: a configuration file naming one find-links directory, the environment another
    config = tmp_path / "pip.conf"
    config.write_text(
        "[global]\nfind-links = /from/file\nextra-index-url = file:///a/simple file:///b/simple\n"
    )
    monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
    monkeypatch.setenv("PIP_FIND_LINKS", "/from/env")
    make_venv = load_script()

    # Execute
    found = make_venv.pip_config(Path(sys.executable))

    # Assert
    assert found["find-links"] == "/from/env"
    assert found["extra-index-url"] == "file:///a/simple file:///b/simple"


def test_every_source_pip_knows_is_passed_to_uv() -> None:
    make_venv = load_script()
    config = {
        "index-url": "https://mirror.example/simple",
        "extra-index-url": "file:///a/simple file:///b/simple",
        "find-links": "/opt/wheels",
        "constraint": "/etc/constraints.txt",
        "cert": "/etc/ssl/ca.pem",
        "timeout": "60",  # nothing uv needs
    }

    args, env = make_venv.uv_arguments(config)

    assert args == [
        "--index-strategy", "unsafe-best-match",
        "--default-index", "https://mirror.example/simple",
        "--extra-index-url", "file:///a/simple",
        "--extra-index-url", "file:///b/simple",
        "--find-links", "/opt/wheels",
        "--constraints", "/etc/constraints.txt",
    ]  # fmt: skip
    assert env == {"SSL_CERT_FILE": "/etc/ssl/ca.pem"}
    assert make_venv.uv_arguments({"no-index": "true"})[0][-1] == "--no-index"


@pytest.mark.parametrize("argv", [[], [".venv"], [".venv", "cloud", "extra"]])
def test_wrong_arguments_get_a_usage_line(argv: list[str]) -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True)

    assert run.returncode == 2
    assert run.stderr.startswith("usage: python3 scripts/make_venv.py VENV EXTRAS")
