"""Talking to a Ray cluster's Jobs API (`JobSubmissionClient`, the dashboard's port) about a job.

    submit(address, spec) -> job id;  list_jobs / job_info / job_logs / follow_logs / stop_job / wait_job

Every Ray error becomes one ClusterError line. The address is checked for a listener first, so a
wrong one fails in seconds, not after Ray's retries.

Token authentication (Ray >= 2.59, on when the head has a token): Ray's client sends a token only
when RAY_AUTH_MODE=token is set where it runs (ray/_private/authentication/http_token_authentication.py,
get_auth_headers_if_auth_enabled), so here the token Ray's loader finds (RAY_AUTH_TOKEN, else the
file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token) is sent whenever there is one; the dashboard
answers 401 without a token and 403 with another one, both turned into one line here.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.parse
from contextlib import contextmanager

from hanyeong.errors import HanyeongError
from orchestration.cluster.jobs import JobSpec, dashboard_url

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
PORT_HELP = "is that the dashboard's port (8265 unless `ray start --dashboard-port`; not the GCS port 6379)?"
TOKEN_HELP = "copy the head's ~/.ray/auth_token here, or set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH)"


class ClusterError(HanyeongError):
    """The Ray cluster cannot be reached, refuses us, or does not know the job."""


def submit(address: str, spec: JobSpec) -> str:
    """Upload the working dir and packages, submit the job; returns its submission id."""
    client = connect(address)
    with cluster_errors(address), quiet_ray_logs():
        try:
            return client.submit_job(entrypoint=spec.entrypoint, runtime_env=spec.runtime_env, metadata=spec.metadata,
                                     submission_id=spec.submission_id)  # fmt: skip
        except ValueError as err:  # the runtime env: a package over Ray's size limit, a bad pip line
            raise ClusterError(f"cannot submit: {_first_line(err)}") from None


def list_jobs(address: str) -> list[dict]:
    """job_info of every hanyeong job the cluster knows, oldest first."""
    client = connect(address)
    with cluster_errors(address):
        found = [_info_dict(j) for j in client.list_jobs() if (j.metadata or {}).get("hanyeong")]
    return sorted(found, key=lambda j: j.get("start_time") or 0)


def job_info(address: str, job_id: str, client=None) -> dict:
    """{"job_id", "status", "message", "start_time", "end_time" (epoch ms), "entrypoint", "metadata", ...}."""
    client = client or connect(address)
    with cluster_errors(address, job_id):
        return _info_dict(client.get_job_info(job_id))


def job_reason(info: dict) -> str:
    """One line on how the job ended: the run's own `error: ...` line when Ray's message quotes the
    job's last output (a failed job), else the message's first line."""
    lines = [line.strip() for line in (info.get("message") or "").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    return errors[-1] if errors else (lines[0] if lines else "")


def _info_dict(info) -> dict:
    data = info.dict() if hasattr(info, "dict") else dict(vars(info))
    data["status"] = getattr(info.status, "value", str(info.status))
    data["job_id"] = info.submission_id or info.job_id
    data["metadata"] = data.get("metadata") or {}
    return data


def job_logs(address: str, job_id: str) -> str:
    client = connect(address)
    with cluster_errors(address, job_id):
        return client.get_job_logs(job_id)


def follow_logs(address: str, job_id: str, write) -> dict:
    """Write the job's output as it comes until the job ends; returns job_info at the end."""
    import asyncio

    import aiohttp

    client = connect(address)
    with cluster_errors(address, job_id):
        client.get_job_info(job_id)  # an unknown id: one line, not a failed websocket handshake

        async def tail():
            async for chunk in client.tail_job_logs(job_id):
                write(chunk)

        try:
            with quiet_ray_logs():
                asyncio.run(tail())
        except (RuntimeError, OSError, aiohttp.ClientError):  # the stream broke off: polled below
            pass
    return wait_job(address, job_id, client=client)


def stop_job(address: str, job_id: str) -> bool:
    """Ask the job to stop (SIGTERM, SIGKILL 3 s later); False when it had already ended."""
    client = connect(address)
    with cluster_errors(address, job_id):
        return client.stop_job(job_id)


