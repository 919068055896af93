"""The README's example learner passes the conformance suite with a three-line subclass, and a
config reaches it through `plugins` (the CLI, a real run)."""
import json

import pocketflow.learners.examples.half_precision  # noqa: F401  (registers it)
from conftest import assert_one_line_error, run_cli
from pocketflow.testing import LearnerTestCase


class TestHalfPrecision(LearnerTestCase):
    learner, target = "half_precision", ("packed_size", 1.9)


def test_plugins_key_brings_a_user_learner_to_the_cli(tmp_path, small_npz):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
name: half
plugins: [pocketflow.learners.examples.half_precision]
data: {{name: npz, path: {small_npz}, limit_train: 600}}
model: {{name: seed_cnn}}
train: {{epochs: 1, verbose: false}}
learner: {{name: half_precision, fine_tune: {{steps: 2, verbose: false}}}}
target: {{metric: packed_size, ratio: 1.8}}
export: {{formats: [keras], verify: false}}
output: {{dir: {tmp_path / 'runs'}}}
""")
    r = run_cli("run", cfg)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "runs" / "half" / "best" / "metrics.json").read_text())
    assert m["learner"] == "half_precision" and m["ratios"]["packed_size"] >= 1.8 * 0.99
    bad = run_cli("run", cfg, "--set", "plugins=[no_such_module_zz]", "--force")
    assert_one_line_error(bad, "plugins: cannot import 'no_such_module_zz'")
