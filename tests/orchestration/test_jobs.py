"""`hanyeong pipeline submit|status|logs|stop --address` (orchestration/cluster/jobs.py): the job's pieces
without Ray, then the quickstart recipe submitted to a real `ray start` head on 127.0.0.1
(tests/orchestration/ray_cluster.py), stopped mid-stage, resubmitted and resumed."""

from __future__ import annotations

import json
import shlex
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from orchestration.cluster import job_client

from orchestration.cluster import jobs
from hanyeong.errors import ConfigError
from tests.conftest import REPO, cli, shrink_recipe

QUICKSTART = REPO / "recipes" / "quickstart.toml"
JOB_TIMEOUT_S = 900  # the quickstart takes 2-5 min on 2 shared cores


# ---- the job, without Ray ----------------------------------------------------------------------------


def test_the_job_runs_the_recipe_by_its_path_in_the_working_dir_with_the_packages_shipped(tmp_path):
    spec = jobs.build_job(QUICKSTART, REPO, str(tmp_path / "run"), submission_id="s1", env={"OMP_NUM_THREADS": "1"})
    assert shlex.split(spec.entrypoint) == ["python", "-m", "orchestration.cli", "pipeline", "run", "recipes/quickstart.toml",
                                            "--run-dir", str(tmp_path / "run"), "--address", "auto", "--quiet", "--in-job"]  # fmt: skip
    env = spec.runtime_env
    assert env["working_dir"] == str(REPO) and env["env_vars"] == {"OMP_NUM_THREADS": "1"} and "pip" not in env
    assert [Path(p).name for p in env["py_modules"]] == list(jobs.PACKAGES)
    assert all((Path(p) / "__init__.py").is_file() for p in env["py_modules"])
    # the packages travel once, as py_modules; a checkout's clutter never
    assert {".git", "/runs", ".venv*", "__pycache__", "*.egg-info", ".pytest_cache", ".hypothesis"} <= set(env["excludes"])
    assert {"/tokenizer", "/orchestration", "/cuda_model", "/mlx_model"} <= set(env["excludes"])
    assert spec.metadata["recipe"] == "recipes/quickstart.toml" and spec.metadata["run_dir"] == str(tmp_path / "run")
    assert spec.metadata["run_name"] == "quickstart" and spec.submission_id == "s1"
    assert all(isinstance(v, str) for v in spec.metadata.values())  # the Jobs API takes str -> str


def test_the_default_run_dir_is_expanded_on_the_cluster_and_a_run_dir_inside_the_working_dir_is_not_uploaded(tmp_path):
    spec = jobs.build_job(QUICKSTART, REPO, pip=("rich>=13",))
    assert "--run-dir ~/hanyeong-runs/quickstart " in spec.entrypoint and spec.runtime_env["pip"] == ["rich>=13"]
    assert "~/'my runs/q'" in jobs.build_job(QUICKSTART, REPO, "~/my runs/q").entrypoint  # the shell expands ~ only
    (tmp_path / "recipe.toml").write_text(QUICKSTART.read_text())
    spec = jobs.build_job(tmp_path / "recipe.toml", tmp_path, str(tmp_path / "out" / "run"))
    assert "/out/run" in spec.runtime_env["excludes"] and spec.metadata["recipe"] == "recipe.toml"


@pytest.mark.parametrize("given, expected", [
    ("/data/runs/q", "/data/runs/q"), ("/data/runs/q/", "/data/runs/q"), ("file:///data/runs/q", "/data/runs/q"),
    ("file://localhost/data/my%20runs", "/data/my runs"), ("~/runs/q", "~/runs/q"),
    ("relative/q", str(Path.cwd() / "relative" / "q")), (None, "~/hanyeong-runs/quick"),
])  # fmt: skip
def test_run_dir_paths_and_file_uris(given, expected):
    assert jobs.cluster_run_dir(given, "quick") == expected


@pytest.mark.parametrize("given", ["s3://bucket/runs", "gs://bucket/runs", "hdfs://nn/runs", "file://otherhost/runs"])
def test_other_storage_is_refused_in_one_line(given):
    with pytest.raises(ConfigError, match="only shared-filesystem paths for now|file:///path"):
        jobs.cluster_run_dir(given, "quick")


