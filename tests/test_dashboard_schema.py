"""The Grafana dashboards against Grafana's own schema, with no Grafana: each one typed as the `Dashboard` of
@grafana/schema (the TypeScript types of Grafana's dashboard model) and checked by tsc. An object literal assigned
to a typed constant may hold only the type's properties, so a misspelt or unknown field fails; panel `options` and
`targets` are typed per plugin there (as open records), so their insides are not checked. Packages and versions:
tests/grafana_schema (npm ci --prefix tests/grafana_schema, which make test runs)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import REPO
from .test_chart import render, scenario

PACKAGE = REPO / "tests" / "grafana_schema"
TSC = PACKAGE / "node_modules" / "typescript" / "bin" / "tsc"
DASHBOARDS = REPO / "deploy" / "grafana" / "dashboards"
# The oldest Grafana docs/metrics.md promises (10, whose last line is 10.4) and the newest: a field that either
# lacks fails.
SCHEMAS = {"grafana-10.4": "grafana-schema-10", "grafana-13.2": "@grafana/schema"}


def typecheck(dashboards: dict[str, str], schema: str, directory: Path) -> tuple[int, str]:
    """tsc's exit code and report on each dashboard (JSON text by name) typed as `schema`'s Dashboard; the report
    names the dashboard and the line of its JSON."""
    if shutil.which("node") is None:
        pytest.fail("Node.js is missing: install Node.js 18+ and npm (.ci/run does)")
    if not TSC.exists():
        pytest.fail(f"{TSC.relative_to(REPO)} is missing: run `npm ci --prefix tests/grafana_schema` (make test does)")
    (directory / "node_modules").symlink_to(PACKAGE / "node_modules")
    config = {"extends": str(PACKAGE / "tsconfig.json"), "include": ["*.ts"]}
    (directory / "tsconfig.json").write_text(json.dumps(config))
    for number, text in enumerate(dashboards.values()):
        # The literal starts on line 1, so tsc's line numbers are the JSON's.
        (directory / f"dashboard{number}.ts").write_text(
            f"import type {{ Dashboard }} from '{schema}'; export const dashboard: Dashboard = {text.strip()};\n")
    result = subprocess.run(["node", str(TSC), "--project", ".", "--pretty", "false"], cwd=directory,
                            capture_output=True, text=True, timeout=300)
    names = list(dashboards)
    report = re.sub(r"^dashboard(\d+)\.ts", lambda m: names[int(m.group(1))], result.stdout + result.stderr,
                    flags=re.M)
    return result.returncode, report


def chart_dashboards() -> dict[str, str]:
    """The dashboards as the chart renders them (uid and title set per release), by ConfigMap and key."""
    objects, _ = render(scenario("monitoring"))
    [configmap] = [o for o in objects if o["kind"] == "ConfigMap" and "grafana_dashboard" in o["metadata"]["labels"]]
    return {f"ConfigMap {configmap['metadata']['name']} {key}": text for key, text in configmap["data"].items()}


@pytest.mark.parametrize("schema", SCHEMAS.values(), ids=SCHEMAS.keys())
def test_dashboards_match_grafanas_schema(schema, tmp_path):
    dashboards = {str(p.relative_to(REPO)): p.read_text() for p in sorted(DASHBOARDS.glob("*.json"))}
    rendered = chart_dashboards()
    assert len(dashboards) == len(rendered) >= 2
    code, report = typecheck({**dashboards, **rendered}, schema, tmp_path)
    assert code == 0, report


def misspell(key: str, wrong: str, where=lambda dashboard: dashboard):
    """A mutation: the field `key` of the object `where` picks in a dashboard renamed `wrong`."""
    def mutate(dashboard: dict) -> None:
        part = where(dashboard)
        part[wrong] = part.pop(key)
    return mutate


MISSPELLINGS = {
    "titel": misspell("title", "titel", lambda d: d["panels"][0]),
    "refesh": misspell("refresh", "refesh"),
    "includeAl": misspell("includeAll", "includeAl", lambda d: d["templating"]["list"][-1]),
    "units": misspell("unit", "units", lambda d: d["panels"][0]["fieldConfig"]["defaults"]),
    "grid": misspell("gridPos", "grid", lambda d: d["panels"][-1]),
}


@pytest.mark.parametrize("schema", SCHEMAS.values(), ids=SCHEMAS.keys())
def test_a_misspelt_field_fails(schema, tmp_path):
    """In a panel, the dashboard, a variable, a field config, the last panel: one dashboard each, one tsc run."""
    dashboards = {}
    for wrong, mutate in MISSPELLINGS.items():
        dashboard = json.loads((DASHBOARDS / "trainer.json").read_text())
        mutate(dashboard)
        dashboards[f"{wrong}.json"] = json.dumps(dashboard, indent=2)
    code, report = typecheck(dashboards, schema, tmp_path)
    assert code != 0, report
    for wrong in MISSPELLINGS:
        assert re.search(rf"^{wrong}\.json\(\d+,\d+\): error TS\d+: .*'\"{wrong}\"'", report, re.M), report
