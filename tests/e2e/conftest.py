"""Fixtures of the CLI tests: an isolated environment for `triage` subprocesses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRIAGE_", "OPENAI_"))}
    env.update(
        TRIAGE_DATA_DIR=str(tmp_path / "data"),
        TRIAGE_REGISTRY_DIR=str(tmp_path / "registry"),
        TRIAGE_METRICS_PORT="0",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        PYTHONUNBUFFERED="1",
    )
    return env
