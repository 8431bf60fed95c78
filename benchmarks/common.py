"""What every benchmark shares: quiet start-up, argument parsing, and result files
that say where they came from (library versions, machine, git revision).

Import it first, before TensorFlow:

    import common  # noqa: F401  (sets the environment before TensorFlow loads)
"""

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = pathlib.Path(__file__).parent
RESULTS = HERE / "results"
# The tfmot baseline runs in its own process; TFS_BASELINE_PYTHON names an
# interpreter with `tf-keras` and `tensorflow-model-optimization` (a separate
# venv), default: this one (the `baseline` extra installed alongside).
BASELINE_PYTHON = os.environ.get("TFS_BASELINE_PYTHON", sys.executable)
_ROOT = HERE.parent
if str(_ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(_ROOT))


def parser(doc):
    """An `argparse.ArgumentParser` that shows the benchmark's docstring (its commands) in --help."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def _version(module):
    try:
        from importlib import metadata

        return metadata.version(module)
    except Exception:  # not installed
        return None


def _git_revision():
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) or None
    except Exception:  # not a git checkout
        return None


def _cpu_model():
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def environment():
    """Library versions, the machine and the git revision, for a results file."""
    return {
        "versions": {name: _version(name) for name in (
            "tensorflow", "keras", "ai-edge-litert", "tflite-micro", "numpy", "tf_sparsity", "mnist1d")},
        "python": platform.python_version(),
        "machine": {"platform": platform.platform(), "cpu": _cpu_model(), "cores": os.cpu_count()},
        "git_revision": _git_revision(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([pathlib.Path(sys.argv[0]).name] + sys.argv[1:]),
    }


def write_results(path, payload):
    """Write `payload` plus `environment()` as JSON to `path` atomically; returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({**payload, "environment": environment()}, indent=1, default=str))
    os.replace(tmp, path)
    return path


def run_and_report(a, run, table):
    """`rows = run(a)`, print `table(rows)` (markdown lines) and write both to results/`a.out`."""
    rows = run(a)
    lines = table(rows)
    print("\n".join(lines))
    write_results(RESULTS / a.out, {"args": vars(a), "rows": rows, "table": lines})
    return rows


def run_tfmot_worker(*args):
    """Run the tfmot baseline (`_tfmot_worker.py ARGS`) in its own process with
    `BASELINE_PYTHON` (tf_keras never enters this process); returns its JSON result."""
    cmd = [BASELINE_PYTHON, str(HERE / "_tfmot_worker.py"), *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"tfmot worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
