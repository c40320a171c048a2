"""The model card of a zoo model: what it was trained on, how, on what machine, and what it measures on a
held-out archive, written from the run's own records (run.json, config.json, eval-test/metrics.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from index.bundle import Calibration
from training.evaluation.metrics import format_number
from training.model.config import VisionConfig

if TYPE_CHECKING:
    from training.zoo.recipe import ZooOptions, ZooPaths

TARGETS: tuple[tuple[str, str, float], ...] = (
    ("ICDR quadratic-weighted kappa (photograph alone)", "icdr.quadratic_kappa", 0.90),
    ("ICDR macro-F1", "icdr.macro_f1", 0.70),
    ("referable DR (ICDR >= 2) AUROC", "referable.auroc", 0.98),
    ("text->image category P@10", "category.text-image.P@10", 0.95),
    ("image->image referable P@10 (referable queries)", "image_image.positive_P@10", 0.80),
    ("image->image macro P@10 over ICDR grades", "image_image.macro_P@10", 0.50),
)
"""(what, where in metrics.json, target) of the headline numbers; the card says met or not for each."""


def metric(metrics: dict, dotted: str) -> float | None:
    """A value of a metrics dict by its dotted path (keys may contain dashes), None when absent."""
    node: object = metrics
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node if isinstance(node, int | float) else None


def _row(name: str, value: float | None, target: str = "", verdict: str = "", digits: int = 3) -> str:
    return f"| {name} | {format_number(value, digits)} | {target} | {verdict} |"


def headline_rows(metrics: dict) -> list[str]:
    """The card's results table: the targets, then the numbers that need their context (recalls, ceiling)."""
    lines = ["| metric (held-out archive) | value | target | |", "|---|---:|---:|---|"]
    for name, path, target in TARGETS:
        value = metric(metrics, path)
        verdict = "n/a" if value is None else ("met" if value >= target else "NOT met")
        lines.append(_row(name, value, f">= {target:g}", verdict))
    recalls = metrics.get("icdr", {}).get("per_class_recall", {})
    lowest = min(recalls.values()) if recalls else None
    lines.append(_row("lowest per-grade ICDR recall", lowest, ">= 0.5",
                      "n/a" if lowest is None else ("met" if lowest >= 0.5 else "NOT met")))
    record = metrics.get("instance", {}).get("text-record", {}).get("a_to_b", {})
    r1, ceiling = record.get("R@1"), record.get("ceiling@1")
    half = None if ceiling is None else 0.5 * ceiling
    lines.append(_row("text->record R@1", r1, f">= 0.5 x ceiling = {format_number(half, 3)}",
                      "n/a" if r1 is None or half is None else ("met" if r1 >= half else "NOT met")))
    for name, path in (
        ("text->record R@10", "instance.text-record.a_to_b.R@10"),
        ("text->record ceiling@1", "instance.text-record.a_to_b.ceiling@1"),
        ("text->image R@10", "instance.text-image.a_to_b.R@10"),
        ("ICDR accuracy", "icdr.accuracy"),
        ("SDRG quadratic-weighted kappa", "sdrg.quadratic_kappa"),
        ("referable sensitivity / specificity at the default threshold", "referable.sensitivity"),
        ("image->image similarity: 1st neighbour", "image_image.similarity.first"),
        ("image->image similarity: 10th neighbour", "image_image.similarity.at_10"),
        ("image->image similarity: gap 1st - 10th", "image_image.similarity.gap"),
    ):
        value = metric(metrics, path)
        if path == "referable.sensitivity":
            spec = metric(metrics, "referable.specificity")
            lines.append(f"| {name} | {format_number(value, 3)} / {format_number(spec, 3)} | | |")
        else:
            lines.append(_row(name, value, digits=4 if "similarity" in path else 3))
    if recalls:
        per_grade = " / ".join(format_number(v, 2) for v in recalls.values())
        lines.append(f"| per-grade ICDR recall (0-4) | {per_grade} | | |")
    return lines


