"""deploy/prometheus: the rules and scrape config pass promtool, and the alerts fire as meant."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from .conftest import REPO

PROMETHEUS = REPO / "deploy" / "prometheus"


@pytest.mark.parametrize("args", [
    ["check", "rules", "rules.yml"],
    ["check", "config", "prometheus.yml"],
    ["test", "rules", "rules_test.yml"],   # every alert firing and not firing, a recording rule
])
def test_promtool(args):
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian package prometheus) is installed by .ci/run"
    result = subprocess.run([promtool, *args], cwd=PROMETHEUS, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
