"""The model card (Mitchell et al. 2019, "Model Cards for Model Reporting"): reports/model_card.json
and its section of report.html.

Intended use (fixed text: research only), then, all taken from this run's report: the model
and its input, the data and label rule, the training settings, the test metrics with their
patient-bootstrap CIs, calibration, cross-validation, the Grad-CAM checks, the groups where
the weakness analysis finds error rates above the class's overall rate, and the limitations.
No number in the card is typed in; each is one of the report's.
"""

from __future__ import annotations

import html
from typing import Any

from lungct.interpret.html_parts import bullet_list, ci_text, html_table

__all__ = ["MODEL_CARD_FILE", "INTENDED_USE", "TRAINING_SETTINGS", "training_block",
           "failure_groups", "build_model_card", "model_card_html"]

MODEL_CARD_FILE = "model_card.json"
INTENDED_USE = {
    "primary_use": ("research on lung-nodule malignancy classification from CT slices or "
                    "patches: method development, error analysis, teaching"),
    "out_of_scope": ("clinical decisions, screening, diagnosis or triage of patients; any use "
                     "on scans unlike the training data (other scanners, protocols, cohorts) "
                     "without a new evaluation"),
    "label_caveat": ("labels are radiologists' suspicion ratings aggregated by the label rule, "
                     "not pathology-confirmed diagnoses"),
}
#: Settings of training_results.json ``config`` the card repeats, where recorded.
TRAINING_SETTINGS = ("preset", "models", "folds", "epochs", "frozen_epochs", "fine_tune_epochs",
                     "batch_size", "learning_rate", "augment", "train_size",
                     "max_train_images", "seed", "weights")
MIN_GROUP_SIZE = 3
MAX_FAILURE_GROUPS = 10
CARD_METRICS = ("auc", "average_precision", "sensitivity", "specificity")


def training_block(results: dict) -> dict:
    """The report.json ``training`` block: the selected model and how it was trained."""
    config = results["config"]
    best = results["models"][results["best_model"]]
    folds = config.get("folds")
    return {
        "selected_model": results["best_model"],
        "folds": folds if isinstance(folds, int) and not isinstance(folds, bool) else 1,
        "weights_source": best.get("weights_source"), "params": best.get("params"),
        "settings": {key: config[key] for key in TRAINING_SETTINGS if key in config},
    }


def failure_groups(weaknesses: dict) -> list[dict]:
    """Groups (at least 3 slices, known value) whose error rate exceeds their class's rate.

    Missed cancers are compared with the false-negative rate of all cancer slices, false
    positives with that of all non-cancer slices; highest rates first, at most 10.
    """
    rates = weaknesses["error_rates"]
    sources = (("missed cancers", "cancer (false-negative rate)", "false_negatives_by"),
               ("false positives", "non_cancer (false-positive rate)", "false_positives_by"))
    groups = []
    for kind, overall_key, tables in sources:
        overall = rates.get(overall_key, {}).get("rate")
        if overall is None:
            continue
        for factor, table in weaknesses[tables].items():
            groups += [{"kind": kind, "factor": factor, "group": row["group"], "n": row["n"],
                        "errors": row["errors"], "rate": row["rate"], "overall_rate": overall}
                       for row in table if row["group"] != "unknown"
                       and row["n"] >= MIN_GROUP_SIZE and row["rate"] > overall]
    groups.sort(key=lambda g: (-g["rate"], -g["errors"], g["kind"], g["factor"], g["group"]))
    return groups[:MAX_FAILURE_GROUPS]


def _calibration(block: dict) -> dict:
    picked = {"temperature": block["temperature"], "ece_reference": block["ece_reference"]}
    for phase in ("before", "after"):
        if phase in block:
            picked[phase] = {m: block[phase][m] for m in ("brier", "log_loss", "ece")}
    if "after" not in block:
        picked["as_scored"] = {m: block[m] for m in ("brier", "log_loss", "ece")}
    return picked


