"""The README's Python example runs as written (on the organism and a small data set) and is as quiet as the
CLI: stderr holds onsft's own bars and lines, none of the libraries' warnings or loading/saving bars."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_NOISE = ("Warning", "Loading weights", "Writing model shards", "de-quantizing", "warn(")


def readme_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    example = next(b for b in blocks if "audit.run(" in b and "train.run(" in b)
    # The example's model, files and budget made small enough for a test; each replacement must apply.
    swaps = [
        ('model="Qwen/Qwen2.5-1.5B-Instruct"', 'model="organism"'),
        ('data="math.jsonl"', 'data="data/new_skill_train.jsonl"'),
        ("self_check=200", "self_check=8"),
        ('data="runs/rewrite/train.jsonl"', 'data="data/new_skill_train.jsonl"'),
        ("learning_rate=1e-5)", "learning_rate=1e-5, max_steps=2, per_device_train_batch_size=4)"),
    ]
    for old, new in swaps:
        assert old in example, f"README's Python example changed: update this test ({old!r} not found)"
        example = example.replace(old, new)
    return example


def test_readme_python_example_runs_quietly(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS", "PYTHONWARNINGS"):
        env.pop(name, None)  # a user's shell has none of the CLI's settings
    prepare = "from onsft.commands import data; from onsft.commands.data import OrganismDataConfig\n"
    prepare += "data.run(OrganismDataConfig(out='data', n_train=16, n_test=4, n_ood=4, n_retention=4))\n"
    script = tmp_path / "example.py"
    script.write_text(prepare + readme_example(), encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "runs" / "idft" / "train_summary.json").is_file()
    assert float(done.stdout.strip().splitlines()[-1]) >= 0  # the printed share of rejected responses
    lines = [line for line in re.split(r"[\r\n]", done.stderr) if line.strip()]
    noise = [line for line in lines if any(word in line for word in LIBRARY_NOISE)]
    assert not noise, noise[:5]
    assert lines, "onsft's own progress bars are expected on stderr"
