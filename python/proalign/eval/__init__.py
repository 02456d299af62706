"""Evaluation of frozen slide embeddings (linear probe, logistic / Cox regression, retrieval),
method comparison, pictures (heatmaps, montages, usage, embedding maps, ROC, Kaplan-Meier) and
the HTML report. See METHOD.md "Evaluation protocol"."""
from .data import Dataset, EvalError, Labels, default_patient_id, load_dataset, read_labels
from .evaluate import TASKS, EvalResult, evaluate, format_comparison, format_table, run_json_path
from .heads import HeadOptions, fit_cox, fit_linear, fit_logistic
from .splits import check_patient_leakage, group_kfold, read_splits

__all__ = ["Dataset", "EvalError", "EvalResult", "HeadOptions", "Labels", "TASKS", "check_patient_leakage",
           "default_patient_id", "evaluate", "fit_cox", "fit_linear", "fit_logistic", "format_comparison",
           "format_table", "group_kfold", "load_dataset", "read_labels", "read_splits", "run_json_path"]
