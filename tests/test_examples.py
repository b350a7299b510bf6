"""examples/quickstart.py runs end to end on a fresh offline machine (no real weights: the embedded model)."""
import os
import re
import subprocess
import sys
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def test_quickstart_runs_offline_on_the_embedded_model(tmp_path):
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "empty-hf-cache"), HF_HOME=str(tmp_path / "hf-home"))
    result = subprocess.run([sys.executable, str(QUICKSTART)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Could not find model 'gpt2'" in out and "using the embedded model" in out
    assert "model: gpt2-embedded" in out
    # The embedded model was trained until it had an induction head; the tour's score must find it.
    score = float(re.search(r"top induction head: L\d+H\d+ score ([0-9.]+)", out).group(1))
    assert score > 0.5, out
    assert len(re.findall(r"patch blocks\.\d+\.hook_resid_pre at position 10", out)) == 2
    assert "greedy continuation:" in out and "done in" in out