def comparison_rows(ours: dict, baseline: dict) -> list[str]:
    """Retrieval metrics of the model and the CLIP-style baseline side by side."""
    lines = ["| retrieval metric (held-out archive) | this model | CLIP-style baseline | better |",
             "|---|---:|---:|---|"]
    paths = [
        *(f"instance.text-image.a_to_b.R@{k}" for k in (1, 5, 10)),
        *(f"instance.text-image.b_to_a.R@{k}" for k in (1, 5, 10)),
        *(f"instance.text-record.a_to_b.R@{k}" for k in (1, 5, 10)),
        "category.text-image.P@10", "category.text-image.mAP", "category.text-record.P@10",
        "image_image.P@10", "image_image.macro_P@10", "image_image.positive_P@10",
    ]
    for path in paths:
        a, b = metric(ours, path), metric(baseline, path)
        better = "n/a" if a is None or b is None else ("this model" if a > b else ("tie" if a == b else "baseline"))
        lines.append(f"| {path} | {format_number(a, 3)} | {format_number(b, 3)} | {better} |")
    return lines


def _record_head(config: dict) -> str:
    """The card's words for the text's record head (`record_text_head`), or nothing without one."""
    if not config.get("record_text_head"):
        return ""
    pooled = "the mean of its token states" if config.get("record_text_pooling") == "mean" else "its [CLS] state"
    return ("; the text has a record head of its own (`record_text_head`: one projection against photographs, "
            f"one of {pooled} against records)")


def _grade_part(config: dict) -> str:
    """The card's words for the search embeddings' grade part (`grade_part_weight`), or nothing without one."""
    weight = config.get("grade_part_weight", 0.0)
    if not weight:
        return ""
    return (f"; the search embeddings end in a grade part (`grade_part_weight` {weight:g}): the square root of the "
            "ICDR probabilities the joint transformer reads from the photograph alone or from the text alone, "
            f"{weight:g} of each embedding's norm, zeros for records ({config['embed_dim'] + config.get('num_icdr', 5)}"
            "-d in all; training never sees it)")


def _tuning_flags(options: ZooOptions) -> str:
    """The recipe command's locked-image tuning flags."""
    return (f" --tune-config {options.tune_config} --tune-epochs {options.tune_epochs} "
            f"--tune-batch-size {options.tune_batch_size} --tune-lr {options.tune_lr:g}"
            + "".join(f" --tune-reinit {name}" for name in options.tune_reinit)
            + "".join(f" --tune-freeze {name}" for name in options.tune_freeze))


def _appearance_flags(options: ZooOptions) -> str:
    """The recipe command's appearance-stage flags."""
    return (f" --appearance-config {options.appearance_config} --appearance-epochs {options.appearance_epochs} "
            f"--appearance-batch-size {options.appearance_batch_size} --appearance-lr {options.appearance_lr:g}")


def _facts_flags(options: ZooOptions) -> str:
    """The recipe command's facts-stage flags."""
    return (f" --facts-config {options.facts_config} --facts-epochs {options.facts_epochs} "
            f"--facts-batch-size {options.facts_batch_size} --facts-lr {options.facts_lr:g}")


