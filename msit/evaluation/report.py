"""The transfer report: one self-contained HTML page on what a trained model learned to transfer.

For a model directory (and optionally an ablation, typically `msit_no_transfer` trained on the same data)
evaluated on one split of a prepared directory, the report shows:

- per-scene AUC, log loss and GAUC, model and ablation side by side with their difference;
- the average transfer attention: for each target scene, the mean weight the model gives every source scene
  (rows = target scene, columns = source scene, each row sums to 1);
- AUC by the user's history length in the target scene, bucketed cold -> warm: whether cross-scene transfer
  helps most where the user has little history of their own, which is what transfer is for.

Written into `out_dir`: report.html (images inlined as data URIs, so the one file can be mailed),
metrics.json, transfer_attention[_ablation].png and auc_by_history.png.
"""

from __future__ import annotations

import base64
import html
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from msit.data.prepared import EventSplit, load_split
from msit.data.schema import HISTORY_LENGTH, HISTORY_SCENE_IDS, SCENE_ID, scene_slots
from msit.evaluation.metrics import auc, scene_metrics
from msit.evaluation.relatedness import load_relatedness, rank_agreement
from msit.model.model_dir import LoadedModel, check_data_encoding, load_model_dir
from msit.model.output import Model

# Lower edges of the history-length buckets (events in the target scene), cold -> warm: 0, 1-2, 3-5, 6-10,
# 11-20, 21+. Buckets that start beyond the model's history length are dropped.
HISTORY_BUCKET_EDGES: tuple[int, ...] = (0, 1, 3, 6, 11, 21)
MIN_BUCKET_ROWS = 30  # fewer rows than this: no AUC for the bucket (shown as a gap, the row count still given)
BATCH_SIZE = 4096  # the same as trainer.evaluate's default, so metrics match `msit evaluate` exactly

Log = Callable[[str], None]


@dataclass
class ModelResult:
    """What the report needs from one model on the split."""

    name: str  # "model" or "ablation"
    model_dir: Path
    family: str
    metrics: dict  # trainer.evaluate's layout: {"overall": {...}, "scenes": {name: {...}}}
    attention: np.ndarray | None  # (S, S) mean transfer attention, rows = target scene; NaN rows: no data
    history_auc: dict[str, list[float]]  # scene -> AUC per history bucket (NaN where undefined)


# ---------------------------------------------------------------------------------------------- inference


@torch.no_grad()
def run_model(model: Model, data: EventSplit, n_scenes: int, desc: str = "") -> tuple[np.ndarray, np.ndarray | None]:
    """One pass over the split: probabilities per row, and the mean transfer attention per target scene.

    Probabilities are computed exactly as `trainer.predict` does, so metrics match `msit evaluate`. The
    attention is summed per target scene on the fly rather than kept per row. None if the model has none.
    """
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(n_scenes, n_scenes, dtype=torch.float64)
    counts = torch.zeros(n_scenes, dtype=torch.float64)
    has_attention, chunks = True, []
    total = math.ceil(len(data) / BATCH_SIZE)
    for batch in tqdm(
        data.batches(BATCH_SIZE, model.history_length, device=device),
        total=total,
        desc=desc,
        leave=False,
        disable=not sys.stderr.isatty(),
    ):
        output = model(batch)
        chunks.append(torch.sigmoid(output.logits.float()).cpu())
        if output.transfer_attention is None:
            has_attention = False
            continue
        slots = scene_slots(batch[SCENE_ID].cpu(), n_scenes)  # row of the matrix; n_scenes: an unknown scene
        known = slots < n_scenes
        sums.index_add_(0, slots[known], output.transfer_attention.detach().cpu().double()[known])
        counts += torch.bincount(slots[known], minlength=n_scenes).double()
    probs = torch.cat(chunks).numpy() if chunks else np.zeros(0, dtype=np.float32)
    if not has_attention:
        return probs, None
    with np.errstate(invalid="ignore", divide="ignore"):  # a scene without rows in the split: a NaN row
        return probs, (sums / counts[:, None]).numpy()