def wait_job(address: str, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0, client=None) -> dict:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED (or `timeout_s` passes); its job_info."""
    client = client or connect(address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        info = job_info(address, job_id, client)
        if info["status"] in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return info
        time.sleep(poll_s)


def connect(address: str):
    """A JobSubmissionClient for the dashboard at `address`, with the token when there is one."""
    url = dashboard_url(address)
    check_reachable(url)
    headers = auth_headers()
    from ray.job_submission import JobSubmissionClient

    with cluster_errors(url), without_env("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        return JobSubmissionClient(url, headers=headers)  # (those variables would override `url`)


def check_reachable(url: str, timeout_s: float = 5.0) -> None:
    """A quick TCP connect: an unreachable host fails in seconds, not the OS's 2-minute timeout."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as err:
        reason = "no answer" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise ClusterError(f"cannot reach the Ray dashboard at {url} ({reason}): is the head up, and {PORT_HELP}") from None


def auth_headers() -> dict:
    """{"Authorization": "Bearer TOKEN"} from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token
    (Ray's own loader, in that order), whatever RAY_AUTH_MODE says here; {} without a token."""
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # the variables may have changed since Ray first looked
    try:
        if not loader.has_token(ignore_auth_mode=True):
            return {}
        return {"Authorization": "Bearer " + loader.get_raw_token(ignore_auth_mode=True)}
    except AuthenticationError:  # RAY_AUTH_TOKEN_PATH names a missing or empty file
        raise ClusterError(f"RAY_AUTH_TOKEN_PATH={os.environ.get('RAY_AUTH_TOKEN_PATH')}: no token in that file; "
                           f"{TOKEN_HELP}") from None  # fmt: skip


def token_source() -> str:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token"


@contextmanager
def cluster_errors(address: str, job_id: str | None = None):
    """Ray's exceptions from the Jobs API as one ClusterError line each."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as err:
        if "Authentication failed" in err.message:  # 403: a token, not the cluster's
            raise ClusterError(f"the Ray cluster at {address} refused the request: the token from {token_source()} "
                               f"is not its token; {TOKEN_HELP}") from None  # fmt: skip
        raise ClusterError(f"the Ray cluster at {address} refused the request: it needs its token; {TOKEN_HELP}") from None
    except (ConnectionError, requests.exceptions.RequestException) as err:
        raise ClusterError(f"no Ray dashboard answers at {address} ({_first_line(err)}): {PORT_HELP}") from None
    except RuntimeError as err:
        text = str(err)
        if text.startswith("Version check returned 404"):  # something else listens there
            raise ClusterError(f"{address} answers, but not as a Ray dashboard: {PORT_HELP}") from None
        if job_id is not None and ("status code 404" in text or "does not exist" in text):
            raise ClusterError(f"no job {job_id!r} on the Ray cluster at {address}") from None
        if "already exists. Please use a different submission_id" in text:
            raise ClusterError(f"the Ray cluster at {address} has a job with that --submission-id already; "
                               "pick another, or leave it out for a new one") from None  # fmt: skip
        raise ClusterError(f"the Ray cluster at {address}: {_server_error(text)}") from None


@contextmanager
def quiet_ray_logs():
    """Ray's lines about zipping and uploading each package (and, once each, that .git, .venv, venv
    and __pycache__ are now left out by default, which EXCLUDES does anyway) kept off the terminal."""
    import logging

    names = {"ray._private.runtime_env.packaging": logging.WARNING, "ray._private.runtime_env.working_dir": logging.ERROR,
             "ray.dashboard.modules.dashboard_sdk": logging.WARNING, "ray.dashboard.modules.job.sdk": logging.WARNING}  # fmt: skip
    loggers = [logging.getLogger(n) for n in names]
    levels = [logger.level for logger in loggers]
    for logger, level in zip(loggers, names.values()):
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextmanager
def without_env(*names: str):
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _server_error(text: str) -> str:
    """The line that says what went wrong: the exception at the end of a server-side traceback
    that Ray passes on in the message, else the message's first line."""
    lines = [line.strip() for line in text.splitlines() if line.strip().strip(".")]
    if "Traceback (most recent call last)" in text:
        return lines[-1] if lines else text
    return lines[0] if lines else text


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
