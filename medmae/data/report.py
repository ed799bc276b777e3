"""The validation report a scan writes next to its manifest (``NAME.report.json``) and prints on screen.

Format::

    {"manifest": "archive.jsonl", "root": "/data/archive",
     "counts": {"ok": 812, "skipped": 57},              # records and non-image files, by status
     "reasons": {"localizer": 31, "not-image": 12, ...}, # skipped items, by reason code
     "files": {"seen": 160231, "read": 2114, "reused": 158117},
     "issues": [{"item": "ct-3f9a1b2c4d5e6f70", "kind": "series", "status": "skipped",
                 "code": "too-few-slices", "reason": "2 slices; at least 10 needed"}, ...]}

``issues`` holds one line per skipped file or series and per record kept with a note (a resampled series,
NaN voxels replaced). An ``item`` is a path relative to the scanned root, or a series id.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medmae.io.atomic import temporary_beside

SHOWN_ON_SCREEN = 25


@dataclass(frozen=True)
class Issue:
    """One skipped (or noted) file or series.

    Args:
        item: path relative to the scanned root, or a series id.
        kind: ``"file"`` or ``"series"``.
        status: ``"skipped"``, or ``"ok"`` for a record kept with a note.
        code: short reason category, e.g. ``"localizer"``, ``"unreadable"``.
        reason: one readable sentence.
    """

    item: str
    kind: str
    status: str
    code: str
    reason: str


@dataclass
class ScanReport:
    """Counts and issues of one scan; ``counts`` is filled from the records and skipped files."""

    root: str
    manifest: str
    counts: Counter = field(default_factory=Counter)
    issues: list[Issue] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)

    def add(self, item: str, kind: str, status: str, code: str, reason: str) -> None:
        self.issues.append(Issue(item, kind, status, code, reason))

    def reasons(self) -> Counter:
        return Counter(issue.code for issue in self.issues if issue.status == "skipped")

    def to_json(self) -> dict[str, Any]:
        return {
            "manifest": self.manifest,
            "root": self.root,
            "counts": dict(sorted(self.counts.items())),
            "reasons": dict(sorted(self.reasons().items())),
            "files": self.files,
            "issues": [asdict(issue) for issue in sorted(self.issues, key=lambda i: (i.status, i.code, i.item))],
        }

    def write(self, path: Path) -> Path:
        """Write the JSON report atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temporary_beside(path)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(self.to_json(), handle, indent=1)
            handle.write("\n")
        os.replace(tmp, path)
        return path

    def summary(self, limit: int = SHOWN_ON_SCREEN) -> str:
        """A readable summary: counts per status and reason, then the first ``limit`` issues."""
        counts = ", ".join(f"{n} {status}" for status, n in sorted(self.counts.items())) or "nothing found"
        lines = [f"scanned {self.root}: {counts}"]
        if self.files:
            lines.append("files: " + ", ".join(f"{n} {what}" for what, n in self.files.items()))
        reasons = self.reasons()
        if reasons:
            lines.append("skipped by reason: " + ", ".join(f"{code} {n}" for code, n in reasons.most_common()))
        for issue in sorted(self.issues, key=lambda i: (i.status, i.code, i.item))[:limit]:
            lines.append(f"  {issue.status:8s} {issue.kind:6s} {issue.item}: {issue.reason}")
        if len(self.issues) > limit:
            lines.append(f"  ... and {len(self.issues) - limit} more in the JSON report")
        return "\n".join(lines)
