"""`python -m ingest.wait URL [--job NAME --namespace NS]`: wait until a dataset's manifest.json exists
(the ingest writes it last, once every shard is committed); with --job, give up once that ingest Job
has failed, instead of holding the waiting pod's GPUs forever. The chart's init container
`wait-for-data` runs it in the trainer pods of a release that also ingests (docs/kubernetes.md).

The Job's status comes from the Kubernetes API: with the pod's service account when
KUBERNETES_SERVICE_HOST is set (in-cluster config), else from a kubeconfig ($KUBECONFIG, else
~/.kube/config). Without access (no credentials, API unreachable, forbidden, no such Job) it says so
once and keeps waiting on the data alone.

    exit 0: manifest.json is there; 3: the ingest Job has failed, one line naming it and why;
    1: the data's storage kept failing; 2: bad command line; 143: SIGTERM
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time

import fsspec

from . import cli
from .errors import EXIT_INPUT, IngestError
from .storage import storage_call

log = logging.getLogger("ingest.wait")   # not __name__: that is __main__ under python -m

API_TIMEOUT_SECONDS = 10   # for one read of the Job: the data is waited on between reads


class IngestJobFailed(IngestError):
    exit_code = EXIT_INPUT


class IngestJob:
    """The ingest Job's status, read through the Kubernetes API; `failure()` is None while it has not failed
    or cannot be read."""

    def __init__(self, name: str, namespace: str):
        self.name, self.namespace = name, namespace
        self._warned = False
        self._api, problem = _batch_api()
        if problem:
            self._warn(problem)

    def failure(self) -> str | None:
        """`reason: message` of the Job's Failed condition once it has one."""
        if self._api is None:
            return None
        import urllib3
        from kubernetes.client.exceptions import ApiException

        try:
            job = self._api.read_namespaced_job(self.name, self.namespace, _request_timeout=API_TIMEOUT_SECONDS)
        except (ApiException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:   # ValueError: not a Job
            self._warn(_api_problem(exc))
            return None
        self._warned = False   # reading works again: a later problem is worth a line
        failed = [c for c in (job.status and job.status.conditions) or [] if c.type == "Failed" and c.status == "True"]
        if not failed:
            return None
        return ": ".join(part for part in (failed[0].reason, failed[0].message) if part) or "no reason given"

    def _warn(self, problem: str) -> None:
        if not self._warned:
            log.warning("cannot read the status of ingest Job %s/%s: %s; waiting on the data alone",
                        self.namespace, self.name, problem)
        self._warned = True


def _batch_api():
    """(BatchV1Api, None) from the in-cluster service account, else a kubeconfig; or (None, why not)."""
    try:
        import yaml
        from kubernetes import client, config
    except ImportError:
        return None, "the kubernetes client is not installed (the project's k8s extra)"
    configuration = client.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(client_configuration=configuration)
    except (config.ConfigException, OSError, yaml.YAMLError) as exc:
        return None, f"no Kubernetes API credentials ({_one_line(exc)})"
    configuration.retries = 0   # one request per read: the client would retry an unreachable API, logging each
    return client.BatchV1Api(client.ApiClient(configuration)), None


def _api_problem(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    if isinstance(status, int):   # an answer from the API server
        return f"HTTP {status} {getattr(exc, 'reason', '')}".rstrip()
    return f"API not reachable ({_one_line(exc)})"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def wait(url: str, fs: fsspec.AbstractFileSystem, root: str, job: IngestJob | None, interval: float) -> None:
    manifest = root.rstrip("/") + "/manifest.json"
    while True:
        with storage_call(fs, manifest, "check"):
            if fs.exists(manifest):
                log.info("%s/manifest.json is there", url.rstrip("/"))
                return
        failure = job.failure() if job else None
        if failure:
            raise IngestJobFailed(f"ingest Job {job.namespace}/{job.name} has failed ({failure}): "
                                  f"{url.rstrip('/')}/manifest.json will never be written")
        log.info("waiting for %s/manifest.json (the ingest writes it last)", url.rstrip("/"))
        time.sleep(interval)
        fs.invalidate_cache()   # a listing cached by s3fs or gcsfs would hide the new object


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 3600] seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ingest.wait", description=__doc__.split("\n\n")[0],
        epilog="exit codes: 0 manifest.json is there; 3 the ingest Job has failed; 1 storage kept failing; "
               "2 bad command line; 143 stopped by SIGTERM")
    parser.add_argument("url", help="the dataset: the --output of ingest.shard (path or fsspec URL)")
    parser.add_argument("--job", help="the ingest Job's name: give up once it has failed")
    parser.add_argument("--namespace", default="default", help="the ingest Job's namespace (default: default)")
    parser.add_argument("--poll-interval", type=_seconds, default=30.0, metavar="SECONDS",
                        help="seconds between checks (default 30)")
    return parser


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def _check_url(url: str) -> None:
    """Refuse what would name no dataset: an empty URL waits on the working directory's manifest.json and
    `s3://` on `/manifest.json`, forever."""
    if not url.strip():
        raise ValueError("URL is empty: give the dataset's location (the --output of ingest.shard)")
    if url != url.strip():
        raise ValueError(f"URL {url!r} has leading or trailing white space")
    if "://" in url:
        protocols, _, path = url.rpartition("://")
        scheme = protocols.rpartition("::")[2]   # fsspec chains: simplecache::s3://...
        if not all(_SCHEME.fullmatch(p) for p in protocols.split("::")):
            raise ValueError(f"URL {url!r} is malformed: no protocol before :// (e.g. s3://bucket/dataset)")
        if not path.strip("/"):
            raise ValueError(f"URL {url!r} names no bucket or path after {scheme}://")
    elif (match := re.match(r"([A-Za-z][A-Za-z0-9+.-]*):/(?!/)", url)):
        raise ValueError(f"URL {url!r} is malformed: one slash after {match[1]}: ({match[1]}://...?)")


def _open(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    _check_url(url)
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:   # an unknown protocol, or its library not installed
        raise ValueError(f"cannot open {url}: {_one_line(exc)}") from None


def main(argv: list[str] | None = None) -> int:
    args, (fs, root) = cli.parse(build_parser(), argv, lambda a: _open(a.url))

    def body() -> None:
        wait(args.url, fs, root, IngestJob(args.job, args.namespace) if args.job else None, args.poll_interval)

    return cli.run_main(body, kept="nothing was written")


if __name__ == "__main__":
    sys.exit(main())
