"""Run a check in a child Python that cannot import nirvana_pl (as on a machine with transformers only)."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

from processes import run_killable

REPO = Path(__file__).resolve().parents[1]

# The package is installed editable into the venv (a meta-path finder), and the repo root may sit on
# sys.path: both are removed before the body runs. The body gets `folder` and `expected_file`.
_HIDE_NIRVANA_PL = textwrap.dedent(
    """
    import importlib, importlib.util, os, sys
    folder, expected_file, repo = sys.argv[1], sys.argv[2], os.path.realpath(sys.argv[3])
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")
                        and "editable" not in type(f).__module__]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in getattr(h, "__module__", "")]
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != repo]
    sys.path_importer_cache.clear()
    importlib.invalidate_caches()
    assert importlib.util.find_spec("nirvana_pl") is None, "nirvana_pl is still importable in the child"
    """
)


def run_without_nirvana_pl(body: str, folder: Path, expected_file: Path, tmp_path: Path) -> None:
    """Run ``body`` (Python source) in a child process without nirvana_pl; it must print CHILD_OK."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    proc = run_killable(
        [sys.executable, "-c", _HIDE_NIRVANA_PL + textwrap.dedent(body), str(folder), str(expected_file), str(REPO)],
        300, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 0 and "CHILD_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
