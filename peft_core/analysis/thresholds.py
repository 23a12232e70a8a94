"""Where the regime labels change (one definition, read by the report and its heatmap)."""

LOW_RANK_MAX_RHO = 0.5  # rho <= this: "low-rank" (polynomial/low-rank surrogates of P are accurate)
EXACT_MIN_RHO = 1.5  # rho > this: "exact" (only exact or sparse attention gradients are accurate)
LABELS = ("low-rank", "transition", "exact")  # in order of increasing rho