def _facts_lines(options: ZooOptions, stage: dict, config: dict) -> list[str]:
    """The card's line on the facts stage, from its run's run.json and config.json."""
    losses = config.get("losses", {})
    terms = [f"the text->record loss with {'counterfactual' if losses.get('counterfactual_records') else 'no'} "
             "hard negatives" + (" and photographs of another grade as further ones"
                                 if losses.get("grade_counterfactual_records") else "")]
    if losses.get("text_record_grade_contrastive"):
        texts = (f"each text of ICDR >= {losses['text_grade_min_icdr']}" if losses.get("text_grade_min_icdr")
                 else "each text")
        terms.append(f"a term that pulls {texts} towards every record of the grade it states (weight "
                     f"{losses['text_record_grade_contrastive']:g})")
    return [
        f"- Last, the facts stage (config `{options.facts_config}`, `fit --lock-image --train-only`): only the "
        "text's record head (`text_record_proj`) and the record projection (`record_proj`) trained, with "
        + " and ".join(terms) + ", so text->record search changes and every photograph's embedding and every "
        f"grade stay what they were; {stage.get('steps')} steps ({options.facts_epochs} epochs, batch "
        f"{options.facts_batch_size}, lr {options.facts_lr:g}) in {stage.get('training_seconds', 0) / 60:.0f} min "
        f"({stage.get('samples_per_second')} samples/s, {stage.get('precision')}).",
    ]


def _appearance_lines(options: ZooOptions, stage: dict, config: dict) -> list[str]:
    """The card's line on the appearance stage, from its run's run.json and config.json."""
    dims, share = config.get("image_appearance_dims", 0), config.get("image_appearance_share", 0.0)
    uniformity = config.get("losses", {}).get("image_appearance_uniformity", 0.0)
    head = "a 2-layer MLP" if config.get("image_appearance_hidden") else "a linear projection"
    reads = ("the pooled feature and the mean of the patch tokens"
             if config.get("image_appearance_input") == "pooled_and_patches" else "the pooled feature")
    records = (" and so does every text->record answer (the text's record head is its own)"
               if config.get("record_text_head") else "")
    return [
        f"- Then the appearance stage (config `{options.appearance_config}`, `fit --train-only`): every weight "
        "but the image embedding's two projections and the text's projection against photographs (`text_proj`) "
        f"kept as trained above, so every grade stays what it was{records}; the image embedding's grade part "
        f"(`image_proj`, {config['embed_dim'] - dims}-d) re-learnt and its appearance part "
        f"(`image_appearance_proj`, {dims}-d, {head} reading {reads}, share {share:g} of the unit vector) trained"
        + (f" with a uniformity loss (weight {uniformity:g}), which spreads the image->image scores; " if uniformity
           else "; ")
        + f"{stage.get('steps')} steps ({options.appearance_epochs} epochs, batch {options.appearance_batch_size}, "
        f"lr {options.appearance_lr:g}) in {stage.get('training_seconds', 0) / 60:.0f} min "
        f"({stage.get('samples_per_second')} samples/s, {stage.get('precision')}).",
    ]


def _tuning_lines(options: ZooOptions, tuned: dict, config: dict) -> list[str]:
    """The card's lines on the locked-image tuning stage, from the tuned run's run.json and config."""
    projections = "its projections" if config.get("image_appearance_dims") else "its projection"
    reinit = ", ".join(f"`{name}`" for name in options.tune_reinit)
    frozen = "".join(f", `{name}`" for name in options.tune_freeze)
    trained = "the rest" if frozen else "the text, tabular and joint-transformer sides"
    return [
        f"- Then locked-image tuning (`retina-train fit --lock-image`, config `{options.tune_config}`"
        + (f", {reinit} from random init" if reinit else "") + f"): the image tower and {projections}{frozen} "
        f"frozen as trained above, {trained} trained on for {tuned.get('steps')} steps "
        f"({options.tune_epochs} epochs, batch {options.tune_batch_size}, lr {options.tune_lr:g}) in "
        f"{tuned.get('training_seconds', 0) / 60:.0f} min ({tuned.get('samples_per_second')} samples/s, "
        f"{tuned.get('precision')}).",
    ]


