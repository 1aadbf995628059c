"""Process-wide test settings: 8 forced CPU devices, offline hubs, one thread per xdist worker."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The project's compile cache, for this process and for the CLIs the tests start (never the user's ~/.cache).
os.environ.setdefault("UNCLIP_JAX_CACHE", os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".jax_cache")))

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["UNCLIP_JAX_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# One torch thread everywhere: torch's default pool fights XLA's for the same cores (a 25-step tiny decoder loop
# next to torch's 2 threads took 35 s instead of 0.4 s).
try:
  import torch

  torch.set_num_threads(1)
except ImportError:
  pass
