"""peft_core.analysis: how LoRA meets attention's computational limits (Hu et al., ICLR 2025).

    from peft_core.analysis import attention_regime_report, RegimeTracker
    report = attention_regime_report(model, batches)      # per layer and head: Gammas, rho, label
    print(report.format_table()); report.save_json("report.json"); report.save_heatmap("heatmap.png")

`gradients` holds the paper's explicit gradient chain and the surrogates the label thresholds come
from. The approximate attention backward in `experimental_backward` is deliberately *not* exported:
it ships only if bench/attn_backward.py shows it accurate and faster on a GPU (see docs/analysis.md).
"""

from peft_core.analysis.regime import (
    EXACT_MIN_RHO,
    LABELS,
    LOW_RANK_MAX_RHO,
    PERCENTILE,
    AttentionSite,
    HeadStats,
    RegimeRecorder,
    RegimeReport,
    adapter_branch,
    attention_regime_report,
    find_attention_sites,
    gamma_at_rho,
    load_report,
    regime_label,
    rho,
)
from peft_core.analysis.tracking import RegimeTracker

__all__ = [
    "EXACT_MIN_RHO",
    "LABELS",
    "LOW_RANK_MAX_RHO",
    "PERCENTILE",
    "AttentionSite",
    "HeadStats",
    "RegimeRecorder",
    "RegimeReport",
    "RegimeTracker",
    "adapter_branch",
    "attention_regime_report",
    "find_attention_sites",
    "gamma_at_rho",
    "load_report",
    "regime_label",
    "rho",
]
