"""A toy identity world trained end to end on a CPU (issue 19; docs/toy-identity.md). Tooling: the runtime
never imports it. `anyid-rt toy run --preset smoke|bench`."""

PRESETS = ("smoke", "bench", "bench-shift1")  # run.preset's names (here: the CLI lists them without torch)
