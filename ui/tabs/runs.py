"""Runs: every run folder of the workspace; details, resume, export, delete."""

from __future__ import annotations

from ui.forms import Form
from ui.studio import Studio
from ui.tabs.common import guarded, with_owner

RUN_COLUMNS = ["name", "kind", "status", "step", "loss", "updated"]


def build(studio: Studio, app) -> dict[str, Form]:
    import gradio as gr

    export_form = Form("export", prefix="runs", only=("format",))
    with gr.Tab("Runs", id="runs") as tab:
        job_id = gr.State(None)
        with gr.Row():
            refresh = gr.Button("Refresh", elem_id="runs-refresh")
        table = gr.Dataframe(
            studio.runs_table(), headers=RUN_COLUMNS, interactive=False, elem_id="runs-table", wrap=True
        )
        with gr.Row():
            selected = gr.Dropdown(studio.run_names(), label="Run", elem_id="runs-select")
            resume_button = gr.Button("Resume")
            export_form.render(None)
            export_button = gr.Button("Export")
        summary = gr.Markdown(elem_id="runs-summary")
        samples = gr.Gallery(label="Samples", columns=4, height="auto")
        exported = gr.File(label="Exported adapter (zip)", interactive=False)
        run_config = gr.Code(label="config.yaml", language="yaml")
        with gr.Row():
            confirm = gr.Checkbox(label="Yes, delete this run folder for good")
            delete_button = gr.Button("Delete run", variant="stop")
        message = gr.Markdown()

        def refresh_runs():
            return studio.runs_table(), gr.update(choices=studio.run_names())

        refresh.click(refresh_runs, None, [table, selected], api_name="refresh_runs")
        tab.select(refresh_runs, None, [table, selected])
        selected.change(
            guarded(lambda n: studio.run_details(n) if n else ("", [], "")), selected, [summary, samples, run_config]
        )

        def resume(run_name, owner):
            new_id = studio.resume(run_name, owner=owner)
            return new_id, f"resuming **{run_name}** (job {new_id}); follow it here or refresh"

        resume_button.click(*with_owner(resume, {"run": selected}), [job_id, message], api_name="resume")

        def export(run_name, *raw, owner):
            chosen = export_form.values(*raw)["format"] or "diffusers"
            return studio.export(run_name, chosen, owner=owner)

        export_button.click(
            *with_owner(export, {"run": selected, **export_form.named_inputs}),
            exported,
            concurrency_limit=2,
            api_name="export",
        )

        def delete(run_name, confirmed):
            text = studio.delete(run_name, confirmed)
            return text, studio.runs_table(), gr.update(choices=studio.run_names(), value=None), False

        delete_button.click(guarded(delete), [selected, confirm], [message, table, selected, confirm])

        def poll(current):
            if not current:
                return gr.skip()
            text, *_ = studio.poll(current)
            return text

        gr.Timer(2.0).tick(guarded(poll), job_id, message, show_progress="hidden")
    return {"export": export_form}
