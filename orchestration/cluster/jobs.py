"""A recipe run as a Ray job, through the Ray Jobs API (`JobSubmissionClient`, the dashboard's port).

    build_job(recipe, working_dir, run_dir)  -> JobSpec: entrypoint, runtime env, metadata (no Ray)

orchestration/cluster/job_client.py submits a JobSpec and follows the job (status, logs, stop).

The job runs `python -m orchestration.cli pipeline run RECIPE --run-dir DIR --address auto --quiet
--in-job` in a copy of the working directory (which it copies on to DIR/.job/working_dir, see
copy_working_dir), with the hanyeong packages of this machine shipped as
`py_modules` (the cluster runs the submitter's code, whatever hanyeong it has or lacks). Their
third-party dependencies (torch, ray, tokenizers, kiwipiepy, pyarrow, ...) must already be in the
`python` of the cluster's nodes. The run directory is a path on the cluster: on several nodes, one
they all share.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from hanyeong.errors import ConfigError, HanyeongError

PACKAGES = ("hanyeong", "tokenizer", "orchestration", "cuda_model", "mlx_model")  # shipped as py_modules
RUNS_ROOT = "~/hanyeong-runs"  # default run directories, on the cluster (like Ray Train's ~/ray_results)
# Never uploaded (gitignore-style, relative to the working dir or to a package). Ray 2.60 also skips
# what .gitignore and .rayignore files list (RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 turns the first off)
# and, in a working dir only, .git, .venv, venv and __pycache__ (RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES);
# the packages get neither, and a dir-only pattern like `runs/` still walks every file below: these
# name the folders themselves, so the walk skips them.
EXCLUDES = (".git", "/runs", ".venv*", "venv", "__pycache__", "*.egg-info", ".pytest_cache", ".hypothesis",
            ".ray", ".ipynb_checkpoints", ".mypy_cache", ".ruff_cache")  # fmt: skip
JOB_COPY = ".job/working_dir"  # in the run dir: the job's working directory, at a path that stays put


@dataclass(frozen=True)
class JobSpec:
    """What `submit` sends: JobSubmissionClient.submit_job's arguments."""

    entrypoint: str
    runtime_env: dict
    metadata: dict
    """str -> str: {"hanyeong", "recipe", "recipe_sha256", "run_dir", "run_name", "working_dir"}."""
    submission_id: str | None = None


# ---- the job, without Ray ----------------------------------------------------------------------


def build_job(recipe: str | Path, working_dir: str | Path | None = None, run_dir: str | None = None,
              submission_id: str | None = None, pip: tuple[str, ...] = (), env: dict | None = None,
              echo=lambda _: None) -> JobSpec:  # fmt: skip
    """The job that runs `recipe` in `run_dir` (default RUNS_ROOT/<run.name>) from a copy of
    `working_dir` (default: the current directory), which must hold the recipe and what it reads."""
    from orchestration.core.config import read_toml

    recipe, working_dir = Path(recipe), Path(working_dir or ".").resolve()
    if not working_dir.is_dir():
        raise ConfigError(f"--working-dir {working_dir}: no such directory")
    name = (read_toml(recipe, "recipe").get("run") or {}).get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{recipe}: [run] name is missing")
    try:  # fail early on a typo; a recipe may name paths only the cluster has, so only a warning
        from orchestration.pipeline.recipe import load_recipe

        load_recipe(recipe)
    except HanyeongError as err:
        echo(f"warning: {err} (submitting anyway: the job checks the recipe on the cluster)")
    try:
        relative = recipe.resolve().relative_to(working_dir)
    except ValueError:
        raise ConfigError(f"{recipe} is outside the working directory {working_dir}: the job gets only that "
                          "folder; run from, or pass --working-dir, a folder that holds the recipe and its data") from None  # fmt: skip
    run_dir = cluster_run_dir(run_dir, name)
    modules = package_dirs()
    runtime_env = {"working_dir": str(working_dir), "py_modules": [str(p) for p in modules.values()],
                   "excludes": excludes_for(working_dir, run_dir, modules)}  # fmt: skip
    if pip:
        runtime_env["pip"] = list(pip)
    if env:
        runtime_env["env_vars"] = {str(k): str(v) for k, v in env.items()}
    entrypoint = " ".join(["python -m orchestration.cli pipeline run", shlex.quote(relative.as_posix()),
                           "--run-dir", shell_path(run_dir), "--address auto --quiet --in-job"])  # fmt: skip
    metadata = {"hanyeong": "pipeline run", "recipe": relative.as_posix(), "run_dir": run_dir, "run_name": name,
                "recipe_sha256": hashlib.sha256(recipe.read_bytes()).hexdigest(),
                "working_dir": f"{socket.gethostname()}:{working_dir}"}  # fmt: skip
    return JobSpec(entrypoint, runtime_env, metadata, submission_id)


