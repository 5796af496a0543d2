"""The console commands of ``[project.scripts]`` (``sa2va-train`` ...) are the apps' own
``main`` functions, so they take the same arguments as ``python -m sa2va.<app>``."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
APPS = ["train", "eval", "predict", "export", "plan", "compare", "bench", "nnunet"]


def scripts() -> dict[str, str]:
    """``[project.scripts]`` of pyproject.toml: command -> ``module:function``."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def test_every_app_is_a_console_command_calling_its_main():
    assert scripts() == {f"sa2va-{app}": f"sa2va.{app}:main" for app in APPS}
    for target in scripts().values():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), target


def test_a_hydra_app_run_as_a_console_command_keeps_its_job_name():
    """Hydra names the job (and its ``<job>.log``) after the calling module, so
    ``sa2va-plan`` writes the same run folder and log as ``python -m sa2va.plan``."""
    code = "import sys; from sa2va.plan import main; sys.argv[0] = 'sa2va-plan'; sys.exit(main())"
    result = subprocess.run(
        [sys.executable, "-c", code, "--cfg", "hydra"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "\n    name: plan\n" in result.stdout
