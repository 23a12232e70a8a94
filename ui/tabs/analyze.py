"""Analyze: the LoRA computational-limits report (`studio analyze`) on an embedded base (+ a run's adapter)."""

from __future__ import annotations

from studio import api
from ui.forms import Form
from ui.studio import ANALYZE_MODELS, FORM_OPTIONS, NO_ADAPTER, Studio
from ui.tabs.common import wire_run_list, with_owner


def build(studio: Studio, app) -> dict[str, Form]:
    import gradio as gr

    with gr.Tab("Analyze", id="analyze") as tab:
        if not api.has_command("analyze"):
            gr.Markdown(
                "**Not available yet**: the LoRA-limits analysis (`studio analyze`) is not in this studio so far."
            )
            return {}
        form = Form("analyze", prefix="analyze", only=FORM_OPTIONS["analyze"], choices={"model": ANALYZE_MODELS})
        gr.Markdown(
            "The LoRA computational-limits report: which attention heads are in the low-rank "
            "regime, on the embedded base with or without a trained adapter (docs/analysis.md)."
        )
        with gr.Row():  # the user's finished runs, listed when the page loads, when the tab opens and on Refresh
            run = gr.Dropdown(  # any name: analyze_argv checks it server-side
                [NO_ADAPTER], value=NO_ADAPTER, label="Adapter (a finished run)", scale=3, allow_custom_value=True
            )
            refresh = gr.Button("Refresh run list", scale=1, elem_id="analyze-refresh")
        form.render(None)
        button = gr.Button("Analyze", variant="primary", elem_id="analyze-button")
        heatmap = gr.Image(label="Heatmap", type="filepath", interactive=False, elem_id="analyze-heatmap")
        report_file = gr.File(label="report.json", interactive=False)
        report_table = gr.Textbox(label="Per-head table", lines=12, interactive=False)

        def finished_runs(owner):
            return gr.update(choices=[NO_ADAPTER, *studio.run_names(status="finished", owner=owner)])

        wire_run_list(app, tab, refresh, run, finished_runs, api_name="analyze_runs")

        def analyze(run_name, *raw, owner):
            return studio.analyze(run_name, form.values(*raw), owner=owner)

        button.click(
            *with_owner(analyze, {"run": run, **form.named_inputs}),
            [heatmap, report_table, report_file],
            concurrency_limit=2,
            api_name="analyze",
        )
    return {"analyze": form}
