"""The dependency audit's offline matcher (scripts/audit_deps.py) on synthetic OSV advisories."""

from __future__ import annotations

import yaml

from scripts.audit_deps import osv_match


def test_osv_ranges_and_version_lists_match_only_affected_versions(tmp_path):
    folder = tmp_path / "vulns" / "requests"
    folder.mkdir(parents=True)
    (folder / "PYSEC-1.yaml").write_text(yaml.safe_dump({
        "id": "PYSEC-1", "aliases": ["CVE-1"],
        "affected": [{"package": {"name": "requests", "ecosystem": "PyPI"},
                      "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "2.3.0"},
                                                                  {"introduced": "2.30.0"}, {"fixed": "2.31.1"}]}]}],
    }))
    (folder / "PYSEC-2.yaml").write_text(yaml.safe_dump({
        "id": "PYSEC-2", "affected": [{"package": {"name": "requests"}, "versions": ["2.10.0"]}]}))
    (folder / "PYSEC-3.yaml").write_text(yaml.safe_dump({
        "id": "PYSEC-3", "withdrawn": "2020-01-01", "affected": [{"package": {"name": "requests"}, "versions": ["2.10.0"]}]}))

    def ids(version):
        return sorted(f["id"] for f in osv_match({"requests": version, "numpy": "2.0.0"}, tmp_path)[0])

    assert ids("2.2.0") == ["PYSEC-1"]
    assert ids("2.3.0") == []
    assert ids("2.10.0") == ["PYSEC-2"]
    assert ids("2.30.5") == ["PYSEC-1"]
    assert ids("2.31.1") == []
