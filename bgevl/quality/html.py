"""``bgevl-eval --html FILE``: the report as one self-contained page to look at.

On top, per task, the metric table (each run against the reference, as the Markdown report). Below, per run and
task, the queries whose top k changed most against the reference (``changed`` in the report): the query (its
image, text, or both for a composed query) and the two ranked rows side by side, the reference's above the
run's, each item a thumbnail (or its text), relevant items outlined. Images are embedded as small JPEG data
URIs, so the file opens anywhere without the data beside it. A script marks the page rendered once every image
has decoded (``data-rendered`` on ``<body>``); the test suite loads the page in headless Chromium and checks it.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Callable

from bgevl.corpus.readers import Item
from bgevl.quality.data import QualityData
from bgevl.quality.evaluate import TASK_TITLES, _cell

THUMBNAIL = 112

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; font-size: 0.9em; }
th:first-child, td:first-child { text-align: left; }
.query { display: flex; gap: 1em; align-items: center; margin: 1em 0 0.3em; }
.row { display: flex; gap: 0.4em; align-items: flex-start; margin: 0.2em 0; }
.row .label { width: 8em; font-size: 0.8em; color: #555; }
.item { width: 112px; font-size: 0.75em; overflow-wrap: anywhere; border: 3px solid transparent; }
.item.relevant { border-color: #2a9d3c; }
.item img { display: block; width: 112px; height: 112px; object-fit: contain; background: #f3f3f3; }
.text { height: 112px; overflow: hidden; background: #f7f7f7; padding: 2px; }
"""

_SCRIPT = """
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const ok = images.filter((img) => img.complete && img.naturalWidth > 0).length;
  document.body.dataset.rendered = ok + "/" + images.length;
});
"""


def _thumbnail(data: bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as opened:
        image = opened.convert("RGB")
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    sink = io.BytesIO()
    image.save(sink, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(sink.getvalue()).decode("ascii")


class _Items:
    """The report's item ids -> what to show: thumbnails and texts of the data's items."""

    def __init__(self, data: QualityData, read: Callable[[str], bytes]):
        self.read = read
        Shown = dict[str, tuple[Item | None, Item | None]]  # id -> (its image's item, its text's item)
        self.by_set: dict[str, Shown] = {}
        if data.pairs is not None:
            images: Shown = {i.id: (i, None) for i in data.pairs.images}
            captions: Shown = {c.id: (None, c) for c in data.pairs.captions}
            self.by_set.update(image=images, image_query=images, text=captions, text_query=captions)
        if data.triplets is not None:
            t = data.triplets
            self.by_set["gallery"] = {g.id: (g, None) for g in t.gallery}
            self.by_set["composed_query"] = {q.id: (t.gallery[ref], q) for q, ref in zip(t.queries, t.reference)}
        self.cache: dict[int, str] = {}

    def image(self, item: Item) -> str:
        key = id(item)  # the item itself: a pairs image and a gallery image may share an id
        if key not in self.cache:
            data = item.image if item.image is not None else self.read(str(item.image_uri))
            self.cache[key] = _thumbnail(data)
        return self.cache[key]

    def text(self, item: Item) -> str:
        if item.text is not None:
            return item.text
        return self.read(str(item.text_uri)).decode("utf-8", "replace").strip() if item.text_uri else ""

    def card(self, set_name: str, item_id: str, relevant: bool = False) -> str:
        image, text = self.by_set.get(set_name, {}).get(item_id, (None, None))
        parts = []
        if image is not None:
            parts.append(f'<img src="{self.image(image)}" alt="{html.escape(item_id)}">')
        if text is not None:
            parts.append(f'<div class="text">{html.escape(self.text(text))}</div>')
        return (f'<div class="item{" relevant" if relevant else ""}" title="{html.escape(item_id)}">'
                f'{"".join(parts) or html.escape(item_id)}</div>')


def _metric_table(report: dict[str, Any], task: str) -> str:
    runs = [r for r in report["runs"] if task in r["tasks"]]
    head = "".join(f"<th>{html.escape(r['label'])}</th>" for r in runs)
    rows = []
    for i, fig in enumerate(runs[0]["tasks"][task]["figures"]):
        cells = "".join(f"<td>{html.escape(_cell(r['tasks'][task]['figures'][i], n == 0))}</td>" for n, r in enumerate(runs))
        rows.append(f"<tr><td>{html.escape(fig['metric'])}</td>{cells}</tr>")
    return f"<table><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>"


def html_report(report: dict[str, Any], data: QualityData, read: Callable[[str], bytes]) -> str:
    """The page of ``report`` (``bgevl.quality.evaluate``) on ``data``; ``read``: a URI's bytes (images and
    captions the data names by path)."""
    items = _Items(data, read)
    tasks = [t for t in TASK_TITLES if t in report["runs"][0]["tasks"]]
    body = [f"<h1>Retrieval quality against {html.escape(report['reference'])}</h1>",
            f"<p>{html.escape(report['created'])} · weights: {html.escape(', '.join(sorted({r['weights'] for r in report['runs']})))}"
            f" · figures in percent, [..]: bootstrap 95 % interval, Δ: paired difference to the reference</p>"]
    for task in tasks:
        body += [f"<h2>{html.escape(TASK_TITLES[task])}</h2>", _metric_table(report, task)]
    for run in report["runs"][1:]:
        for task in tasks:
            result = run["tasks"][task]
            if not result["changed"]:
                continue
            body.append(f"<h2>{html.escape(run['label'])}: {html.escape(TASK_TITLES[task])}, the queries whose top "
                        f"{len(result['changed'][0]['reference'])} changed most</h2>")
            for example in result["changed"]:
                relevant = set(example["relevant"])
                body.append(f'<div class="query"><strong>query</strong>{items.card(result["query_set"], example["query"])}'
                            f'<span>top-k overlap {example["overlap"] * 100:.0f} %</span></div>')
                for label, ranked in ((html.escape(report["reference"]), example["reference"]),
                                      (html.escape(run["label"]), example["run"])):
                    cards = "".join(items.card(result["gallery_set"], g, g in relevant) for g in ranked)
                    body.append(f'<div class="row"><div class="label">{label}</div>{cards}</div>')
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>bgevl-eval: '
            f'{html.escape(report["reference"])}</title><style>{_STYLE}</style><script>{_SCRIPT}</script></head>'
            f'<body>{"".join(body)}</body></html>\n')
