"""The package installs like a library (pyproject.toml): built and installed with pip into a temporary --target,
offline and without dependencies, then imported and run from outside the checkout. Fails when a data file under
normguard_jax/ is not declared as package data, a console script does not resolve, or a requirements file lists
dependencies of its own instead of reading them from pyproject.toml."""

import configparser
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "normguard_jax"
# The CLIs the README and issue 20 name; pyproject's [project.scripts] may add more.
REQUIRED_SCRIPTS = ("normguard-train", "normguard-convert", "normguard-analysis", "normguard-aot",
                    "normguard-encode-prompts", "normguard-tiny-snapshot")
_JUNK = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")


def _pyproject():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def _checkout_files():
  """Every file of the package in the checkout, as installed paths (normguard_jax/...), bytecode left out."""
  out = set()
  for d, dirs, files in os.walk(os.path.join(ROOT, PKG)):
    dirs[:] = [x for x in dirs if x != "__pycache__"]
    out |= {os.path.relpath(os.path.join(d, f), ROOT).replace(os.sep, "/") for f in files
            if not f.endswith((".pyc", ".pyo"))}
  return out


def _outside_env(site):
  """The environment of a process outside the checkout: the install first on sys.path, then the venv's own."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
  return dict(env, PYTHONPATH=site, PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """pip install --no-deps --no-build-isolation --no-index --target SITE, of a copy of what the build reads
  (pyproject.toml, README.md, normguard_jax/), so the checkout gets no build/ or egg-info and no network is used.
  Returns (tmp, site, dist_info)."""
  pytest.importorskip("setuptools", reason="the build backend (the dev and test extras install it) is missing: "
                      "the offline --no-build-isolation build needs it in this venv")
  tmp = tmp_path_factory.mktemp("packaging")
  src, site = tmp / "src", tmp / "site"
  src.mkdir()
  for f in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(ROOT, f), src / f)
  shutil.copytree(os.path.join(ROOT, PKG), src / PKG, ignore=_JUNK)
  cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--no-compile", "--target", str(site), str(src)]
  r = subprocess.run(cmd, cwd=tmp, env=_outside_env(""), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}"
  dist_info = [p for p in site.iterdir() if re.fullmatch(r"normguard_jax-.+\.dist-info", p.name)]
  assert len(dist_info) == 1, sorted(p.name for p in site.iterdir())
  return tmp, str(site), dist_info[0]


def test_installs_every_package_file(installed):
  """Each file under normguard_jax/ (modules, the tiny prompt sets, the model presets) is in the wheel's RECORD: a
  data file that [tool.setuptools.package-data] does not declare is missing from an installed package."""
  _, site, dist_info = installed
  with open(dist_info / "RECORD", newline="") as f:
    record = {row[0] for row in csv.reader(f) if row}
  expected = _checkout_files()
  for must in ("data/prompt_sets/tiny_prompts.txt", "data/prompt_sets/tiny_prompts_test.txt",
               "presets/sd35_medium/transformer/config.json"):
    must = f"{PKG}/{must}"
    assert must in expected, f"{must} moved: update this test and the package-data globs in pyproject.toml"
  missing = sorted(expected - record)
  assert not missing, (f"not installed by `pip install .`: {missing}; declare them in pyproject.toml "
                       "[tool.setuptools.package-data] (data) or make the folder a package (modules)")
  for path in expected:
    assert os.path.isfile(os.path.join(site, path)), path


def test_console_scripts_match_pyproject(installed):
  """The installed entry points are pyproject's [project.scripts], which has every CLI the README names."""
  _, site, dist_info = installed
  declared = _pyproject()["project"]["scripts"]
  assert set(REQUIRED_SCRIPTS) <= set(declared), sorted(set(REQUIRED_SCRIPTS) - set(declared))
  eps = configparser.ConfigParser(delimiters=("=",))
  eps.optionxform = str
  eps.read(dist_info / "entry_points.txt")
  assert dict(eps["console_scripts"]) == declared
  for name in declared:
    assert os.access(os.path.join(site, "bin", name), os.X_OK), f"{name}: no executable script in {site}/bin"


