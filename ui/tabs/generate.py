"""Generate & compose: `studio generate` with up to three finished adapters, each with a weight."""

from __future__ import annotations

from studio import api
from ui.forms import Form
from ui.studio import FORM_OPTIONS, NO_ADAPTER, TRAIN_KINDS, Studio
from ui.tabs.common import with_owner

ADAPTER_SLOTS = 3  # adapters composed at once


def build(studio: Studio, app) -> dict[str, Form]:
    import gradio as gr

    form = Form(
        "generate", prefix="generate", only=FORM_OPTIONS["generate"], initial={"prompt": "a star in neon style"}
    )
    with gr.Tab("Generate & compose", id="generate"):
        gr.Markdown(
            "Base model: the embedded tiny SD. Pick up to three trained adapters with weights "
            "(LoRA-style sum: base + Σ weight · adapter)."
        )
        # The `--adapter PATH:WEIGHT` option, as the browser may name it: finished runs by name.
        slots = []
        trained = studio.run_names(TRAIN_KINDS, "finished")
        for index in range(ADAPTER_SLOTS):
            with gr.Row():
                run = gr.Dropdown([NO_ADAPTER, *trained], value=NO_ADAPTER, label=f"Adapter {index + 1}")
                slots.append((run, gr.Slider(-1, 2, 1.0, step=0.05, label="Weight")))
        form.render(None)
        with gr.Row():
            button = gr.Button("Generate", variant="primary", elem_id="generate-button")
            refresh = gr.Button("Refresh adapter list")
        gallery = gr.Gallery(label="Generated", columns=3, height="auto", elem_id="generate-gallery")
        command = gr.Code(label="Equivalent command", language="shell", elem_id="generate-command")
        history = gr.State([])

        def generate(*values, owner: str):
            picks, raw, shown = values[: 2 * ADAPTER_SLOTS], values[2 * ADAPTER_SLOTS : -1], values[-1]
            adapters = [(picks[i], picks[i + 1]) for i in range(0, len(picks), 2) if picks[i] not in (None, NO_ADAPTER)]
            out = studio.workspace.new_output(stem="generate")
            argv = studio.generate_argv(adapters, form.values(*raw), out)
            studio.run_light(argv, owner=owner)
            shown = [str(out), *(shown or [])][:12]
            return shown, shown, api.command_line(argv)

        named = {f"{part}_{i + 1}": c for i, slot in enumerate(slots) for part, c in zip(("adapter", "weight"), slot)}
        button.click(
            *with_owner(generate, {**named, **form.named_inputs, "history": history}),
            [gallery, history, command],
            concurrency_limit=2,
            api_name="generate",
        )
        refresh.click(
            lambda: [gr.update(choices=[NO_ADAPTER, *studio.run_names(TRAIN_KINDS, "finished")])] * ADAPTER_SLOTS,
            None,
            [slot[0] for slot in slots],
        )
    return {"generate": form}
