"""Dependency audit where pip-audit cannot run: report PyPI's known vulnerabilities for every
distribution installed in an environment.

    python deploy/audit/pypi_advisories.py [--accept deploy/audit/accepted.txt] [--json]

Run it with the audited environment's python (`make audit` does).

pip-audit asks PyPI's per-version JSON API or OSV; where only the package-level JSON API is
reachable (this project's build machines), that API still lists the vulnerabilities of a
package's newest release. So a distribution installed at its newest release is audited exactly;
an older one is reported as "not audited" with the newest version, never as clean.
Exit code 1 when a vulnerability is found that the --accept file does not list (one advisory id
per line, then why it is accepted; docs/reliability.md explains each).
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import distributions

API = "https://pypi.org/pypi/{name}/json"
PROJECT = "imagenet-k8s-trainer"   # this project itself: not on PyPI


def advisories(name: str, version: str) -> dict:
    try:
        with urllib.request.urlopen(API.format(name=name), timeout=30) as response:
            data = json.load(response)
    except OSError as exc:
        return {"name": name, "version": version, "status": "not audited", "detail": f"PyPI unreachable: {exc}"}
    latest = data["info"]["version"]
    if latest != version:
        return {"name": name, "version": version, "status": "not audited", "detail": f"newest is {latest}"}
    vulns = [{"id": v["id"], "aliases": v.get("aliases", []), "fixed_in": v.get("fixed_in", []),
              "summary": (v.get("summary") or v.get("details", ""))[:200]} for v in data.get("vulnerabilities", [])]
    return {"name": name, "version": version, "status": "vulnerable" if vulns else "clean", "vulnerabilities": vulns}


def version_of() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PROJECT)
    except PackageNotFoundError:
        return None


def accepted_ids(path: str | None) -> set[str]:
    if path is None:
        return set()
    with open(path) as lines:
        return {line.split()[0] for line in lines if line.strip() and not line.startswith("#")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accept", help="file of accepted advisory ids, one per line with the reason")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    accepted = accepted_ids(args.accept)
    installed = sorted({(d.metadata["Name"].lower(), d.version) for d in distributions()} - {(PROJECT, version_of())})
    with ThreadPoolExecutor(8) as pool:
        report = list(pool.map(lambda nv: advisories(*nv), installed))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for entry in report:
            print(f"{entry['name']:32} {entry['version']:16} {entry['status']} {entry.get('detail', '')}")
            for vuln in entry.get("vulnerabilities", []):
                state = "accepted" if {vuln["id"], *vuln["aliases"]} & accepted else "OPEN"
                print(f"    {state} {vuln['id']} ({' '.join(vuln['aliases'])}), fixed in "
                      f"{', '.join(vuln['fixed_in']) or 'no release'}: {vuln['summary']}")
    counts = {s: sum(e["status"] == s for e in report) for s in ("clean", "vulnerable", "not audited")}
    print(f"{len(report)} distributions: " + ", ".join(f"{n} {s}" for s, n in counts.items()), file=sys.stderr)
    open_ids = {v["id"] for e in report for v in e.get("vulnerabilities", []) if not {v["id"], *v["aliases"]} & accepted}
    return 1 if open_ids else 0


if __name__ == "__main__":
    sys.exit(main())
