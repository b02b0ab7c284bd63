"""`audit report`: one self-contained HTML page (plots embedded) over the whole lineage log."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from lmeraser.io import atomic_write_text


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def build_report(root: Path, records: list, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    sizes_path = root / "reports" / "clusters.json"
    if sizes_path.exists():
        sizes = json.loads(sizes_path.read_text())["sizes"]
        fig, ax = plt.subplots(figsize=(8, 3))
        ax.bar(range(len(sizes)), sizes, color="#55a868")
        ax.set(xlabel="cluster", ylabel="private samples", title="current cluster sizes")
        figures.append(("Cluster sizes", _png(fig)))
        plt.close(fig)
    approximate = [r for r in records if r.predicate.get("method") == "influence"]
    all_records, records = records, [r for r in records if r.predicate.get("method") != "influence"]
    numbers = [r.number for r in records]
    fig, ax = plt.subplots(figsize=(8, 3))
    for r in records:
        clusters = [c["cluster"] for c in r.predicate["clusters_rebuilt"]]
        ax.scatter([r.number] * len(clusters), clusters, color="#c44e52", label="exact rebuild" if r is records[0] else None)
    for r in approximate:
        clusters = [c["cluster"] for c in r.predicate["clusters_edited"]]
        ax.scatter([r.number] * len(clusters), clusters, color="#8172b2", marker="x", label="influence (approximate)" if r is approximate[0] else None)
    if records or approximate:
        ax.legend()
    ax.set(xlabel="lineage record", ylabel="cluster", title="clusters changed by each record")
    figures.append(("Rebuilt clusters", _png(fig)))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.plot(numbers, [r.predicate["accuracy"]["before"] for r in records], "o--", label="before")
    ax.plot(numbers, [r.predicate["accuracy"]["after"] for r in records], "o-", label="after")
    ax.set(xlabel="lineage record", ylabel="test accuracy", title="accuracy over time")
    ax.legend()
    figures.append(("Accuracy", _png(fig)))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 3))
    for label, key, style in (("before unlearning", "before", "o--"), ("after unlearning", "after", "o-")):
        points = [(r.number, (r.predicate["verification"]["membership_inference"] or {}).get(key) or {}) for r in records]
        points = [(n, m["auc"]) for n, m in points if isinstance(m, dict) and "auc" in m]
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set(xlabel="lineage record", ylabel="AUC", title="membership inference (loss threshold) on forgotten samples vs test")
    ax.legend()
    figures.append(("Membership inference", _png(fig)))
    plt.close(fig)

    def cells(r) -> tuple:
        p = r.predicate
        if p.get("method") == "influence":
            return (r.number, "influence (approximate)", p["batch_id"], len(p["requests"]), ", ".join(str(c["cluster"]) for c in p["clusters_edited"]),
                    "–", "–", "–", "–", "–", r.line_sha256[:16])
        return (r.number, "exact", p["batch_id"], len(p["requests"]), ", ".join(str(c["cluster"]) for c in p["clusters_rebuilt"]) or "–",
                p["clusters_untouched"], f"{p['accuracy']['before']:.4f}", f"{p['accuracy']['after']:.4f}", p["verification"]["scan"]["hits"],
                ", ".join(str(n) for n in p.get("supersedes", [])) or "–", r.line_sha256[:16])

    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in cells(r)) + "</tr>" for r in all_records)
    records = all_records
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>lmeraser audit report</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}</style></head>
<body><h1>lmeraser audit report</h1><p>{len(records)} lineage record(s); signatures and hash chain verified before this report was written.</p>
<table><tr><th>#</th><th>method</th><th>batch</th><th>requests</th><th>clusters changed</th><th>untouched</th><th>acc. before</th><th>acc. after</th><th>scan hits</th><th>supersedes</th><th>record sha256</th></tr>{rows}</table>
{''.join(f'<h2>{html.escape(t)}</h2><img alt="{html.escape(t)}" src="data:image/png;base64,{b}">' for t, b in figures)}
</body></html>"""
    atomic_write_text(out, body)
    return out
