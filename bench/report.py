"""What every result file carries: the machine, the software, the commit, the figures."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _git_commit() -> str:
    # A copy of the tree without its history (a lent GPU's) is told its commit this way.
    if os.environ.get("CUATTN_GIT_COMMIT"):
        return os.environ["CUATTN_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        ).stdout.strip()
        return (
            out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in ("cuattn", "numpy", "numba", "scipy", "torch", "cupy", "jax"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "?")
        except ImportError:
            continue
    return versions


def environment(device: str | None = None, driver: str | None = None) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "device": device or "cpu",
        "driver": driver,
        "versions": _versions(),
    }


def write(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    """Write ``payload`` as JSON to ``<out_dir>/<name>.json``; returns the path."""
    out_dir = Path(out_dir) if out_dir else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
    return path


def publish(
    kind: str,
    title: str,
    body: str,
    payload: dict,
    out_dir: Path | None,
    device: str | None = None,
    driver: str | None = None,
    plotted: bool = True,
) -> Path:
    """Write a benchmark's results: ``<kind>-<device>-<date>.json`` (``payload`` with the
    environment), a Markdown file headed by ``title``, the device, date and commit, with
    ``body`` below, and the PNG (``plotted``). Prints ``body``; returns the JSON path."""
    env = environment(device=device, driver=driver)
    date = env["date"][:10]
    where = f"{device.replace(' ', '_')}-" if device else ""
    path = write(f"{kind}-{where}{date}", dict(environment=env, **payload), out_dir)
    machine = f"{env['cpu']} ({env['cpu_count']} cores)"
    if device:
        machine = f"{device}, driver {driver}" if driver else device
    heading = f"# {title}, {machine}, {date}, commit {env['git_commit']}"
    path.with_suffix(".md").write_text(f"{heading}\n\n{body}\n")
    if plotted:  # last: the slowest part, and the one a run cut short can lose
        from .plot import plot

        plot(path)
    print(f"{body}\n\nwrote {path} and {path.with_suffix('.md').name}")
    return path


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A Markdown table of ``rows``; ``columns`` are (key, heading) pairs."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(str(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def progress(items, description: str):
    """``items`` with a progress bar when tqdm is installed (long GPU sweeps)."""
    items = list(items)
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=description, leave=False)


class TimeLimit(BaseException):
    """SIGTERM, as an exception that a benchmark's ``except Exception`` (a peer that fails
    one case) does not swallow."""


@dataclass
class Cut:
    note: str = ""  # what to add to the results' title when the run was cut short


@contextlib.contextmanager
def until_terminated():
    """Runs a benchmark's measuring loop until it ends or the process gets SIGTERM, as
    gpu_check.sh's per-step time limit sends it: then the loop stops where it is and the
    ``Cut`` yielded gets a note, so that what was measured is still published."""

    def stop(signum, frame):
        raise TimeLimit

    cut = Cut()
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield cut
    except TimeLimit:
        cut.note = " (cut short by its time limit: the rows measured before it)"
        print("stopped by SIGTERM: publishing the rows measured so far", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
