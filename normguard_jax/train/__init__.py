"""Train state, fused velocity forward, train step, rollout, loop, checkpoints and logging."""
