"""Session set-up for the default test run (CPU only).

* 8 simulated CPU devices for the sharding tests (DESIGN.md §8 tier 4); single-device code runs on device 0.
* Compile speed over code speed (the programs are tiny; compile time dominates the run): XLA's LLVM optimisation
  off and XLA's older CPU fusion emitters where the jaxlib has them, in this process and every test subprocess;
  ``NORMGUARD_TEST_OPTIMIZE=1`` keeps XLA's defaults.
* One JAX persistent compilation cache for the whole session, shared with the subprocesses the tests start (the
  CLI runs, the two-process jobs): a program compiled once, in any process, is loaded from it afterwards.
* The expensive things run once per session and every reader shares them: the digits smoke main job (all four
  methods without and with NormGuard, through the real CLI, on one device) starts in the background as soon as a
  selected test needs it, so it runs on the second core while the unit tests compile.
"""

import fcntl
import gc
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA flags that make the CPU compiler faster on the test programs (the numerics stay within every test's
# tolerance); off with NORMGUARD_TEST_OPTIMIZE=1. XLA's CPU backend compiles each fusion through its MLIR fusion
# emitters; its older elemental emitters compile these tiny programs faster (measured on 2 cores, one process:
# tests/test_train_step.py + tests/test_model.py 80 s -> 49 s). Not every jaxlib has the flag (JAX 0.12's has not)
# and an unknown XLA flag aborts the process, so the first process of the session tries each flag in a throwaway
# interpreter and passes the ones that work to every other process in NORMGUARD_TEST_XLA_FLAGS.
FAST_COMPILE_XLA_FLAGS = {"xla_cpu_use_fusion_emitters": ("false", True)}  # name: (the tests' value, XLA's default)


def _works(flag):
  """Whether a JAX process starts with ``flag`` in XLA_FLAGS (tried in a throwaway interpreter)."""
  env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True).returncode == 0


if "NORMGUARD_TEST_XLA_FLAGS" not in os.environ:
  os.environ["NORMGUARD_TEST_XLA_FLAGS"] = "" if os.environ.get("NORMGUARD_TEST_OPTIMIZE") == "1" else " ".join(
      f for f in (f"--{name}={value}" for name, (value, _) in FAST_COMPILE_XLA_FLAGS.items()) if _works(f))


def xla_default_compiler_options():
  """``compiler_options`` for ``jax.jit`` that undo the session's compile-speed flags, for a test whose point is
  bit-for-bit equality of two programs under XLA's default CPU code generation."""
  active = os.environ.get("NORMGUARD_TEST_XLA_FLAGS", "").split()
  return {name: default for name, (value, default) in FAST_COMPILE_XLA_FLAGS.items()
          if f"--{name}={value}" in active}


def xla_flags(devices):
  """XLA_FLAGS for a test process on ``devices`` simulated CPU devices: the device count and the session's
  compile-speed flags."""
  return f"--xla_force_host_platform_device_count={devices} {os.environ.get('NORMGUARD_TEST_XLA_FLAGS', '')}".strip()


if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
# The compilation cache (env vars, so that subprocesses share it); NORMGUARD_TEST_JAX_CACHE keeps it across sessions.
_CACHE = os.environ.get("NORMGUARD_TEST_JAX_CACHE") or tempfile.mkdtemp(prefix="normguard_jax_cache_")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The test programs are tiny: XLA's CPU backend optimisation (LLVM) costs more than it saves. Off for the session and
# its subprocesses (measured on 2 cores: tests/test_train_step.py 66 s -> 50 s); the numerics are unchanged within
# every test's tolerance. NORMGUARD_TEST_OPTIMIZE=1 keeps XLA's default.
if os.environ.get("NORMGUARD_TEST_OPTIMIZE") != "1":
  os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

# Python's cyclic garbage collector, run every 700 allocations by default, scans the many small objects that JAX
# tracing makes (4% of one AOT compile's profile); a higher threshold, and the collected test items frozen out of
# its scans, save 7-11% (measured, one process: test_train_step + test_model 49.7 s -> 44.4 s; + test_flux_recipe
# 86.3 s -> 80.1 s; the same peak memory). Cycles are still collected.
gc.set_threshold(50_000, 50, 100)