def test_imports_and_reads_bundled_data_outside_checkout(installed):
  """From a directory outside the checkout, with only the install on PYTHONPATH: normguard_jax comes from the
  install, the code that reads the tiny prompt sets and the model presets finds them there, and every console
  script's target loads to a callable."""
  tmp, site, _ = installed
  from normguard_jax.data import prompts as checkout_prompts
  from normguard_jax.parallel import aot as checkout_aot
  code = """if 1:
    import importlib.metadata as md, json, os
    import normguard_jax
    from normguard_jax.convert import safetensors_io
    from normguard_jax.data import prompts
    from normguard_jax.parallel import aot
    dist = md.distribution("normguard-jax")
    presets = {p: {c: safetensors_io.read_config(os.path.join(aot.PRESETS_DIR, p, c))["_class_name"]
                   for c in ("transformer", "vae")} for p in aot.PRESETS}
    scripts = {ep.name: callable(ep.load()) for ep in dist.entry_points if ep.group == "console_scripts"}
    print(json.dumps({"file": normguard_jax.__file__, "version": normguard_jax.__version__,
                      "dist_version": dist.version, "dist_at": str(dist.locate_file("")),
                      "tiny": [p for p, _ in prompts.parse_prompts(prompts.TINY_PROMPTS, "plain")],
                      "tiny_test": [p for p, _ in prompts.parse_prompts(prompts.TINY_TEST_PROMPTS, "plain")],
                      "presets": presets, "scripts": scripts}))
  """
  r = subprocess.run([sys.executable, "-c", code], cwd=tmp, env=_outside_env(site), capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-4000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["file"].startswith(site + os.sep), f"imported {out['file']}, not the install in {site}"
  assert os.path.realpath(out["dist_at"]) == os.path.realpath(site)
  assert out["version"] == out["dist_version"]
  assert out["tiny"] == [p for p, _ in checkout_prompts.parse_prompts(checkout_prompts.TINY_PROMPTS, "plain")]
  assert out["tiny_test"] == [p for p, _ in checkout_prompts.parse_prompts(checkout_prompts.TINY_TEST_PROMPTS,
                                                                          "plain")]
  assert sorted(out["presets"]) == sorted(checkout_aot.PRESETS)
  assert all(all(v for v in c.values()) for c in out["presets"].values()), out["presets"]
  assert out["scripts"] == {name: True for name in _pyproject()["project"]["scripts"]}


def test_installed_cli_help_outside_checkout(installed):
  """An installed console script (pip's wrapper: sys.exit(main())) runs from outside the checkout: `--help`, exit 0.
  normguard-analysis parses its arguments before any heavy import, so this takes a fraction of a second; the test
  above loads every other script's main."""
  tmp, site, _ = installed
  r = subprocess.run([os.path.join(site, "bin", "normguard-analysis"), "--help"], cwd=tmp, env=_outside_env(site),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-4000:]
  assert r.stdout.startswith("usage: ") and "evaluate" in r.stdout, r.stdout[:2000]


def test_requirements_files_read_from_pyproject():
  """requirements*.txt hold no dependency of their own (no second list to drift): only `-e .` or `-e .[extra]`
  lines, each extra defined in pyproject.toml."""
  extras = set(_pyproject()["project"]["optional-dependencies"])
  names = sorted(f for f in os.listdir(ROOT) if re.fullmatch(r"requirements(-\w+)?\.txt", f))
  assert "requirements.txt" in names and "requirements-test.txt" in names, names
  for name in names:
    with open(os.path.join(ROOT, name)) as f:
      lines = [line.split("#", 1)[0].strip() for line in f]
    lines = [line for line in lines if line]
    assert lines, f"{name}: empty"
    for line in lines:
      m = re.fullmatch(r"-e \.(?:\[([\w,-]+)\])?", line)
      assert m, f"{name}: {line!r} lists a dependency; add it to pyproject.toml and keep `-e .[extra]` here"
      assert set((m.group(1) or "").split(",")) - {""} <= extras, f"{name}: {line!r}: extra not in pyproject.toml"