def cluster_run_dir(value: str | None, run_name: str) -> str:
    """The run directory as the cluster's nodes see it: a path (made absolute from here unless it
    starts with ~, which the cluster expands) or a file:// URI; other storage is not supported yet."""
    if value is None:
        return f"{RUNS_ROOT}/{run_name}"
    parts = urllib.parse.urlsplit(value)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"--run-dir {value}: a file:// URI names a path on every node (file:///path), not a host")
        path = urllib.parse.unquote(parts.path)
    elif len(parts.scheme) > 1:  # (one letter would be a Windows drive)
        raise ConfigError(f"--run-dir {value}: only shared-filesystem paths for now (a path or file:///path), "
                          f"not {parts.scheme}:// storage")  # fmt: skip
    else:
        path = value
    if not path:
        raise ConfigError(f"--run-dir {value!r}: empty path")
    if path == "~" or path.startswith("~/"):
        return path.rstrip("/") or path
    return str(Path(path).resolve()) if not Path(path).is_absolute() else os.path.normpath(path)


def shell_path(path: str) -> str:
    """`path` quoted for the job's shell, leaving a leading ~/ for it to expand."""
    if path == "~":
        return path
    return "~/" + shlex.quote(path[2:]) if path.startswith("~/") else shlex.quote(path)


def package_dirs() -> dict[str, Path]:
    """Folder of each hanyeong package, found without importing it (mlx_model would import mlx)."""
    import importlib.util

    found = {}
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"the hanyeong package {name!r} is not importable here; install hanyeong (pip install -e .)")
        found[name] = Path(list(spec.submodule_search_locations)[0]).resolve()
    return found


def excludes_for(working_dir: Path, run_dir: str, modules: dict[str, Path]) -> list[str]:
    """EXCLUDES, plus the run directory and the packages when they lie in the working directory
    (packages travel once, as py_modules; a run's outputs never travel)."""
    extra = []
    for path in [Path(os.path.expanduser(run_dir)), *modules.values()]:
        try:
            extra.append("/" + path.resolve().relative_to(working_dir).as_posix())
        except ValueError:
            continue
    return [*EXCLUDES, *(e for e in extra if e != "/.")]


def dashboard_url(address: str) -> str:
    """http://HOST:PORT of a dashboard from what a user types: the URL, or HOST:PORT."""
    address = address.strip().rstrip("/")
    if "://" not in address:
        address = "http://" + address
    parts = urllib.parse.urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--address {address}: give the Ray dashboard's URL, e.g. http://HEAD:8265")
    return address


def job_link(address: str, job_id: str) -> str:
    """The job's page on the dashboard (Ray 2.60's UI routes by hash: #/jobs/<job or submission id>)."""
    return f"{dashboard_url(address)}/#/jobs/{job_id}"


def upload_sizes(spec: JobSpec) -> dict:
    """Bytes of each package Ray would upload (zipped as Ray zips them): {"working_dir", "<package>"}."""
    import tempfile

    from ray._private.runtime_env.packaging import create_package

    from orchestration.cluster.job_client import quiet_ray_logs

    sizes, excludes = {}, spec.runtime_env["excludes"]
    with tempfile.TemporaryDirectory() as tmp, quiet_ray_logs():
        for name, path, parent in [("working_dir", spec.runtime_env["working_dir"], False),
                                   *((Path(p).name, p, True) for p in spec.runtime_env["py_modules"])]:  # fmt: skip
            target = Path(tmp) / f"{name}.zip"
            create_package(path, target, include_gitignore=True, include_parent_dir=parent, excludes=list(excludes))
            sizes[name] = target.stat().st_size
    return sizes


def copy_working_dir(recipe: Path, run_dir: Path) -> Path:
    """In the job: copy its working directory to RUN_DIR/.job/working_dir; the recipe there.

    Ray unpacks a job's working directory into a folder named after its contents' hash, and the
    recipe's relative paths resolve to absolute ones inside it, which the tokenizer, dataset and
    stage identities include: a file changed anywhere in the working directory between two
    submissions would otherwise retrain every stage instead of resuming. From the run directory
    the paths stay the same, and nodes that share it read the inputs there too."""
    import shutil

    from orchestration.pipeline.driver import run_lock

    run_dir, source = Path(run_dir).resolve(), Path.cwd().resolve()
    if run_dir == source or source in run_dir.parents:
        raise ConfigError(f"--run-dir {run_dir} lies inside the job's working directory {source}, which Ray deletes")
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir):  # a job still running on it: refused before its inputs are replaced
        pass
    target = run_dir / JOB_COPY
    fresh = target.with_name(target.name + ".new")
    shutil.rmtree(fresh, ignore_errors=True)
    shutil.copytree(source, fresh, symlinks=True)
    shutil.rmtree(target, ignore_errors=True)
    fresh.rename(target)
    return target / recipe


# ---- reading a job -------------------------------------------------------------------------------


def local_run_dir(info: dict, override: str | Path | None = None) -> tuple[Path | None, str]:
    """(the job's run directory as readable here, "") or (None, why not): readable when this
    machine sees the same path (a local cluster, shared storage) and its manifest is this recipe's."""
    meta = info["metadata"]
    if override is None and not meta.get("run_dir"):
        return None, "(not a hanyeong job: no run directory in its metadata)"
    path = Path(os.path.expanduser(str(override or meta["run_dir"])))
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return None, f"stages: {manifest} is not readable here (yet); `hanyeong pipeline status --run-dir` where it is"
    import json

    try:
        sha = json.loads(manifest.read_text(encoding="utf-8")).get("recipe", {}).get("sha256")
    except (OSError, ValueError):
        sha = None
    if meta.get("recipe_sha256") and sha != meta["recipe_sha256"]:
        return None, f"stages: {path} here holds another recipe's run (not the job's)"
    return path, ""