def pytest_collection_finish(session):
  gc.collect()
  gc.freeze()

jax.config.update("jax_default_matmul_precision", "highest")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_device_env():
  """The environment of a CLI subprocess on one CPU device (a loop on the 8 simulated devices only compiles
  slower), sharing the session's compilation cache."""
  flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                   if "xla_force_host_platform_device_count" not in f)
  return dict(os.environ, XLA_FLAGS=flags)


DIGITS_SMOKE_ARGS = ("--config", "configs/tiny_digits.py:smoke", "--config.rl.methods=nft,awm,dpo,grpo",
                     "--config.rl.normguard=off,on")


def _shared_dir(tmp_path_factory, name):
  """A directory that every pytest-xdist worker of this session sees (the plain session's own without xdist)."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # the workers' basetemps are siblings under one session root
  path = base / name
  path.mkdir(exist_ok=True)
  return path


@pytest.fixture(scope="session")
def _digits_smoke_job(tmp_path_factory):
  """Starts the digits smoke main job in a subprocess at the first test that needs it (see
  _start_shared_jobs_early), once per session: under pytest-xdist the first worker to take the lock starts it and
  the others wait for its exit status file."""
  tmp = _shared_dir(tmp_path_factory, "digits_smoke")
  with open(tmp / "start.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (tmp / "started").exists():
      cmd = " ".join(shlex.quote(a) for a in [
          sys.executable, "-m", "normguard_jax.train", *DIGITS_SMOKE_ARGS, "--workdir", str(tmp / "work"),
          f"--config.pretrain.cache_dir={tmp / 'cache'}"])
      # The exit status goes to a file (written atomically), so that every worker can wait for it.
      log, rc = shlex.quote(str(tmp / "job.log")), shlex.quote(str(tmp / "rc"))
      subprocess.Popen(["sh", "-c", f"{cmd} > {log} 2>&1; echo $? > {rc}.tmp && mv {rc}.tmp {rc}"], cwd=ROOT,
                       env=one_device_env(), start_new_session=True)
      (tmp / "started").write_text(str(time.time()))
  yield tmp


@pytest.fixture(scope="session")
def digits_smoke(_digits_smoke_job):
  """(workdir, report, tmp): the finished digits smoke job; its pretraining cache is tmp / 'cache'."""
  tmp = _digits_smoke_job
  deadline = time.time() + 1200
  while not (tmp / "rc").exists():
    assert time.time() < deadline, "the digits smoke job did not finish in 1200 s:\n" + (tmp / "job.log").read_text()[-4000:]
    time.sleep(0.5)
  rc = int((tmp / "rc").read_text().strip() or -1)
  assert rc == 0, (tmp / "job.log").read_text()[-4000:]
  work = tmp / "work"
  return work, json.loads((work / "report.json").read_text()), tmp


@pytest.fixture(scope="session", autouse=True)
def _start_shared_jobs_early(request):
  """Start the shared background jobs as the session begins, when a selected test needs them."""
  names = {n for item in request.session.items for n in getattr(item, "fixturenames", ())}
  if "digits_smoke" in names:
    request.getfixturevalue("_digits_smoke_job")
  yield


# The modules that take minutes (durations measured on 2 cores), moved to the front of the collection. Under
# `pytest -n 2 --dist loadfile` (the README's command) each module runs whole on one worker, so its module fixtures
# are built once; pytest-xdist then orders the modules by their number of tests, and this order breaks the ties.
# (Starting these modules strictly first, with --no-loadscope-reorder, was measured slower on 2 cores: they all
# start several processes and oversubscribe the cores together.)
HEAVY_FIRST = ("test_multihost.py", "test_real_path.py", "test_aot.py", "test_flux_recipe.py", "test_loop.py",
               "test_analysis.py", "test_sharding.py", "test_train_step.py", "test_model.py", "test_checkpoint.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(HEAVY_FIRST)))  # stable
