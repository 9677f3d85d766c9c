"""Audit the installed (locked) dependency set for known vulnerabilities.

    python scripts/audit_deps.py [--advisories DIR] [--lock-out FILE] [--out FILE]

1. Freezes the environment this Python runs in (``name==version`` of every installed
   distribution except cellatlas itself): the exact set ``make setup-test`` installed.
2. Runs ``pip-audit`` on that lock (``--no-deps --disable-pip``, PyPI's vulnerability
   service: the only one that needs nothing but PyPI). Where PyPI's per-release JSON API is
   not reachable, pip-audit can audit nothing and says so per package.
3. With ``--advisories DIR`` (a checkout of https://github.com/pypa/advisory-database, OSV
   YAML files under ``vulns/<package>/``), matches the lock against those advisories
   offline (OSV ``ECOSYSTEM`` ranges and explicit ``versions`` lists).

Findings listed in ``scripts/audit_explained.json`` (advisory id -> why it does not apply or
what was done) are reported as explained. Exit status: 0 audited and nothing unexplained,
1 unexplained findings, 2 nothing could be audited.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from importlib.metadata import distributions
from pathlib import Path

from packaging.version import InvalidVersion, Version

HERE = Path(__file__).resolve().parent
EXPLAINED = HERE / "audit_explained.json"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock() -> dict[str, str]:
    """``{canonical name: version}`` of every installed distribution but cellatlas."""
    out: dict[str, str] = {}
    for d in distributions():
        name = d.metadata["Name"]
        if name and canonical(name) != "cellatlas":
            out[canonical(name)] = d.version
    return dict(sorted(out.items()))


def pip_audit(locked: dict[str, str]) -> tuple[list[dict], int, int]:
    """``(findings, audited, skipped)`` from pip-audit's PyPI service."""
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "lock.txt"
        req.write_text("".join(f"{n}=={v}\n" for n, v in locked.items()))
        proc = subprocess.run(
            [sys.executable, "-m", "pip_audit", "-r", str(req), "--no-deps", "--disable-pip", "--format", "json",
             "--progress-spinner", "off"],
            capture_output=True, text=True,
        )
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        print(proc.stderr[-2000:], file=sys.stderr)
        return [], 0, len(locked)
    findings, audited, skipped = [], 0, 0
    for dep in report.get("dependencies", []):
        if dep.get("skip_reason"):
            skipped += 1
            continue
        audited += 1
        for v in dep.get("vulns", []):
            findings.append({"package": dep["name"], "version": dep["version"], "id": v["id"],
                             "fixed_in": ", ".join(v.get("fix_versions", [])), "source": "pip-audit (PyPI)"})
    return findings, audited, skipped


def _affected(version: Version, raw: str, affected: dict) -> bool:
    if raw in {str(v) for v in affected.get("versions", [])}:
        return True
    for rng in affected.get("ranges", []):
        if rng.get("type") != "ECOSYSTEM":
            continue
        inside = False  # events come in version order: the last one at or below `version` decides
        for event in rng.get("events", []):
            try:
                if "introduced" in event and version >= Version(str(event["introduced"])):
                    inside = True
                elif "fixed" in event and version >= Version(str(event["fixed"])):
                    inside = False
                elif "last_affected" in event and version > Version(str(event["last_affected"])):
                    inside = False
            except InvalidVersion:
                continue
        if inside:
            return True
    return False


def osv_match(locked: dict[str, str], advisories: Path) -> tuple[list[dict], int]:
    """Findings from an advisory-database checkout (``vulns/<package>/*.yaml``) and how many packages had advisories."""
    import yaml

    findings, covered = [], 0
    for name, raw in locked.items():
        folder = advisories / "vulns" / name
        if not folder.is_dir():
            continue
        covered += 1
        try:
            version = Version(raw)
        except InvalidVersion:
            continue
        for path in sorted(folder.glob("*.yaml")):
            adv = yaml.safe_load(path.read_text())
            if adv.get("withdrawn"):
                continue
            for aff in adv.get("affected", []):
                if canonical(aff.get("package", {}).get("name", "")) == name and _affected(version, raw, aff):
                    fixed = [e["fixed"] for r in aff.get("ranges", []) for e in r.get("events", []) if "fixed" in e]
                    findings.append({"package": name, "version": raw, "id": adv["id"], "fixed_in": ", ".join(map(str, fixed)),
                                     "source": "advisory-database", "aliases": adv.get("aliases", [])})
    return findings, covered


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--advisories", type=Path, help="checkout of pypa/advisory-database (offline matching)")
    ap.add_argument("--lock-out", type=Path, help="also write the frozen lock here")
    ap.add_argument("--out", type=Path, help="write the report (JSON) here")
    args = ap.parse_args()
    locked = lock()
    if args.lock_out:
        args.lock_out.write_text("".join(f"{n}=={v}\n" for n, v in locked.items()))
    explained = json.loads(EXPLAINED.read_text()) if EXPLAINED.exists() else {}
    findings, audited, skipped = pip_audit(locked)
    print(f"pip-audit (PyPI vulnerability service): {audited} of {len(locked)} packages audited, {skipped} could not be looked up")
    covered = 0
    if args.advisories:
        more, covered = osv_match(locked, args.advisories)
        stamp = subprocess.run(["git", "-C", str(args.advisories), "log", "-1", "--format=%cs %h"], capture_output=True, text=True).stdout.strip()
        print(f"advisory-database {stamp or '(no git)'}: {covered} installed packages have advisories there; {len(more)} match the installed versions")
        findings += more
    unexplained = []
    for f in findings:
        ids = {f["id"], *f.get("aliases", [])}
        why = next((explained[i] for i in ids if i in explained), None)
        f["explained"] = why
        print(f"  {f['package']} {f['version']}: {f['id']} (fixed in {f['fixed_in'] or '-'}) "
              + (f"-- explained: {why}" if why else "-- UNEXPLAINED"))
        if not why:
            unexplained.append(f)
    if args.out:
        args.out.write_text(json.dumps({"packages": len(locked), "pip_audit_audited": audited, "pip_audit_skipped": skipped,
                                        "advisories_covered": covered, "findings": findings}, indent=1))
    if audited == 0 and not args.advisories:
        print("Nothing could be audited: PyPI's per-release JSON API (used by pip-audit) is not reachable from here. "
              "Run with --advisories DIR (a pypa/advisory-database checkout) or where pypi.org is reachable.")
        return 2
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
