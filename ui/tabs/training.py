"""Style / Content training: `studio train-style` / `train-content` on a demo set or uploaded images."""

from __future__ import annotations

from studio import api
from ui.forms import Form
from ui.progress import loss_points
from ui.studio import DEMO, TRAIN_KINDS, Studio
from ui.tabs.common import live_preview, method_text, plot_frame, wire_method_help, with_owner
from ui.workspace import UPLOAD_SUFFIXES


def build(studio: Studio, app) -> dict[str, Form]:
    import gradio as gr

    # train-style and train-content have the same options (their defaults differ): one form for both.
    # The methods this trainer attaches directly (those with a data step, CorDA and SPT: train-llm).
    form = Form("train-style", prefix="train")
    with gr.Tab("Style / Content training", id="train"):
        job_id = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                kind = gr.Radio(["style", "content"], value="style", label="What to learn")
                source = gr.Radio([DEMO, "upload"], value=DEMO, label="Training images")
                demo = gr.Dropdown(list(api.demo_sets()), value=api.default_demo_set("style"), label="Shipped demo set")
                files = gr.File(
                    file_count="multiple",
                    file_types=list(UPLOAD_SUFFIXES),
                    visible=False,
                    label="Images with .txt captions or a metadata.jsonl",
                )
                name = gr.Textbox(label="Run name (optional)", placeholder="style-neon")
                form.render(None)
                with gr.Accordion("Method", open=False):
                    form.render("adapter", title="method options")
                    method_help = gr.Markdown(method_text("lora", "diffusion"))
                with gr.Accordion("Training", open=True):
                    form.render("train", title="training options")
                with gr.Row():
                    start = gr.Button("Start training", variant="primary", elem_id="train-start")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
            with gr.Column(scale=1):
                status = gr.Markdown("no job yet", elem_id="train-status")
                plot = gr.LinePlot(
                    plot_frame(loss_points([])), x="step", y="loss", title="Loss", height=240, elem_id="train-plot"
                )
                sample = gr.Image(label="Latest samples", type="filepath", interactive=False, elem_id="train-sample")
                log = gr.Textbox(label="Log", lines=6, max_lines=12, interactive=False)
                command = gr.Code(label="Equivalent command", language="shell", elem_id="train-command")
                config_text = gr.Code(label="Equivalent YAML (studio train-* --config FILE)", language="yaml")

        _wire_kind(form, kind, source, demo, files)
        wire_method_help(app, form, method_help, "diffusion")
        live_preview(app, studio.preview_training, form, [kind, source, demo, name], [command, config_text])

        def begin(kind_value, source_value, demo_value, files_value, name_value, *raw, owner):
            values = form.values(*raw)
            return studio.start_training(
                kind_value, source_value, demo_value, files_value, name_value, values, owner=owner
            )

        page = {"kind": kind, "source": source, "demo_set": demo, "files": files, "run_name": name}
        start.click(
            *with_owner(begin, {**page, **form.named_inputs}),
            [job_id, status, command, config_text],
            concurrency_limit=4,
            api_name="start_training",
        )

        # After a page reload (or a Resume from the Runs tab) the tab has no job id: Cancel and the poll
        # then take the newest unfinished style/content job of this user from the jobs' records.
        def stop(current, owner):
            return studio.cancel(current, owner, TRAIN_KINDS)

        cancel.click(*with_owner(stop, {"job": job_id}), status, api_name="cancel_training")

        def poll(current, owner):
            current = studio.follow(current, TRAIN_KINDS, owner)
            if not current:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            text, points, image, tail = studio.poll(current, owner)
            return text, plot_frame(points), image, tail, current

        gr.Timer(1.0).tick(
            *with_owner(poll, {"job": job_id}),
            [status, plot, sample, log, job_id],
            show_progress="hidden",
            api_name="poll_training",
        )
    return {"train-style": form}


def _wire_kind(form: Form, kind, source, demo, files) -> None:
    """Style ↔ content: the demo set and the options whose defaults differ (the sample prompts)."""
    import gradio as gr

    defaults = {k: form.defaults_of(f"train-{k}") for k in ("style", "content")}
    differing = [name for name in form.controls if defaults["style"][name] != defaults["content"][name]]

    def on_kind(kind_value):
        return [gr.update(value=api.default_demo_set(kind_value)), *(defaults[kind_value][n] for n in differing)]

    kind.change(on_kind, kind, [demo, *(form.components[n] for n in differing)])
    source.change(lambda s: (gr.update(visible=s == "upload"), gr.update(visible=s == DEMO)), source, [files, demo])
