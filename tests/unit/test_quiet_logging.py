"""The demo's quiet logging reaches vLLM's worker processes: only the environment does, so a
child process stands in for the worker here."""

from __future__ import annotations

import os
import subprocess
import sys

# torch's logger that vLLM's CPU worker warns on at engine start ("Triton not available"): the
# one line of library noise the demo printed.
CHILD = ("import torch._library.triton as triton_helpers\n"
         "triton_helpers.logger.warning('Triton not available, find_triton_kernels = []')\n")
PARENT = ("import subprocess, sys\n"
          "from services.logs import configure_logging\n"
          "configure_logging('INFO', 'text', quiet={quiet})\n"
          "sys.exit(subprocess.run([sys.executable, '-c', {child!r}]).returncode)\n")


def _child_stderr(quiet: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_LOGS", "TORCH_CPP_LOG_LEVEL")}
    done = subprocess.run([sys.executable, "-c", PARENT.format(quiet=quiet, child=CHILD)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_quiet_logging_silences_torch_warnings_in_child_processes():
    assert "Triton not available" in _child_stderr(quiet=False)  # the noise exists without it
    assert "Triton not available" not in _child_stderr(quiet=True)
