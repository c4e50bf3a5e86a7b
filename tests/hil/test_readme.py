"""The README's async API example runs as written."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.hil
README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "shutoff shutdown" in out.stdout
    assert "-amd64" in out.stdout
