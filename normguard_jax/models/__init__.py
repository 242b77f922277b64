"""Pure-functional networks. The only model entry is ``velocity(variables, x_t, t, cond, *, cfg)``."""
