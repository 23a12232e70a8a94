"""Break-for-Make: `studio break-for-make` on demo sets or uploads, then compose a finished run."""

from __future__ import annotations

from studio import api
from ui.forms import Form
from ui.progress import B4M_STAGES, loss_points
from ui.studio import B4M_KIND, FORM_OPTIONS, Studio
from ui.tabs.common import live_preview, plot_frame, with_owner
from ui.workspace import UPLOAD_SUFFIXES


def build(studio: Studio, app) -> dict[str, Form]:
    import gradio as gr

    form = Form(B4M_KIND, prefix="b4m")
    compose = Form(
        "compose", prefix="compose", only=FORM_OPTIONS["compose"], initial={"prompt": "a moon in neon style"}
    )
    with gr.Tab("Break-for-Make", id="b4m") as tab:
        job_id = gr.State(None)
        gr.Markdown(
            "Break trains a content PLP and a style PLP separately (with the shipped auxiliary sets as "
            "partners), make pairs them into one joint adapter, compose generates with it. "
            "Cancel stops it with its finished stages kept: resume it from the Runs tab."
        )
        with gr.Row():
            with gr.Column():
                content_set = gr.Dropdown(list(api.demo_sets("content")), value="content-moon", label="Content set")
                content_files = gr.File(
                    file_count="multiple", file_types=list(UPLOAD_SUFFIXES), label="...or upload content images"
                )
                style_set = gr.Dropdown(list(api.demo_sets("style")), value="style-neon", label="Style set")
                style_files = gr.File(
                    file_count="multiple", file_types=list(UPLOAD_SUFFIXES), label="...or upload style images"
                )
                name = gr.Textbox(label="Run name (optional)")
                form.render(None)
                form.render("b4m", title="break-for-make options")
                with gr.Row():
                    start = gr.Button("Break → make", variant="primary", elem_id="b4m-start")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="b4m-cancel")
            with gr.Column():
                status = gr.Markdown("no job yet", elem_id="b4m-status")
                plot = gr.LinePlot(
                    plot_frame(loss_points([]), B4M_STAGES),
                    x="step",
                    y="loss",
                    color="stage",
                    title="Loss",
                    height=240,
                    elem_id="b4m-plot",
                )
                sample = gr.Image(label="Composed", type="filepath", interactive=False)
                command = gr.Code(label="Equivalent command", language="shell", elem_id="b4m-command")
                config_text = gr.Code(label="Equivalent YAML (studio break-for-make --config FILE)", language="yaml")
        with gr.Accordion("Compose with a finished Break-for-Make run", open=True):
            # The user's finished runs, filled in on load; any name is taken, compose_argv checks it.
            compose_run = gr.Dropdown([], label="Run", allow_custom_value=True)
            compose.render(None)
            compose_button = gr.Button("Compose")
            compose_image = gr.Image(label="Composition", type="filepath", interactive=False)

        page = [content_set, style_set, content_files, style_files, name]
        live_preview(app, studio.preview_b4m, form, page, [command, config_text])

        def begin(content, style, content_up, style_up, name_value, *raw, owner):
            values = form.values(*raw)
            return studio.start_b4m(content, style, content_up, style_up, name_value, values, owner=owner)

        named = {"content_set": content_set, "style_set": style_set, "content_files": content_files}
        named.update({"style_files": style_files, "run_name": name, **form.named_inputs})
        start.click(
            *with_owner(begin, named), [job_id, status, command, config_text], concurrency_limit=4, api_name="start_b4m"
        )

        def stop(current, owner):
            return studio.cancel(current, owner, (B4M_KIND,))

        cancel.click(*with_owner(stop, {"job": job_id}), status, api_name="cancel_b4m")

        def finished_runs(owner):
            return gr.update(choices=studio.run_names((B4M_KIND,), "finished", owner=owner))

        app.load(*with_owner(finished_runs, {}), compose_run, api_visibility="private")
        tab.select(*with_owner(finished_runs, {}), compose_run, api_visibility="private")

        def poll(current, owner):
            current = studio.follow(current, (B4M_KIND,), owner)
            if not current:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            text, points, image, _ = studio.poll(current, owner)
            return text, plot_frame(points, B4M_STAGES), image, finished_runs(owner), current

        gr.Timer(2.0).tick(
            *with_owner(poll, {"job": job_id}),
            [status, plot, sample, compose_run, job_id],
            show_progress="hidden",
            api_name="poll_b4m",
        )

        def do_compose(run_name, *raw, owner):
            return studio.compose(run_name, compose.values(*raw), owner=owner)

        compose_button.click(
            *with_owner(do_compose, {"run": compose_run, **compose.named_inputs}),
            compose_image,
            concurrency_limit=2,
            api_name="compose",
        )
    return {B4M_KIND: form, "compose": compose}
