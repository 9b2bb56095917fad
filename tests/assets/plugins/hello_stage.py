"""A user plugin: registers a stage without touching engine (used by tests/test_e2e.py)."""

from engine.stages import STAGES


@STAGES.register("hello")
def hello(ctx):
    """Write a file into the run dir, to prove the stage ran with the shared context."""
    (ctx.run_dir / "hello.txt").write_text(f"hello from {ctx.cfg.recipe}\n")
    return {"greeted": True}