def test_a_recipe_outside_the_working_dir_or_a_bad_option_is_one_line(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    code, _, err = cli(monkeypatch, capsys, "pipeline", "submit", str(QUICKSTART), "--address", "http://127.0.0.1:1",
                       "--working-dir", str(work), "--dry-run")  # fmt: skip
    assert code == 1 and err.count("\n") == 1 and "is outside the working directory" in err and str(work) in err
    code, _, err = cli(monkeypatch, capsys, "pipeline", "submit", str(QUICKSTART), "--address", "http://127.0.0.1:1",
                       "--run-dir", "s3://bucket/x", "--dry-run")  # fmt: skip
    assert code == 1 and err == "error: --run-dir s3://bucket/x: only shared-filesystem paths for now (a path or file:///path), not s3:// storage\n"
    code, _, err = cli(monkeypatch, capsys, "pipeline", "submit", str(QUICKSTART), "--address", "x", "--env", "NOVALUE", "--dry-run")
    assert code == 1 and "--env 'NOVALUE': expected KEY=VALUE" in err


def test_the_upload_is_small_and_leaves_the_clutter_out(tmp_path, monkeypatch, capsys):
    """What Ray would zip, with the same excludes: the shipped corpus, recipes, tests; no .git, .venv, runs."""
    from ray._private.runtime_env.packaging import create_package

    monkeypatch.chdir(REPO)
    code, out, _ = cli(monkeypatch, capsys, "pipeline", "submit", "recipes/quickstart.toml", "--address", "x", "--dry-run")
    assert code == 0
    printed = json.loads(out)
    sizes = printed["upload_bytes"]
    assert set(sizes) == {"working_dir", *jobs.PACKAGES}
    assert sizes["working_dir"] < 10 * 2**20 and all(sizes[p] < 2**20 for p in jobs.PACKAGES), sizes
    zipped = tmp_path / "working_dir.zip"
    create_package(str(REPO), zipped, include_gitignore=True, excludes=printed["runtime_env"]["excludes"])
    names = zipfile.ZipFile(zipped).namelist()
    assert "recipes/quickstart.toml" in names and any(n.startswith("data/quickstart/") for n in names)
    top = {n.split("/")[0] for n in names}
    assert not top & {".git", ".venv", "runs", "orchestration", "tokenizer", "hanyeong.egg-info"}, top
    assert not any("__pycache__" in n for n in names)


def test_the_job_runs_from_a_copy_of_its_working_dir_at_a_path_that_stays_put(tmp_path, monkeypatch):
    """Ray unpacks each version of the working dir elsewhere; the copy in the run dir keeps the
    recipe's resolved paths, hence the stage identities, the same across submissions."""
    from orchestration.pipeline.driver import run_lock

    run_dir = tmp_path / "run"
    for version in ("a", "b"):
        unpacked = tmp_path / f"_ray_pkg_{version}"
        (unpacked / "recipes").mkdir(parents=True)
        (unpacked / "recipes" / "r.toml").write_text(version)
        monkeypatch.chdir(unpacked)
        copied = jobs.copy_working_dir(Path("recipes/r.toml"), run_dir)
        assert copied == run_dir.resolve() / ".job" / "working_dir" / "recipes" / "r.toml" and copied.read_text() == version
    assert sorted(p.name for p in (run_dir / ".job").iterdir()) == ["working_dir"]
    with run_lock(run_dir), pytest.raises(ConfigError, match="in use by another"):
        jobs.copy_working_dir(Path("recipes/r.toml"), run_dir)  # a job still runs there: its inputs stay


def test_addresses_links_and_an_unreachable_dashboard(monkeypatch, capsys):
    assert jobs.dashboard_url("127.0.0.1:8265/") == "http://127.0.0.1:8265"
    assert jobs.job_link("http://head:8265", "raysubmit_x") == "http://head:8265/#/jobs/raysubmit_x"
    with pytest.raises(ConfigError, match="dashboard's URL"):
        jobs.dashboard_url("ftp://head:8265")
    port = _free_port()  # nothing listens there: refused at once
    started = time.monotonic()
    code, _, err = cli(monkeypatch, capsys, "pipeline", "status", "--address", f"http://127.0.0.1:{port}", "raysubmit_x")
    assert code == 1 and err.count("\n") == 1 and time.monotonic() - started < 10
    assert err.startswith(f"error: cannot reach the Ray dashboard at http://127.0.0.1:{port} (Connection refused)")

    def silent(*_args, **_kwargs):  # a host that drops packets: the connect gives up after its timeout
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", silent)
    with pytest.raises(job_client.ClusterError, match=r"cannot reach the Ray dashboard at http://10.9.9.9:8265 \(no answer\)"):
        job_client.check_reachable("http://10.9.9.9:8265")


def test_ray_errors_become_one_line():
    traceback = ("Request failed with status code 500: Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                 "KeyError: 'boom'\n.\n.")  # fmt: skip
    with pytest.raises(job_client.ClusterError, match=r"^the Ray cluster at http://h:8265: KeyError: 'boom'$"):
        with job_client.cluster_errors("http://h:8265"):
            raise RuntimeError(traceback)
    with pytest.raises(job_client.ClusterError, match="^no job 'j1' on the Ray cluster at http://h:8265$"):
        with job_client.cluster_errors("http://h:8265", "j1"):
            raise RuntimeError("Request failed with status code 404: Job j1 does not exist.")
    with pytest.raises(job_client.ClusterError, match="has a job with that --submission-id already"):
        with job_client.cluster_errors("http://h:8265"):
            raise RuntimeError("... ValueError: Job with submission_id j1 already exists. Please use a different submission_id.")
    failed = {"message": "Job entrypoint command failed with exit code 1, last available logs:\nstage 1\nerror: stage 2 's2' failed: x\n"}
    assert job_client.job_reason(failed) == "error: stage 2 's2' failed: x"
    assert job_client.job_reason({"message": "Job finished successfully."}) == "Job finished successfully."


def test_status_needs_a_run_dir_or_an_address(monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, "pipeline", "status")
    assert code == 1 and err == "error: pipeline status: give --run-dir DIR, or --address http://HEAD:8265 [JOB]\n"
    code, _, err = cli(monkeypatch, capsys, "pipeline", "status", "raysubmit_x")
    assert code == 1 and "a job id needs --address" in err


# ---- on a real cluster -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A `ray start` head on 127.0.0.1 (2 CPUs, token auth), for the module. Its torch runs on one
    thread (see tests/orchestration/test_runner.py `ray_local`); the Kiwi cache stays in tmp."""
    pytest.importorskip("ray")
    from tests.orchestration.ray_cluster import LocalCluster

    env = {"OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache"))}
    with LocalCluster(num_cpus=2, env=env) as started:
        yield started


def hanyeong(cluster, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`hanyeong ARGS` in its own process, as a user on the cluster's machine with its token."""
    return subprocess.run([sys.executable, "-m", "orchestration.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env=env or cluster.client_env(), timeout=timeout, stdin=subprocess.DEVNULL)  # fmt: skip


@pytest.mark.ray
def test_the_cluster_listens_on_loopback_only(cluster):
    listening = cluster.listeners()
    assert listening, "no listening sockets found for the cluster's processes"
    outward = [(a, p) for a, p in listening if not a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:"))]
    assert not outward


@pytest.mark.ray
def test_a_missing_or_wrong_token_is_one_line(cluster, tmp_path):
    address = cluster.dashboard_url
    wrong = hanyeong(cluster, "pipeline", "status", "--address", address, env={**cluster.client_env(), "RAY_AUTH_TOKEN": "wrong"})
    assert wrong.returncode == 1 and wrong.stderr.count("\n") == 1 and "Traceback" not in wrong.stderr
    assert wrong.stderr == (f"error: the Ray cluster at {address} refused the request: the token from RAY_AUTH_TOKEN is not its "
                            f"token; {job_client.TOKEN_HELP}\n")  # fmt: skip
    env = {k: v for k, v in cluster.client_env().items() if not k.startswith("RAY_AUTH_")}
    missing = hanyeong(cluster, "pipeline", "status", "--address", address, env={**env, "HOME": str(tmp_path)})  # no ~/.ray
    assert missing.returncode == 1
    assert missing.stderr == f"error: the Ray cluster at {address} refused the request: it needs its token; {job_client.TOKEN_HELP}\n"
    unknown = hanyeong(cluster, "pipeline", "logs", "--address", address, "raysubmit_nosuchjob")
    assert unknown.returncode == 1 and unknown.stderr == f"error: no job 'raysubmit_nosuchjob' on the Ray cluster at {address}\n"


@pytest.mark.ray
def test_a_failing_job_exits_1_with_its_error_line(cluster, tmp_path):
    """A recipe that loads nowhere: a warning here, the run's own one-line error there."""
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "r.toml").write_text('[run]\nname = "broken"\n')
    done = hanyeong(cluster, "pipeline", "submit", str(tmp_path / "work" / "r.toml"), "--working-dir", str(tmp_path / "work"),
                    "--address", cluster.dashboard_url, "--run-dir", str(tmp_path / "run"), "--wait", timeout=300)  # fmt: skip
    why = "a recipe needs a [run] table and at least one [[stage]]"
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.startswith(f"warning: {tmp_path / 'work' / 'r.toml'}: {why} (submitting anyway")
    job, error = done.stdout.split()[1].rstrip(":"), f"error: {tmp_path / 'run' / '.job' / 'working_dir' / 'r.toml'}: {why}"
    assert done.stderr.splitlines()[-1] == f"{job}: FAILED ({error})"
    assert error in done.stdout  # the job's output, followed
    status = hanyeong(cluster, "pipeline", "status", "--address", cluster.dashboard_url, job)
    assert status.returncode == 0 and f"job {job}: FAILED ({error})" in status.stdout
    assert "stages: " in status.stdout and "is not readable here" in status.stdout  # no manifest was written


@pytest.mark.ray
@pytest.mark.parametrize(
    "shrink", [pytest.param(1, marks=pytest.mark.slow, id="full"), pytest.param(4, id="quarter")]
)
def test_submit_the_quickstart_stop_it_mid_stage_and_resume_it(cluster, tmp_path, shrink):
    """Submit; stop after stage 1's first checkpoint; change a file of the working directory (Ray then
    unpacks it elsewhere); submit again with the same run dir and --wait: stage 1 resumes from its
    checkpoint, all five stages finish and learn. The default run takes the recipe on a quarter of its
    tokens (stage 1 checkpointing every 4 steps, so the stop lands well inside it); `-m slow` the whole."""
    address, run_dir, work = cluster.dashboard_url, tmp_path / "run", tmp_path / "work"
    for folder in ("recipes", "data"):
        shutil.copytree(REPO / folder, work / folder)
    if shrink > 1:
        shrink_recipe(work / "recipes" / "quickstart.toml", shrink, first_checkpoint_tokens=8192)
    recipe = str(work / "recipes" / "quickstart.toml")
    stage1 = run_dir / "stages" / "01-stage1-general"
    first = hanyeong(cluster, "pipeline", "submit", recipe, "--working-dir", str(work), "--address", address,
                     "--run-dir", str(run_dir), "-q")  # fmt: skip
    assert first.returncode == 0, first.stderr
    job = first.stdout.strip()
    assert job.startswith("raysubmit_") and "\n" not in job

    _wait_for(lambda: (stage1 / "checkpoint" / "checkpoint.json").is_file(), JOB_TIMEOUT_S, cluster, job)
    running = hanyeong(cluster, "pipeline", "status", "--address", address, job)
    assert running.returncode == 0 and f"job {job}: RUNNING" in running.stdout
    assert "1. stage1-general" in running.stdout and "running" in running.stdout  # the run dir is readable here
    stopped = hanyeong(cluster, "pipeline", "stop", "--address", address, job)
    assert stopped.returncode == 0 and f"{job}: STOPPED; submit again with --run-dir {run_dir}" in stopped.stdout
    worker = json.loads((stage1 / "attempts.jsonl").read_text().splitlines()[0])["pid"]
    _wait_for(lambda: not _alive(worker), 60, cluster, job)  # the job's stage worker went with it

    (work / "NOTES.md").write_text("a file changed between the two submissions\n")
    second = hanyeong(cluster, "pipeline", "submit", recipe, "--working-dir", str(work), "--address", address,
                      "--run-dir", str(run_dir), "--submission-id", "hanyeong-test-resume", "--wait",
                      timeout=JOB_TIMEOUT_S)  # fmt: skip
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stages = manifest["stages"]
    assert [s["status"] for s in stages] == ["done"] * 5
    assert all(s["last_loss"] < s["first_loss"] for s in stages), [(s["first_loss"], s["last_loss"]) for s in stages]
    assert stages[0]["resumed_from_step"] and stages[0]["resumed_from_step"] > 0, second.stdout
    assert len((stage1 / "attempts.jsonl").read_text().splitlines()) == 2  # one worker per job
    assert all(s["tokens"] == s["token_budget"] for s in stages)
    assert manifest["recipe"]["path"] == str(run_dir / ".job" / "working_dir" / "recipes" / "quickstart.toml")
    assert (run_dir / ".job" / "working_dir" / "NOTES.md").is_file()

    out = second.stdout
    assert out.startswith(f"submitted hanyeong-test-resume: recipes/quickstart.toml -> {run_dir} (on the cluster)\n")
    assert f"  dashboard: {address}/#/jobs/hanyeong-test-resume\n" in out
    assert f"hanyeong pipeline logs --address {address} hanyeong-test-resume --follow" in out
    assert "stage 1 'stage1-general': resuming" in out, out  # the job's output, followed
    assert "hanyeong-test-resume: SUCCEEDED" in second.stderr

    status = hanyeong(cluster, "pipeline", "status", "--address", address, "hanyeong-test-resume")
    assert status.returncode == 0 and "job hanyeong-test-resume: SUCCEEDED" in status.stdout
    assert f"run dir {run_dir}" in status.stdout and sum(" done " in line for line in status.stdout.splitlines()) == 5
    logs = hanyeong(cluster, "pipeline", "logs", "--address", address, "hanyeong-test-resume")
    assert logs.returncode == 0 and "stage 4 'stage4-sft': done" in logs.stdout
    listed = hanyeong(cluster, "pipeline", "status", "--address", address)
    assert f"{job}  STOPPED" in listed.stdout and "hanyeong-test-resume  SUCCEEDED" in listed.stdout


@pytest.mark.ray
def test_a_worker_node_joins_on_loopback_and_can_be_killed(cluster):
    """The fixture's second node (last here: its apple_silicon would make `backend = "auto"` MLX)."""
    worker = cluster.add_worker(num_cpus=1, resources={"apple_silicon": 1})
    try:
        resources = cluster.resources()
        assert resources["CPU"] == 3 and resources["apple_silicon"] == 1, resources
        assert not [(a, p) for a, p in cluster.listeners() if not a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:"))]
        head = set(cluster.pids()) - set(cluster.pids(worker))
    finally:
        killed = cluster.kill_node(worker)
    assert killed and _wait_for(lambda: not any(_alive(p) for p in killed), 10, cluster, "")
    assert all(_alive(p) for p in head & set(cluster.pids()))  # the head goes on
    assert hanyeong(cluster, "pipeline", "status", "--address", cluster.dashboard_url).returncode == 0


def _wait_for(condition, timeout_s: float, cluster, job: str):
    """Poll `condition` every 0.5 s; fail with the job's logs if it never holds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    logs = hanyeong(cluster, "pipeline", "logs", "--address", cluster.dashboard_url, job)
    pytest.fail(f"gave up after {timeout_s} s; the job's output:\n{logs.stdout[-4000:]}{logs.stderr[-2000:]}")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"  # a zombie is dead, only not reaped yet
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