def _calibration_lines(run: Path) -> list[str]:
    """The card's line on the run's calibration.json (temperatures, decision offsets), or none without one."""
    path = run / "calibration.json"
    if not path.is_file():
        return []
    calibration = Calibration.model_validate_json(path.read_text())
    line = (f"- Calibration (`retina-train calibrate`): temperatures ICDR {calibration.icdr_temperature:.3f}, SDRG "
            f"{calibration.sdrg_temperature:.3f} fitted on split {calibration.split}")
    fit = calibration.offsets
    if fit is not None:
        offsets = ", ".join(f"{value:+.1f}" for value in fit.icdr)
        line += (f"; per-grade decision offsets (softmax(logits / T + b)) fitted for macro-F1 on split {fit.split} "
                 f"({fit.items['icdr']:,} photographs, at most {fit.per_grade:,} per grade, weighted back): ICDR b = "
                 f"[{offsets}], macro-F1 there {fit.macro_f1_before['icdr']:.3f} -> {fit.macro_f1_after['icdr']:.3f}")
    return [line + "."]


def write_card(options: ZooOptions, paths: ZooPaths, metrics: dict, baseline: dict | None) -> Path:
    """Write ROOT/MODEL_CARD.md for the recipe's run and return its path."""
    final = paths.final(options)
    info = json.loads((paths.run / "run.json").read_text())  # the main training (before any tuning)
    appearance = (json.loads((paths.appearance / "run.json").read_text()) if options.appearance_config else None)
    appearance_config = (json.loads((paths.appearance / "config.json").read_text()) if appearance else {})
    facts = json.loads((paths.facts / "run.json").read_text()) if options.facts_config else None
    facts_config = json.loads((paths.facts / "config.json").read_text()) if facts else {}
    tuned = json.loads((paths.tuned / "run.json").read_text()) if options.tune_config else None
    tuned_config = json.loads((paths.tuned / "config.json").read_text()) if tuned else {}
    config = json.loads((final / "config.json").read_text())
    name = options.release or config["name"]
    vision, text = config["vision"], config["text"]
    stem = vision.get("stem")
    size = VisionConfig.model_validate(vision).image.size  # configs may hold the spec flat or nested
    image_tower = f"timm `{vision['model_name']}` ({vision['timm_kwargs']}) at {size} px"
    if stem:
        image_tower += f", with a `{stem['model_name']}` convolutional stem (stage {stem['out_index']})"
    bert = text.get("bert_config") or {}
    hours = info.get("training_seconds", 0) / 3600
    command = (f"retina-train zoo --out {paths.root} --n {options.n} --seed {options.seed} "
               f"--heldout-n {options.heldout_n} --heldout-seed {options.heldout_seed} --epochs {options.epochs} "
               f"--batch-size {options.batch_size} --lr {options.lr:g}"
               + (_tuning_flags(options) if options.tune_config else "")
               + (_appearance_flags(options) if options.appearance_config else "")
               + (_facts_flags(options) if options.facts_config else "")
               + ("" if options.calibrate else " --no-calibrate")
               + (f" --offsets-split {options.offsets_split or 'none'}"
                  if options.calibrate and options.offsets_split != "train" else "")
               + (" --baseline" if options.baseline else "")
               + (f" --release {options.release}" if options.release else ""))
    lines = [
        f"# Model card: `zoo:{name}`",
        "",
        "The embedded default of retina-align: a small multimodal model (fundus photograph, clinical text, "
        "structured data) trained **on synthetic data only**. It is what `make demo` serves and where "
        "fine-tuning on real photographs starts (`retina-train fit --init zoo:" + name + "`).",
        "",
        "## Intended use",
        "",
        "- A working default for the demo, for tests of the pipeline and as a starting point for fine-tuning.",
        "- **Not for clinical use.** It has never seen a real photograph in training: on real photographs it "
        "grades near chance until fine-tuned on a labelled archive (see README, \"Pretrained model\").",
        "",
        "## Architecture",
        "",
        f"- Config `{config['name']}` (shipped as `config.json`): image tower {image_tower}; text tower BERT "
        f"(hidden {bert.get('hidden_size')}, {bert.get('num_hidden_layers')} layers, WordPiece of "
        f"{text['vocab_size']} tokens trained on the narratives); tabular MLP"
        + (" with periodic numeric embeddings (`numeric_encoding: periodic`)"
           if config["tabular"].get("numeric_encoding") == "periodic" else "")
        + "; joint transformer "
        f"(width {config['fusion']['width']}, depth {config['fusion']['depth']}); shared embedding "
        f"{config['embed_dim']}-d"
        + _record_head(config) + _grade_part(config) + ".",
        "- Losses (weights): " + ", ".join(f"{k} {v:g}" for k, v in config["losses"].items()
                                           if isinstance(v, int | float) and not isinstance(v, bool)
                                           and not k.endswith(("ratio", "prob", "scale", "min_icdr")) and v > 0)
        + (" (text -> record with counterfactual hard negatives)" if config["losses"].get("counterfactual_records")
           else "")
        + (f"; the grade terms count the texts of ICDR >= {config['losses']['text_grade_min_icdr']}"
           if config["losses"].get("text_grade_min_icdr") else "") + ".",
        "",
        "## Training data",
        "",
        f"- A synthetic BRSET-layout archive of {options.n:,} records (`retina-train synth --seed {options.seed} "
        f"--size {options.size}`): labels drawn from priors derived from BRSET's real joint distribution, "
        "each photograph rendered to match its labels, narratives written from the labels.",
        f"- Patient-level split (90% / 5% / 5%); training on the {info.get('train_images', 0):,} training images.",
        f"- Held-out evaluation: another synthetic archive of {options.heldout_n:,} records "
        f"(seed {options.heldout_seed}, used nowhere in training), every record a test query and the whole "
        "archive the gallery.",
        "",
        "## Recipe",
        "",
        "```bash",
        command,
        "```",
        "",
        f"- {info.get('steps')} optimiser steps ({options.epochs} epochs, batch {options.batch_size}, AdamW, lr "
        f"{options.lr:g} with warm-up and cosine decay, grade-balanced sampling {options.balance:g}), seed "
        f"{info.get('options', {}).get('seed', 0)}.",
        f"- Precision {info.get('precision')} ({info.get('precision_reason', 'n/a')}).",
        f"- Hardware: {info.get('machine', info.get('device'))}; training time {hours:.2f} h "
        f"({info.get('samples_per_second')} samples/s).",
        *(_tuning_lines(options, tuned, tuned_config) if tuned is not None else []),
        *(_appearance_lines(options, appearance, appearance_config) if appearance is not None else []),
        *(_facts_lines(options, facts, facts_config) if facts is not None else []),
        *_calibration_lines(final),
        "",
        "## Results on the held-out archive",
        "",
        *headline_rows(metrics),
        "",
        "Grades come from the photograph alone (what `/grade` sees for an upload), with the shipped calibration "
        "(`calibration.json`) where there is one, as the service applies it. The text->record ceiling is "
        "the share of queries a perfect model finds first: a narrative that fits n records can at best be "
        "found first with probability 1/n. The full report is `eval-test/report.md`.",
        "",
    ]
    if baseline is not None:
        lines += [
            "## Against the CLIP-style baseline (same towers, same recipe and budget, image-text loss only)",
            "",
            *comparison_rows(metrics, baseline),
            "",
        ]
    lines += [
        "## Fine-tuning on real photographs",
        "",
        "```bash",
        "retina-index import --images PHOTOS --labels labels.csv --out my-archive",
        "retina-train split my-archive --out my-splits.json",
        f"retina-train fit --init zoo:{name} --config zoo:{name} --archive my-archive --splits my-splits.json "
        "--out runs/ft --epochs 10 --batch-size 16",
        "```",
        "",
        "## Files",
        "",
        "`config.json`, `tokenizer/`, `feature_spec.json`, `checkpoint/model.safetensors` (fp32), `run.json`, "
        "`calibration.json` where calibrated, `eval-test/` and `zoo.json` (the sha256 of every file, checked "
        "whenever the model is loaded by name).",
        "",
    ]
    path = paths.root / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    return path
