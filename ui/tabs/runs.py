"""Runs: the user's run folders (every run without a login); details, resume, cancel, export, delete."""

from __future__ import annotations

from ui.forms import Form
from ui.studio import Studio
from ui.tabs.common import with_owner

RUN_COLUMNS = ["name", "kind", "status", "step", "loss", "updated"]


def build(studio: Studio, app) -> dict[str, Form]:
    import gradio as gr

    export_form = Form("export", prefix="runs", only=("format",))
    with gr.Tab("Runs", id="runs") as tab:
        job_id = gr.State(None)
        with gr.Row():
            refresh = gr.Button("Refresh", elem_id="runs-refresh")
        # Filled in per user when the page loads: the page's initial config is the same for everyone.
        table = gr.Dataframe([], headers=RUN_COLUMNS, interactive=False, elem_id="runs-table", wrap=True)
        with gr.Row():
            # Any name is taken (an API caller names a run made after the page loaded); the Studio checks
            # it server-side: a run name, in the workspace, the user's own.
            selected = gr.Dropdown([], label="Run", elem_id="runs-select", allow_custom_value=True)
            resume_button = gr.Button("Resume", elem_id="runs-resume")
            cancel_button = gr.Button("Cancel job", variant="stop", elem_id="runs-cancel")
            export_form.render(None)
            export_button = gr.Button("Export")
        summary = gr.Markdown(elem_id="runs-summary")
        samples = gr.Gallery(label="Samples", columns=4, height="auto")
        exported = gr.File(label="Exported adapter (zip)", interactive=False)
        run_config = gr.Code(label="config.yaml", language="yaml")
        with gr.Row():
            confirm = gr.Checkbox(label="Yes, delete this run folder for good")
            delete_button = gr.Button("Delete run", variant="stop", elem_id="runs-delete")
        message = gr.Markdown(elem_id="runs-message")

        def refresh_runs(owner):
            return studio.runs_table(owner), gr.update(choices=studio.run_names(owner=owner))

        refresh.click(*with_owner(refresh_runs, {}), [table, selected], api_name="refresh_runs")
        tab.select(*with_owner(refresh_runs, {}), [table, selected], api_visibility="private")
        app.load(*with_owner(refresh_runs, {}), [table, selected], api_visibility="private")

        def details(run_name, owner):
            return studio.run_details(run_name, owner) if run_name else ("", [], "")

        selected.change(*with_owner(details, {"run": selected}), [summary, samples, run_config], api_name="run_details")

        def resume(run_name, owner):
            new_id = studio.resume(run_name, owner=owner)
            return new_id, f"resuming **{run_name}** (job {new_id}); follow it here or refresh"

        resume_button.click(*with_owner(resume, {"run": selected}), [job_id, message], api_name="resume")

        def cancel(run_name, owner):  # the run's job, whoever started it (Start, Resume, an earlier server)
            job = studio.run_job(run_name, owner)
            text = studio.cancel_run(run_name, owner)
            return text, job.id if job is not None else gr.skip()  # then followed here to its end

        cancel_button.click(*with_owner(cancel, {"run": selected}), [message, job_id], api_name="cancel_run")

        def export(run_name, *raw, owner):
            chosen = export_form.values(*raw)["format"] or "diffusers"
            return studio.export(run_name, chosen, owner=owner)

        export_button.click(
            *with_owner(export, {"run": selected, **export_form.named_inputs}),
            exported,
            concurrency_limit=2,
            api_name="export",
        )

        def delete(run_name, confirmed, owner):
            text = studio.delete(run_name, confirmed, owner)
            return text, studio.runs_table(owner), gr.update(choices=studio.run_names(owner=owner), value=None), False

        delete_button.click(
            *with_owner(delete, {"run": selected, "confirmed": confirm}),
            [message, table, selected, confirm],
            api_name="delete_run",
        )

        def poll(current, owner):
            if not current:
                return gr.skip()
            text, *_ = studio.poll(current, owner)
            return text

        timer = gr.Timer(2.0)
        timer.tick(*with_owner(poll, {"job": job_id}), message, show_progress="hidden", api_visibility="private")
    return {"export": export_form}
