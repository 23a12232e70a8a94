"""The procedural worlds the embedded base models are pretrained on.

`image`: captioned pictures of shapes, colours, patterns and styles (plus the novel and auxiliary
concept sets); `text`: the village the tiny LM learns, its held-out task and knowledge probe;
`tiny_sd`: the embedded Stable Diffusion's tokenizer, configs and assembly.
"""
