"""Example learners written from the README's "Write your own learner" section. Not registered
unless imported (e.g. `plugins: [pocketflow.learners.examples.half_precision]` in a config)."""
