"""LLM: `studio train-llm` on the embedded tiny Llama (its task or an uploaded JSONL, SFT, DPO or ORPO), then chat
with a run. The objective, its beta / lambda and the data format are option fields of the training form."""

from __future__ import annotations

from studio import api
from ui.forms import Form
from ui.progress import loss_points
from ui.studio import FORM_OPTIONS, LLM_BASE_ONLY, LLM_EMBEDDED, LLM_KIND, Studio
from ui.tabs.common import live_preview, method_text, plot_frame, wire_method_help, wire_run_list, with_owner
from ui.workspace import LLM_DATA_SUFFIXES

CHAT_PROMPT = "bexa has 8 cheese and buys 2 more . how many cheese does bexa have ?"


def build(studio: Studio, app) -> dict[str, Form]:
    import gradio as gr

    form = Form(LLM_KIND, prefix="llm")
    chat = Form("chat", prefix="llm-chat", only=FORM_OPTIONS["chat"], initial={"prompt": CHAT_PROMPT})
    task = api.embedded_llm_task()
    with gr.Tab("LLM", id="llm") as tab:
        job_id = gr.State(None)
        gr.Markdown(
            "Fine-tune the embedded tiny Llama with any method (`studio train-llm`), then talk to the "
            "result. Other base models: the CLI's `--base` (the UI trains the embedded one only)."
        )
        with gr.Row():
            with gr.Column(scale=1):
                source = gr.Radio([LLM_EMBEDDED, "upload"], value=LLM_EMBEDDED, label="Training data")
                task_note = gr.Markdown(
                    f"The held-out addition task shipped with the tiny LM (`{task['train'].name}`, never seen "
                    "in pretraining), evaluated before and after on its test set and on the knowledge probe "
                    "(how much pretraining knowledge survives). With the objective dpo or orpo: the same task "
                    "as preference pairs (`preference_add_train.jsonl`: the right sum chosen, the base model's "
                    "likeliest wrong one rejected), also scored by held-out preference accuracy."
                )
                train_file = gr.File(
                    file_types=list(LLM_DATA_SUFFIXES),
                    visible=False,
                    label="Training data: JSONL, JSON, CSV or Parquet, any format (messages, sharegpt, alpaca, "
                    "prompt-completion, text; prompt + chosen + rejected for dpo / orpo)",
                )
                eval_file = gr.File(
                    file_types=list(LLM_DATA_SUFFIXES),
                    visible=False,
                    label="Held-out data (optional; choices + answer give accuracy, chosen + rejected "
                    "preference accuracy)",
                )
                name = gr.Textbox(label="Run name (optional)", placeholder="llm-lora-task_add_train")
                with gr.Accordion("Method", open=True):
                    form.render("adapter", title="method options")
                    method_help = gr.Markdown(method_text("lora", "llm"))
                with gr.Accordion("Training", open=True):
                    form.render("train", title="training options")
                form.render(None)
                with gr.Row():
                    start = gr.Button("Start training", variant="primary", elem_id="llm-start")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="llm-cancel")
            with gr.Column(scale=1):
                status = gr.Markdown("no job yet", elem_id="llm-status")
                plot = gr.LinePlot(plot_frame(loss_points([])), x="step", y="loss", title="Loss", height=240)
                metrics = gr.Markdown(elem_id="llm-metrics")
                log = gr.Textbox(label="Log", lines=6, max_lines=12, interactive=False)
                command = gr.Code(label="Equivalent command", language="shell", elem_id="llm-command")
                config_text = gr.Code(label="Equivalent YAML (studio train-llm --config FILE)", language="yaml")
        with gr.Accordion("Chat with a finished run", open=True):
            with gr.Row():
                chat_run = gr.Dropdown(
                    [LLM_BASE_ONLY],  # + the user's finished LLM runs, listed on load, on Refresh and as runs end
                    value=LLM_BASE_ONLY,
                    label="Run",
                    elem_id="llm-chat-run",
                    scale=3,
                    allow_custom_value=True,
                )  # chat_argv checks the name server-side
                chat_refresh = gr.Button("Refresh run list", scale=1)
            chat.render(None)
            send = gr.Button("Send", variant="primary", elem_id="llm-chat-send")
            reply = gr.Textbox(label="Reply", lines=3, interactive=False, elem_id="llm-chat-reply")
            chat_command = gr.Code(label="Equivalent command", language="shell")

        source.change(
            lambda s: (
                gr.update(visible=s == "upload"),
                gr.update(visible=s == "upload"),
                gr.update(visible=s == LLM_EMBEDDED),
            ),
            source,
            [train_file, eval_file, task_note],
        )
        wire_method_help(app, form, method_help, "llm")
        live_preview(app, studio.preview_llm, form, [source, name], [command, config_text])

        def begin(source_value, train_value, eval_value, name_value, *raw, owner):
            return studio.start_llm(source_value, train_value, eval_value, name_value, form.values(*raw), owner=owner)

        page = {"source": source, "train_file": train_file, "eval_file": eval_file, "run_name": name}
        start.click(
            *with_owner(begin, {**page, **form.named_inputs}),
            [job_id, status, command, config_text],
            concurrency_limit=4,
            api_name="start_llm",
        )

        def stop(current, owner):
            return studio.cancel(current, owner, (LLM_KIND,))

        cancel.click(*with_owner(stop, {"job": job_id}), status, api_name="cancel_llm")

        def finished_runs(owner):
            return gr.update(choices=[LLM_BASE_ONLY, *studio.run_names((LLM_KIND,), "finished", owner=owner)])

        def poll(current, owner):
            current = studio.follow(current, (LLM_KIND,), owner)
            if not current:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            text, points, table, tail = studio.poll_llm(current, owner)
            return text, plot_frame(points), table, tail, finished_runs(owner), current

        gr.Timer(1.0).tick(
            *with_owner(poll, {"job": job_id}),
            [status, plot, metrics, log, chat_run, job_id],
            show_progress="hidden",
            api_name="poll_llm",
        )
        wire_run_list(app, tab, chat_refresh, chat_run, finished_runs, api_name="chat_runs")

        def talk(run_name, *raw, owner):
            return studio.chat(run_name, chat.values(*raw), owner=owner)

        send.click(
            *with_owner(talk, {"run": chat_run, **chat.named_inputs}),
            [reply, chat_command],
            concurrency_limit=2,
            api_name="chat",
        )
    return {"train-llm": form, "chat": chat}
