"""``winclip eval``: image and pixel metrics on labelled folders, category by category.

Each category is scored as ``scan`` would score it (class name = category name unless given),
optionally few-shot with k references drawn reproducibly from its normal training images.
Pixel metrics are computed on maps at the model's input size (240x240 by default) against
nearest-resized masks, as the WinCLIP literature evaluates, which keeps memory bounded.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from winclip_cli import __version__
from winclip_cli.core.engine import build_backbone
from winclip_cli.core.metrics import MetricError, f1_max, image_ap, image_auroc, pixel_auroc, pixel_f1_max, pro_auc
from winclip_cli.errors import SetupError
from winclip_cli.io.datasets import Category, discover_categories, draw_references, load_mask
from winclip_cli.io.outputs import write_text_atomic
from winclip_cli.jobs.kernel import Reporter, Session
from winclip_cli.jobs.maps import image_score, map_at_model_size
from winclip_cli.jobs.references import collect_references
from winclip_cli.options import ScoringMode
from winclip_cli.spec import InputSpec, ModelSpec, MutualSpec, TextSpec

METRICS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_f1_max", "pro")


@dataclass(frozen=True)
class EvalSpec:
    """``eval``: labelled data, the folder for the metrics, few-shot references per category."""

    root: Path
    out: Path
    model: ModelSpec
    inputs: InputSpec
    class_name: str | None = None  # None: each category's name
    prompts: Path | None = None
    use_cache: bool = True
    k_shot: int = 0
    seed: int | None = None
    mutual: MutualSpec | None = None  # --mode mutual: each category's test images scored against each other

    def text_for(self, category: str) -> TextSpec:
        return TextSpec(self.class_name or category, self.prompts, self.use_cache)


@dataclass
class CategoryResult:
    name: str
    layout: str
    n_images: int
    n_anomalous: int
    references: list[str]
    metrics: dict[str, float | None]
    # metric -> why it is missing; "pixel metrics" -> which images they leave out
    notes: dict[str, str] = field(default_factory=dict)
    errors: list[tuple[str, str]] = field(default_factory=list)


def run_eval_job(options: EvalSpec, reporter: Reporter) -> list[CategoryResult]:
    started = time.perf_counter()
    categories = discover_categories(options.root)
    backbone = build_backbone(options.model)  # one model for all categories, one session (text) each
    shots = f"{options.k_shot}-shot" if options.k_shot else "zero-shot"
    if options.mutual is not None:
        shots = f"mutual, pools of at most {int(options.mutual.pool_size)}"
    names = ", ".join(c.name for c in categories)
    reporter.info(
        f"winclip {__version__}: evaluating {len(categories)} categor{'y' if len(categories) == 1 else 'ies'} "
        f"({names}), {shots}, {backbone.architecture} on {backbone.device} {backbone.precision}"
    )
    results = []
    for category in categories:
        session = Session.open(
            options.model,
            options.inputs,
            text=options.text_for(category.name),
            backbone=backbone,
            mutual=options.mutual,
        )
        results.append(_evaluate_category(category, session, options, reporter))
    _write_outputs(results, options, time.perf_counter() - started)
    return results


def _evaluate_category(category: Category, session: Session, options: EvalSpec, reporter: Reporter) -> CategoryResult:
    backbone = session.backbone
    references: list[Path] = []
    if options.k_shot:
        references = draw_references(category, options.k_shot, options.seed)
        embedded = collect_references(session.embedded([(p, p.name) for p in references]))
        if embedded.failures:
            bad = embedded.failures[0]
            raise SetupError(f"reference {bad.path} of '{category.name}' cannot be read: {bad.error}")
        # the same memory a scan builds from a memory file (references are not left out here)
        assert session.scorer is not None
        session.scorer.memory = embedded.to_reference_memory(session.scorer.scales, backbone.device)
    # a generic layout draws references from its own good test images: those are not evaluated
    chosen = {p.resolve() for p in references}
    test = [image for image in category.test if image.path.resolve() not in chosen]
    by_path = {str(image.path): image for image in test}
    reporter.start(f"{category.name}", len(test))
    labels, scores, maps, masks, errors = [], [], [], [], []
    without_mask = 0
    size = backbone.image_size
    if options.mutual is not None:
        from winclip_cli.jobs.mutual import MutualStream

        stream = MutualStream(session, reporter, int(options.mutual.pool_size))
        # pools in path order, as a scan forms them; image metrics on MuSc's final score, as the paper's
        ordered = sorted(test, key=lambda image: str(image.path))
        items = stream.scored([(i.path, str(i.path)) for i in ordered], with_stamp=False)
    else:
        items = session.scored([(i.path, str(i.path)) for i in test])
    with closing(items):
        for item in items:
            reporter.advance()
            if item.error:
                errors.append((item.relpath, item.error))
                reporter.warn(f"{item.relpath}: {item.error}")
                continue
            image = by_path[item.relpath]
            score, _ = image_score(item)
            labels.append(image.label)
            scores.append(score)
            if image.label == 0 or image.mask is not None:  # anomalous images without a mask have no pixel truth
                maps.append(map_at_model_size(item, size))
                masks.append(load_mask(image.mask, size))
            else:
                without_mask += 1
    metrics: dict[str, float | None] = {}
    notes: dict[str, str] = {}
    y, s = np.asarray(labels), np.asarray(scores)

    def attempt(name: str, compute) -> None:
        try:
            metrics[name] = float(compute())
        except MetricError as err:
            metrics[name], notes[name] = None, str(err)

    attempt("image_auroc", lambda: image_auroc(y, s))
    attempt("image_ap", lambda: image_ap(y, s))
    attempt("image_f1_max", lambda: f1_max(y, s)[0])
    if maps:
        m, k = np.stack(maps), np.stack(masks)
        attempt("pixel_auroc", lambda: pixel_auroc(k, m))
        attempt("pixel_f1_max", lambda: pixel_f1_max(k, m)[0])
        attempt("pro", lambda: pro_auc(k, m))
    else:
        for name in ("pixel_auroc", "pixel_f1_max", "pro"):
            metrics[name], notes[name] = None, "no ground-truth masks"
    if without_mask and maps:
        notes["pixel metrics"] = (
            f"{without_mask} of {int(y.sum())} anomalous images have no mask and are left out "
            "(their image scores count in the image metrics)"
        )
    return CategoryResult(
        name=category.name,
        layout=category.layout,
        n_images=len(labels),
        n_anomalous=int(y.sum()) if len(y) else 0,
        references=[str(p) for p in references],
        metrics=metrics,
        notes=notes,
        errors=errors,
    )


def mean_metrics(results: list[CategoryResult]) -> dict[str, float | None]:
    """Mean of each metric over the categories where it is defined."""
    out: dict[str, float | None] = {}
    for name in METRICS:
        values = [value for r in results if (value := r.metrics.get(name)) is not None]
        out[name] = float(np.mean(values)) if values else None
    return out


def _mutual_record(options: EvalSpec) -> dict[str, Any]:
    """metrics.json's mode keys: only for --mode mutual (the other modes' files stay as they were)."""
    if options.mutual is None:
        return {}
    return {"mode": ScoringMode.MUTUAL.value, "pool_size": int(options.mutual.pool_size)}


def _write_outputs(results: list[CategoryResult], options: EvalSpec, seconds: float) -> None:
    import csv
    import io

    options.out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["category", "layout", "images", "anomalous", *METRICS])

    def fmt(value: float | None) -> str:
        return "" if value is None or math.isnan(value) else f"{value:.6f}"

    for r in results:
        writer.writerow([r.name, r.layout, r.n_images, r.n_anomalous, *(fmt(r.metrics[m]) for m in METRICS)])
    mean = mean_metrics(results)
    writer.writerow(
        [
            "mean",
            "",
            sum(r.n_images for r in results),
            sum(r.n_anomalous for r in results),
            *(fmt(mean[m]) for m in METRICS),
        ]
    )
    write_text_atomic(options.out / "metrics.csv", buffer.getvalue())
    document: dict[str, Any] = {
        "tool": "winclip",
        "version": __version__,
        "root": str(options.root),
        "k_shot": options.k_shot,
        "seed": options.seed,
        **_mutual_record(options),
        "seconds": round(seconds, 3),
        "categories": [
            {
                "name": r.name,
                "layout": r.layout,
                "images": r.n_images,
                "anomalous": r.n_anomalous,
                "references": r.references,
                "metrics": r.metrics,
                "notes": r.notes,
                "errors": [{"path": p, "error": e} for p, e in r.errors],
            }
            for r in results
        ],
        "mean": mean,
    }
    write_text_atomic(options.out / "metrics.json", json.dumps(document, indent=2) + "\n")
