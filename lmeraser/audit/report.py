"""`audit report`: one self-contained HTML page (plots embedded) over the whole lineage log."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from lmeraser.audit.forgetting import fleet, plot_p_values, request_verdicts
from lmeraser.io import atomic_write_text
from lmeraser.lineage.log import Record
from lmeraser.lineage.records import summary_row
from lmeraser.workspace import Workspace


def png_bytes(fig) -> bytes:
    """A matplotlib figure as PNG bytes (100 dpi, tight bounding box).

    Args:
        fig: the figure; the caller closes it.
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _png(fig) -> str:
    return base64.b64encode(png_bytes(fig)).decode()


def request_rows(records: list[Record]) -> list[dict[str, str]]:
    """One line per request: what was asked, on what legal basis, when it was received and
    completed, by which record, which clusters changed, which stores were purged, what the scan
    covered. A request answered by influence first appears twice: approximate, then exact.

    Args:
        records: the lineage records the report covers, in order.
    """
    rows = []
    for record in records:
        if record.is_rotation:  # a change of signer, not a request: the verification line names it
            continue
        p = record.predicate
        exact = p.get("method") != "influence"
        clusters = p["clusters_rebuilt"] if exact else p["clusters_edited"]
        purge = p.get("purge", {}) if exact else {}
        stores = ", ".join(
            name
            for name, done in (
                ("MLflow", "artifact_files_removed" in purge),
                ("DVC cache", purge.get("dvc_gc")),
                ("DVC remote", purge.get("remote_gc")),
            )
            if done
        )
        scanned = (p.get("verification", {}).get("scan", {}) or {}).get("files_scanned", {}) if exact else {}
        for request in p["requests"]:
            rows.append(
                {
                    "request": request["request_id"],
                    "kind": request["kind"],
                    "legal basis": request.get("legal_basis", "-"),
                    "samples": str(request.get("samples", "-")),
                    "received": request.get("received_at") or "-",
                    "completed": (request.get("completed_at") or "-") if exact else "queued (approximate served)",
                    "record": f"{record.number} ({'exact' if exact else 'influence'})",
                    "clusters": ",".join(str(c["cluster"]) for c in clusters) or "-",
                    "stores purged": stores or "-",
                    "scan coverage": ", ".join(f"{k} {v}" for k, v in scanned.items()) or "-",
                    "forgetting audit": request_verdicts(p, request["request_id"]),
                }
            )
    return rows


def _table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "<p>none</p>"
    header = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row.values()) + "</tr>" for row in rows)
    return f"<table><tr>{header}</tr>{cells}</table>"


def build_report(ws: Workspace, records: list[Record], out: Path, signer: str | None, failure: str | None) -> Path:
    """The HTML audit report over `records`, written atomically to `out`.

    Args:
        ws: the workspace the records describe.
        records: the verified records, in order.
        out: where the HTML goes.
        signer: the key id the records verified under.
        failure: a verification error, shown first, in red (the report is still written).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    if ws.cluster_report.exists():
        sizes = json.loads(ws.cluster_report.read_text())["sizes"]
        fig, ax = plt.subplots(figsize=(8, 3))
        ax.bar(range(len(sizes)), sizes, color="#55a868")
        ax.set(xlabel="cluster", ylabel="private samples", title="current cluster sizes")
        figures.append(("Cluster sizes", _png(fig)))
        plt.close(fig)
    # Accuracy and membership inference come from exact batches; influence records only edit.
    approximate = [r for r in records if r.predicate.get("method") == "influence"]
    exact = [r for r in records if r.predicate.get("method") != "influence" and not r.is_rotation]
    numbers = [r.number for r in exact]
    fig, ax = plt.subplots(figsize=(8, 3))
    for r in exact:
        clusters = [c["cluster"] for c in r.predicate["clusters_rebuilt"]]
        ax.scatter(
            [r.number] * len(clusters), clusters, color="#c44e52", label="exact rebuild" if r is exact[0] else None
        )
    for r in approximate:
        clusters = [c["cluster"] for c in r.predicate["clusters_edited"]]
        ax.scatter(
            [r.number] * len(clusters),
            clusters,
            color="#8172b2",
            marker="x",
            label="influence (approximate)" if r is approximate[0] else None,
        )
    if records:
        ax.legend()
    ax.set(xlabel="lineage record", ylabel="cluster", title="clusters changed by each record")
    figures.append(("Rebuilt clusters", _png(fig)))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.plot(numbers, [r.predicate["accuracy"]["before"] for r in exact], "o--", label="before")
    ax.plot(numbers, [r.predicate["accuracy"]["after"] for r in exact], "o-", label="after")
    ax.set(xlabel="lineage record", ylabel="test accuracy", title="accuracy over time")
    ax.legend()
    figures.append(("Accuracy", _png(fig)))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 3))
    for label, key, style in (("before unlearning", "before", "o--"), ("after unlearning", "after", "o-")):
        points = [(r.number, (r.predicate["verification"]["membership_inference"] or {}).get(key) or {}) for r in exact]
        points = [(n, m["auc"]) for n, m in points if isinstance(m, dict) and "auc" in m]
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set(
        xlabel="lineage record",
        ylabel="AUC",
        title="population membership inference (loss threshold): forgotten samples vs test",
    )
    ax.legend()
    figures.append(("Membership inference", _png(fig)))
    plt.close(fig)

    audits = fleet(records)
    if audits["records"]:
        fig = plot_p_values(audits)
        figures.append(("Forgetting audit: post-forget p-values", _png(fig)))
        plt.close(fig)
    rows = [{**summary_row(r), "record sha256": r.line_sha256[:16]} for r in records]
    if failure:
        status = (
            f'<p class="fail">VERIFICATION FAILED: {html.escape(failure)}<br>'
            "Nothing below is vouched for by a valid signature.</p>"
        )
    else:
        status = (
            '<p class="ok">Verified before this report was written: '
            f"every signature (key {html.escape(signer or '')}), "
            "the hash chain, and the deployed artifacts against the latest record.</p>"
        )
    body = (
        """<!doctype html><html><head><meta charset="utf-8"><title>lmeraser audit report</title>
<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px 8px}.fail{background:#fdd;border:2px solid #c00;padding:1em;font-weight:bold}
.ok{background:#dfd;padding:.5em}</style></head>
"""
        f"""<body><h1>lmeraser audit report</h1>{status}
<p>{len(records)} lineage record(s); signing key fingerprint: {html.escape(signer or "unverified")}.</p>
<h2>Requests</h2>{_table(request_rows(records))}
<h2>Forgetting audit</h2>{_table(fleet_rows(audits))}
<h2>Records</h2>{_table(rows)}
{"".join(f'<h2>{html.escape(t)}</h2><img alt="{html.escape(t)}" src="data:image/png;base64,{b}">' for t, b in figures)}
</body></html>"""
    )
    atomic_write_text(out, body)
    return out


def fleet_rows(audits: dict) -> list[dict[str, str]]:
    """The fleet view's table: per method, verdict counts and the forget quality.

    Args:
        audits: `forgetting.fleet`'s summary of the records' audits.
    """
    rows = []
    for name, method in sorted(audits["methods"].items()):
        quality = method["forget_quality"]
        rows.append(
            {
                "method": name,
                "records": str(len(method["records"])),
                **{verdict: str(n) for verdict, n in method["verdicts"].items()},
                "forget quality (KS p vs uniform)": "-"
                if quality is None
                else f"{quality['ks_p_value']:.3g} (D={quality['ks_statistic']:.3f}, n={quality['n']})",
            }
        )
    return rows
