import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 8 simulated CPU devices for the sharding tests (DESIGN.md §8 tier 4); single-device code runs on device 0.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
