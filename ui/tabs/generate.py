"""Generate & compose: `studio generate` with up to three finished adapters, each with a weight."""

from __future__ import annotations

from ui.forms import Form
from ui.studio import FORM_OPTIONS, NO_ADAPTER, TRAIN_KINDS, Studio
from ui.tabs.common import with_owner

ADAPTER_SLOTS = 3  # adapters composed at once


def build(studio: Studio, app) -> dict[str, Form]:
    import gradio as gr

    form = Form(
        "generate", prefix="generate", only=FORM_OPTIONS["generate"], initial={"prompt": "a star in neon style"}
    )
    with gr.Tab("Generate & compose", id="generate") as tab:
        gr.Markdown(
            "Base model: the embedded tiny SD. Pick up to three trained adapters with weights "
            "(LoRA-style sum: base + Σ weight · adapter)."
        )
        # The `--adapter PATH:WEIGHT` option, as the browser may name it: finished runs by name (the
        # user's own, listed when the page loads, when the tab opens and on Refresh).
        slots = []
        for index in range(ADAPTER_SLOTS):
            with gr.Row():
                run = gr.Dropdown(  # any name: generate_argv checks it server-side (the user's finished run)
                    [NO_ADAPTER], value=NO_ADAPTER, label=f"Adapter {index + 1}", allow_custom_value=True
                )
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
            image, command_text = studio.generate(adapters, form.values(*raw), owner=owner)
            shown = [image, *(shown or [])][:12]
            return shown, shown, command_text

        named = {f"{part}_{i + 1}": c for i, slot in enumerate(slots) for part, c in zip(("adapter", "weight"), slot)}
        button.click(
            *with_owner(generate, {**named, **form.named_inputs, "history": history}),
            [gallery, history, command],
            concurrency_limit=2,
            api_name="generate",
        )

        def adapters(owner):
            choices = [NO_ADAPTER, *studio.run_names(TRAIN_KINDS, "finished", owner=owner)]
            return [gr.update(choices=choices)] * ADAPTER_SLOTS

        pickers = [slot[0] for slot in slots]
        refresh.click(*with_owner(adapters, {}), pickers, api_name="generate_adapters")
        tab.select(*with_owner(adapters, {}), pickers, api_visibility="private")
        app.load(*with_owner(adapters, {}), pickers, api_visibility="private")
    return {"generate": form}
