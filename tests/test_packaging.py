"""`pip install .` (not editable) from a clean checkout ships what the code reads at run time: the YAML defaults
and the sample data, found from the installed copy with no checkout on the path."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PACKAGE_DATA = ["configs/atari.yaml", "configs/cores.yaml", "configs/popgym.yaml",
                "configs/supervised_algorithmic.yaml", "tasks/samples/wikitext_sample/wiki.train.tokens",
                "tasks/samples/wikitext_sample/wiki.valid.tokens", "tasks/samples/wikitext_sample/wiki.test.tokens"]


def clean_checkout(destination: Path) -> Path:
    """The repository's files as a fresh clone has them (tracked, and new files not ignored; no build output)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


@pytest.mark.slow
def test_wheel_ships_configs_and_samples_and_runs_from_an_installed_copy(tmp_path):
    source = clean_checkout(tmp_path / "checkout")
    env = {**os.environ, "RFWP_BUILD_CUDA": "0"}
    env.pop("RFWP_BUILD_CPU", None)  # the pure-Python wheel: kernels are built just in time
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, env=env, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("rfwp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(PACKAGE_DATA) <= names, sorted(set(PACKAGE_DATA) - names)
    assert "configs/__init__.py" in names and not any(name.startswith("tests/") for name in names)

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    probe = (
        "import agent, tasks.wikitext as w; from agent.config import CONFIG_DIR, load_defaults; "
        "print(agent.__file__); print(CONFIG_DIR); print(load_defaults('atari.yaml')['discount']); "
        "print(load_defaults('cores.yaml')['delta_lstm']['hidden_size']); print(w.SAMPLE_DIR.is_dir())"
    )
    # Run outside the repository, with only the installed copy in front of site-packages.
    run_env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=run_env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    module, config_dir, discount, hidden, samples = result.stdout.split()
    assert Path(module).is_relative_to(site) and Path(config_dir) == site / "configs"
    in_checkout = {name: yaml.safe_load((REPO / "configs" / name).read_text()) for name in ("atari.yaml", "cores.yaml")}
    assert float(discount) == in_checkout["atari.yaml"]["discount"]
    assert int(hidden) == in_checkout["cores.yaml"]["delta_lstm"]["hidden_size"] and samples == "True"
    help_text = subprocess.run([sys.executable, "-m", "agent.train", "--help"], cwd=tmp_path, env=run_env,
                               capture_output=True, text=True)
    assert help_text.returncode == 0 and "(default: 0.0006)" in help_text.stdout, help_text.stderr[-2000:]
