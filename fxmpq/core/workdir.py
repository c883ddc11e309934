"""The work directory's file names: one definition for quantize(), which writes them, and for the CLI and
restore, which read them (each stage's output; a re-run resumes from what is there)."""

from __future__ import annotations

FP32_WEIGHTS = "fp32.pt"  # the FP32 state_dict `fxmpq quantize --fp32-epochs` trains and keeps
INDICATORS_JSON = "indicators.json"
INDICATORS_CKPT = "indicators.ckpt"
SEARCH_JSON = "search.json"
CANDIDATES_JSON = "candidates.json"
MEASURED_JSON = "measured.json"  # measured sensitivities, when the search uses them (SearchOptions.indicators)
POLICY_JSON = "policy.json"
FINETUNE_CKPT = "finetune.pt"
SUMMARY_JSON = "summary.json"
AUDIT_JSON = "audit.json"
PLOTS = ("bits_per_layer.png", "indicators.png", "pareto.png")
MODEL_ONNX = "model.onnx"
ARTEFACTS = (INDICATORS_JSON, INDICATORS_CKPT, SEARCH_JSON, CANDIDATES_JSON, MEASURED_JSON, POLICY_JSON, FINETUNE_CKPT,
             SUMMARY_JSON, *PLOTS, MODEL_ONNX, AUDIT_JSON)
