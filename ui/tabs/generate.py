"""Generate & compose: `studio generate` with up to three finished adapters, each with a weight, and
`studio compose` of a content run and a style run (summed, or merged by ZipLoRA)."""

from __future__ import annotations

from ui.forms import Form
from ui.studio import FORM_OPTIONS, NO_ADAPTER, TRAIN_KINDS, Studio, form_command
from ui.tabs.common import with_owner

ADAPTER_SLOTS = 3  # adapters composed at once
PAIR = "compose-pair"  # the FORM_OPTIONS key of the content + style form (options of `studio compose`)


def build(studio: Studio, app) -> dict[str, Form]:
    import gradio as gr

    form = Form(
        "generate", prefix="generate", only=FORM_OPTIONS["generate"], initial={"prompt": "a star in neon style"}
    )
    pair = Form(form_command(PAIR), prefix=PAIR, only=FORM_OPTIONS[PAIR], initial={"prompt": "a moon in neon style"})
    with gr.Tab("Generate & compose", id="generate") as tab:
        gr.Markdown(
            "Base model: the embedded tiny SD (or the base the runs trained on). Two ways to compose "
            "finished runs:\n\n"
            "- **Generate**: up to three trained adapters with weights, summed (LoRA-style: base + Σ weight · "
            "adapter).\n"
            "- **Compose a content run and a style run** (below): `sum` adds the two at their weights like "
            "Generate; `ziplora` first learns a per-column merge of the two LoRAs on the two runs' training "
            "images, each column given mostly to one of them (LoRA-shaped methods only; the default 100 steps "
            "take a few minutes on a 2-core CPU). Which way composes better is still being measured "
            "(bench/composition.py)."
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

        with gr.Accordion("Compose a content run and a style run", open=True):
            gr.Markdown(
                "`studio compose --content RUN:W --style RUN:W`: **sum** (both adapters at their weights) or "
                "**ziplora** (one LoRA merged column by column, its coefficients learned on the two runs' "
                "training images; its steps and the rest are in *More ZipLoRA options*)."
            )
            # Finished runs by name, filled in like the adapter pickers; compose_pair_argv checks them.
            with gr.Row():
                content_run = gr.Dropdown([], label="Content run", allow_custom_value=True)
                content_weight = gr.Slider(-1, 2, 1.0, step=0.05, label="Weight")
            with gr.Row():
                style_run = gr.Dropdown([], label="Style run", allow_custom_value=True)
                style_weight = gr.Slider(-1, 2, 1.0, step=0.05, label="Weight")
            pair.render(None, title="ZipLoRA options")
            with gr.Row():
                pair_button = gr.Button("Compose", variant="primary", elem_id="compose-pair-button")
                pair_refresh = gr.Button("Refresh run lists")
            pair_image = gr.Image(label="Composition", type="filepath", interactive=False, elem_id="compose-pair-image")
            pair_command = gr.Code(label="Equivalent command", language="shell", elem_id="compose-pair-command")

        def compose_pair(content, content_w, style, style_w, *raw, owner: str):
            return studio.compose_pair((content, content_w), (style, style_w), pair.values(*raw), owner=owner)

        pair_named = {"content_run": content_run, "content_weight": content_weight}
        pair_named.update({"style_run": style_run, "style_weight": style_weight, **pair.named_inputs})
        pair_button.click(
            *with_owner(compose_pair, pair_named),
            [pair_image, pair_command],
            concurrency_limit=2,
            api_name="compose_pair",
        )

        def pair_runs(owner):
            choices = studio.run_names(TRAIN_KINDS, "finished", owner=owner)
            return gr.update(choices=choices), gr.update(choices=choices)

        run_pickers = [content_run, style_run]
        pair_refresh.click(*with_owner(pair_runs, {}), run_pickers, api_name="compose_pair_runs")
        tab.select(*with_owner(pair_runs, {}), run_pickers, api_visibility="private")
        app.load(*with_owner(pair_runs, {}), run_pickers, api_visibility="private")
    return {"generate": form, PAIR: pair}