def evaluate_model(
    name: str, model_dir: Path, loaded: LoadedModel, data: EventSplit, buckets: np.ndarray, n_buckets: int
) -> ModelResult:
    spec = loaded.spec
    probs, attention = run_model(loaded.model, data, len(spec.scenarios), desc=name)
    scene_names = spec.scene_names()  # as trainer.evaluate names them
    labels, scene_ids = data.events["label"].numpy(), data.events["scene_id"].numpy()
    metrics = scene_metrics(labels, probs, scene_ids, data.events["user_id"].numpy(), scene_names)
    history_auc = auc_by_bucket(labels, probs, scene_ids, buckets, n_buckets, scene_names)
    return ModelResult(name, model_dir, loaded.config.family, metrics, attention, history_auc)


# ----------------------------------------------------------------------------------- history-length buckets


def target_scene_history(
    scene_ids: torch.Tensor, history_scene_ids: torch.Tensor, history_length: torch.Tensor
) -> torch.Tensor:
    """Per row, how many of the user's past events (within `history_length`) were in the row's own scene."""
    positions = torch.arange(history_scene_ids.shape[1], device=history_scene_ids.device)
    valid = positions[None, :] < history_length[:, None]
    return ((history_scene_ids == scene_ids[:, None]) & valid).sum(dim=1)


def target_scene_counts(data: EventSplit, history_length: int) -> np.ndarray:
    """(R,) per row of the split: how many events of its window of `history_length` were in its own scene."""
    counts = [
        target_scene_history(b[SCENE_ID], b[HISTORY_SCENE_IDS], b[HISTORY_LENGTH])
        for b in data.batches(BATCH_SIZE, history_length)
    ]
    return torch.cat(counts).numpy() if counts else np.zeros(0, dtype=np.int64)


def bucket_edges(max_length: int, edges: Sequence[int] = HISTORY_BUCKET_EDGES) -> list[int]:
    """The lower edges that can occur when histories hold at most `max_length` events."""
    return [e for e in edges if e <= max_length]


def bucket_labels(max_length: int, edges: Sequence[int] = HISTORY_BUCKET_EDGES) -> list[str]:
    """'0', '1–2', ..., the last one capped at `max_length` (e.g. '6–10' for 10-event histories)."""
    kept = bucket_edges(max_length, edges)
    uppers = [nxt - 1 for nxt in kept[1:]] + [max_length]
    return [str(lo) if lo == hi else f"{lo}–{hi}" for lo, hi in zip(kept, uppers, strict=True)]


def history_buckets(
    counts: torch.Tensor | np.ndarray, max_length: int, edges: Sequence[int] = HISTORY_BUCKET_EDGES
) -> np.ndarray:
    """Bucket index per row for target-scene history counts."""
    kept = np.asarray(bucket_edges(max_length, edges))
    return np.searchsorted(kept, np.asarray(counts), side="right") - 1


def bucket_rows(
    scene_ids: np.ndarray, buckets: np.ndarray, n_buckets: int, scene_names: dict[int, str]
) -> dict[str, list[int]]:
    """Scene -> row count per bucket (scenes present in the split only)."""
    return {
        name: np.bincount(buckets[scene_ids == sid], minlength=n_buckets).tolist()
        for sid, name in scene_names.items()
        if (scene_ids == sid).any()
    }


def auc_by_bucket(
    labels: np.ndarray,
    probs: np.ndarray,
    scene_ids: np.ndarray,
    buckets: np.ndarray,
    n_buckets: int,
    scene_names: dict[int, str],
) -> dict[str, list[float]]:
    """Scene -> AUC per bucket; NaN where a bucket has fewer than MIN_BUCKET_ROWS rows (an AUC of a handful of
    rows is noise) or one label class (AUC undefined there)."""
    out = {}
    for sid, name in scene_names.items():
        in_scene = scene_ids == sid
        if in_scene.any():
            masks = [in_scene & (buckets == b) for b in range(n_buckets)]
            out[name] = [auc(labels[m], probs[m]) if m.sum() >= MIN_BUCKET_ROWS else math.nan for m in masks]
    return out