def build_model_card(report: dict) -> dict:
    """The model card of a finished report (report.json content after ``limitations``)."""
    data, training, gradcam = report["data"], report["training"], report["gradcam"]
    cross_validation = report.get("cross_validation")
    return {
        "schema_version": report.get("schema_version"),
        "inputs_sha256": report.get("inputs_sha256"),
        "intended_use": INTENDED_USE,
        "model": {
            "name": report["selected_model"], "file": report["model_path"],
            "kind": (f"ensemble of {training['folds']} cross-validation members (mean logit)"
                     if training["folds"] > 1 else "single classifier"),
            "input": {"dtype": "uint8", "image_size": data["image_size"],
                      "channels": data["channels"], "channel_order": data["channel_order"],
                      "context_mm": data["context_mm"]},
            "output": "probability of cancer per image",
            "weights_source": training["weights_source"], "params": training["params"],
        },
        "data": {key: data.get(key) for key in ("source", "synthetic", "label_source",
                                                 "label_rule", "view", "splits",
                                                 "split_level")},
        "training": training["settings"],
        "threshold": {"value": report["threshold"]["value"],
                      "rule": report["threshold"].get("rule")},
        "metrics": {level: {**{m: report[level][m] for m in CARD_METRICS},
                            "n": report[level]["n"]}
                    for level in ("slice_level", "nodule_level", "patient_level")},
        "bootstrap": report["bootstrap"],
        "calibration": _calibration(report["calibration"]),
        "cross_validation": None if cross_validation is None else {
            "folds": cross_validation["folds"],
            "models": {name: {k: entry[k] for k in ("mean", "std", "oof_val_auc")}
                       for name, entry in cross_validation["models"].items()}},
        "explanations": {"method": gradcam["method"], "layer": gradcam["layer"],
                         "pointing_game": gradcam["pointing_game"],
                         "randomization_median_spearman":
                             gradcam["randomization_check"]["median_spearman"]},
        "known_failure_groups": failure_groups(report["weaknesses"]),
        "limitations": report["limitations"],
    }


def _value(value: Any) -> str:
    return "-" if value is None else str(value)


def model_card_html(card: dict) -> str:
    """The model card section (a box), from the same dict as model_card.json."""
    model, use = card["model"], card["intended_use"]
    metrics = [[level.replace("_level", ""), *(ci_text(block[m]) for m in CARD_METRICS)]
               for level, block in card["metrics"].items()]
    groups = [[g["kind"], g["factor"], g["group"], g["n"], g["errors"],
               f"{g['rate']:.0%}", f"{g['overall_rate']:.0%}"]
              for g in card["known_failure_groups"]]
    settings = [[key, _value(value)] for key, value in card["training"].items()]
    calibration = card["calibration"]
    after = calibration.get("after") or calibration.get("as_scored")
    temperature = ("no temperature scaling" if calibration["temperature"] is None
                   else f"temperature T = {calibration['temperature']:.3f}")
    return (
        '<div class="box"><h2>Model card</h2>'
        f"<p><b>Intended use:</b> {html.escape(use['primary_use'])}. <b>Not for:</b> "
        f"{html.escape(use['out_of_scope'])}. {html.escape(use['label_caveat'].capitalize())}."
        "</p>"
        f"<p><b>Model:</b> {html.escape(model['name'])}, {html.escape(model['kind'])}; input "
        f"uint8 {model['input']['image_size']} px x {model['input']['channels']} channel(s) "
        f"({html.escape(', '.join(map(str, model['input']['channel_order'] or [])))}); "
        f"weights {html.escape(_value(model['weights_source']))}; "
        f"{html.escape(_value(model['params']))} parameters.</p>"
        f"<p><b>Data:</b> {html.escape(_value(card['data']['source']))}, labels from "
        f"{html.escape(_value(card['data']['label_source']))}, split by "
        f"{html.escape(_value(card['data']['split_level']))}.</p>"
        + html_table(["training setting", "value"], settings)
        + "<p><b>Test metrics</b> (patient-bootstrap 95% CIs):</p>"
        + html_table(["level", *CARD_METRICS], metrics)
        + f"<p><b>Calibration</b> ({html.escape(temperature)}): Brier "
        f"{ci_text(after['brier'])}, log loss {ci_text(after['log_loss'])}, ECE "
        f"{ci_text(after['ece'])}.</p>"
        + "<p><b>Known failure groups</b> (error rate above the class's overall rate):</p>"
        + (html_table(["errors", "factor", "group", "n", "errors", "rate", "overall rate"],
                      groups) if groups else "<p>None with at least 3 slices.</p>")
        + "<p><b>Limitations:</b></p>" + bullet_list(card["limitations"]) + "</div>")