# -------------------------------------------------------------------------------------------------- plots


def plot_attention(
    matrix: np.ndarray, scenes: list[str], title: str, path: Path, label: str = "mean attention"
) -> Path:
    """Heat map, rows = target scene, columns = source scene, every cell annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 1.6 + 0.9 * len(scenes)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=0.0, vmax=1.0)
    for i in range(len(scenes)):
        for j in range(len(scenes)):
            value = matrix[i, j]
            text = "n/a" if np.isnan(value) else f"{value:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color="black" if value > 0.6 else "white")
    ax.set_xticks(range(len(scenes)), scenes, rotation=45, ha="right")
    ax.set_yticks(range(len(scenes)), scenes)
    ax.set(xlabel="source scene", ylabel="target scene", title=title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_history_auc(results: list[ModelResult], rows: dict[str, list[int]], labels: list[str], path: Path) -> Path:
    """One subplot per scene: AUC per history bucket, a line per model; row counts under each bucket."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenes = list(rows)
    ncols = min(3, max(1, len(scenes)))
    nrows = math.ceil(len(scenes) / ncols) or 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.4 * nrows), squeeze=False)
    x = np.arange(len(labels))
    for ax, scene in zip(axes.flat, scenes, strict=False):
        for result in results:
            values = np.asarray(result.history_auc.get(scene, [np.nan] * len(labels)), dtype=float)
            ok = ~np.isnan(values)  # undefined buckets are skipped, not drawn as zero
            ax.plot(x[ok], values[ok], marker="o", label=f"{result.name} ({result.family})")
        # row counts in the tick labels: they never collide with the points, whatever the AUC range
        ax.set_xticks(x, [f"{label}\nn={n}" for label, n in zip(labels, rows[scene], strict=True)])
        ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.set(title=scene, xlabel="events in the target scene", ylabel="AUC")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(scenes) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------- HTML

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; } tr.overall td { font-weight: bold; }
.pos { color: #1a7f37; } .neg { color: #c62828; } .meta, .note { color: #555; }
img { max-width: 100%; }
"""


def _num(value: float | None, digits: int = 4, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _diff_cell(a: float | None, b: float | None, higher_is_better: bool = True) -> str:
    """model − ablation, coloured by whether the model is better."""
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return "<td>n/a</td>"
    better = (a - b > 0) == higher_is_better
    css = "" if a == b else (' class="pos"' if better else ' class="neg"')
    return f"<td{css}>{_num(a - b, signed=True)}</td>"


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def metrics_table(model: ModelResult, ablation: ModelResult | None) -> str:
    measures = [("auc", "AUC", True), ("logloss", "log loss", False), ("gauc", "GAUC", True)]
    head = "<th>scene</th><th>rows</th>" + "".join(
        f"<th>{title}</th>" + (f"<th>{title} ablation</th><th>Δ</th>" if ablation else "") for _, title, _ in measures
    )
    body = []
    rows = [*model.metrics["scenes"].items(), ("overall", model.metrics["overall"])]
    for scene, m in rows:
        other = None
        if ablation:
            other = ablation.metrics["overall"] if scene == "overall" else ablation.metrics["scenes"].get(scene)
        cells = [f"<td>{html.escape(scene)}</td>", f"<td>{m['rows']}</td>"]
        for key, _, higher_is_better in measures:
            cells.append(f"<td>{_num(m[key])}</td>")
            if ablation:
                theirs = other[key] if other else None
                cells += [f"<td>{_num(theirs)}</td>", _diff_cell(m[key], theirs, higher_is_better)]
        css = ' class="overall"' if scene == "overall" else ""
        body.append(f"<tr{css}>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def history_table(results: list[ModelResult], rows: dict[str, list[int]], labels: list[str]) -> str:
    head = (
        "<th>scene</th><th>events in scene</th><th>rows</th>"
        + "".join(f"<th>AUC {html.escape(r.name)}</th>" for r in results)
        + ("<th>Δ</th>" if len(results) == 2 else "")
    )
    body = []
    for scene, counts in rows.items():
        for b, (label, n) in enumerate(zip(labels, counts, strict=True)):
            values = [r.history_auc.get(scene, [math.nan] * len(labels))[b] for r in results]
            cells = [
                f"<td>{html.escape(scene)}</td>",
                f"<td>{label}</td>",
                f"<td>{n}</td>",
                *(f"<td>{_num(v)}</td>" for v in values),
            ]
            if len(values) == 2:
                cells.append(_diff_cell(values[0], values[1]))
            body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def render_html(
    results: list[ModelResult],
    data_dir: Path,
    split: str,
    attention_images: dict[str, Path | None],
    history_image: Path,
    rows: dict[str, list[int]],
    labels: list[str],
    agreement: dict[str, dict] | None = None,
    truth_image: Path | None = None,
) -> str:
    model, ablation = results[0], (results[1] if len(results) > 1 else None)
    title = f"Transfer report: {model.model_dir.name}"
    meta = (
        f"model <b>{html.escape(str(model.model_dir))}</b> ({html.escape(model.family)})"
        + (
            f", ablation <b>{html.escape(str(ablation.model_dir))}</b> ({html.escape(ablation.family)})"
            if ablation
            else ""
        )
        + f"; data <b>{html.escape(str(data_dir))}</b>, split <b>{html.escape(split)}</b>"
    )
    parts = [
        f"<h1>{html.escape(title)} ({html.escape(model.family)})</h1>",
        f'<p class="meta">{meta}</p>',
        "<h2>Metrics by scene</h2>",
        '<p class="note">Δ = model − ablation; green where the model is better.</p>' if ablation else "",
        metrics_table(model, ablation),
        "<h2>Transfer attention</h2>",
        '<p class="note">Mean weight the target scene (row) gives each source scene (column); rows sum to 1.</p>',
    ]
    for result in results:
        image = attention_images.get(result.name)
        if image is None:
            parts.append(
                f'<p class="note">{html.escape(result.name)} ({html.escape(result.family)}): '
                "this model family has no transfer attention, so there is no heat map.</p>"
            )
        else:
            parts.append(
                f"<h3>{html.escape(result.name)} ({html.escape(result.family)})</h3>"
                + _image(image, f"transfer attention of the {result.name}")
            )
        if agreement and result.name in agreement:
            value = agreement[result.name]
            parts.append(
                '<p class="note">Against the true scene relatedness (below): rank correlation (Spearman) over '
                f"the off-diagonal cells <b>{_num(value['pooled'], 3)}</b> pooled, {_num(value['per_target_mean'], 3)} "
                "on average per target scene (1: the attention ranks source scenes exactly as they are related).</p>"
            )
    if truth_image is not None:
        parts.append("<h3>True scene relatedness</h3>" + _image(truth_image, "true relatedness"))
    parts += [
        "<h2>AUC by history length in the target scene</h2>",
        '<p class="note">Rows bucketed by how many of the user\'s past events were in the scene of the row '
        "(cold → warm). n/a: the bucket has a single label class.</p>",
        _image(history_image, "AUC by history length"),
        history_table(results, rows, labels),
    ]
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


# ------------------------------------------------------------------------------------------------- report


def _json_safe(value: Any) -> Any:
    """NaN -> null, so metrics.json is strict JSON."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _result_json(result: ModelResult, scenes: list[str], rows: dict[str, list[int]], labels: list[str]) -> dict:
    attention = None
    if result.attention is not None:
        attention = {"target_scenes": scenes, "source_scenes": scenes, "matrix": result.attention.tolist()}
    return {
        "model_dir": str(result.model_dir),
        "family": result.family,
        "metrics": result.metrics,
        "auc_by_history": {
            "buckets": labels,
            "scenes": {
                scene: [
                    {"bucket": label, "rows": n, "auc": a}
                    for label, n, a in zip(labels, counts, result.history_auc[scene], strict=True)
                ]
                for scene, counts in rows.items()
            },
        },
        "transfer_attention": attention,
    }


def build_report(
    model_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    ablation_dir: str | Path | None = None,
    split: str = "test",
    log: Log = print,
    relatedness_file: str | Path | None = None,
) -> Path:
    """Evaluate the model (and the ablation) on `split` of `data_dir` and write the report into `out_dir`.
    With `relatedness_file` (a synth.json: the scenes' true relatedness), the report holds each heat map against
    it (msit.evaluation.relatedness) and draws the truth beside it.

    Returns the path of report.html. Raises MsitError if the data is not encoded like the models.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    dirs = {"model": Path(model_dir), **({"ablation": Path(ablation_dir)} if ablation_dir is not None else {})}

    log(f"[1/4] loading the model(s) and {split!r} of {data_dir}")
    loaded = {name: load_model_dir(directory) for name, directory in dirs.items()}
    for name, directory in dirs.items():  # before the (possibly large) split is read
        check_data_encoding(directory, loaded[name].spec, data_dir)
    spec = loaded["model"].spec
    truth = load_relatedness(relatedness_file, spec.scenarios) if relatedness_file is not None else None
    data = load_split(data_dir, split, spec)
    # Buckets by the model's own window (an ablation with another history_length is bucketed alike).
    max_length = loaded["model"].config.history_length
    counts = target_scene_counts(data, max_length)
    buckets, labels = history_buckets(counts, max_length), bucket_labels(max_length)
    scene_names = spec.scene_names()
    rows = bucket_rows(data.events["scene_id"].numpy(), buckets, len(labels), scene_names)

    results = []
    for step, name in enumerate(("model", "ablation"), start=2):
        if name not in dirs:
            log(f"[{step}/4] no {name} given: skipped")
            continue
        log(f"[{step}/4] evaluating the {name} {dirs[name]} ({loaded[name].config.family}) on {len(data)} rows")
        results.append(evaluate_model(name, dirs[name], loaded[name], data, buckets, len(labels)))

    log(f"[4/4] writing the report into {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    attention_images: dict[str, Path | None] = {}
    for result in results:
        if result.attention is None:
            attention_images[result.name] = None
            log(f"      {result.name} ({result.family}) has no transfer attention: no heat map")
            continue
        file = "transfer_attention.png" if result.name == "model" else f"transfer_attention_{result.name}.png"
        attention_images[result.name] = plot_attention(
            result.attention,
            spec.scenarios,
            f"{result.name} ({result.family}): mean transfer attention",
            out_dir / file,
        )
    agreement: dict[str, dict] = {}
    truth_image = None
    if truth is not None:
        agreement = {r.name: rank_agreement(r.attention, truth) for r in results if r.attention is not None}
        truth_image = plot_attention(
            truth, spec.scenarios, "true scene relatedness", out_dir / "relatedness.png", label="relatedness"
        )
        for name, value in agreement.items():
            log(f"      {name}: Spearman of mean attention vs true relatedness {value['pooled']:.3f} (pooled)")
    history_image = plot_history_auc(results, rows, labels, out_dir / "auc_by_history.png")
    report = {
        "data_dir": str(data_dir),
        "split": split,
        "history_bucket_edges": list(bucket_edges(max_length)),
        **{r.name: _result_json(r, spec.scenarios, rows, labels) for r in results},
    }
    if truth is not None:
        report["relatedness"] = {"file": str(relatedness_file), "matrix": truth.tolist(), "spearman": agreement}
    (out_dir / "metrics.json").write_text(json.dumps(_json_safe(report), indent=1))
    path = out_dir / "report.html"
    path.write_text(
        render_html(results, data_dir, split, attention_images, history_image, rows, labels, agreement, truth_image),
        encoding="utf-8",
    )
    log(f"      wrote {path}")
    return path
