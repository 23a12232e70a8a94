"""PLP, partly learnable projections (Break-for-Make, Xu et al. 2024; spec: shared/specs/break_for_make.md).

One rank-r LoRA per layer, dW = U V (no alpha/r scaling), with half of each factor frozen:

    U = [A; B]   (out x r)   A: first out/2 rows, frozen      B: learnable  -> the *style* PLP
    V = [C | D]  (r x in)    C: first in/2 columns, frozen    D: learnable  -> the *content* PLP

    dW = [[A C, A D],
          [B C, B D]]

A and C come from one orthonormal basis Q (N x r) drawn from (seed, layer name): A = Q[S_A],
C = Q[S_C]^T with disjoint random row sets, so A^T A + C C^T <= I. N is `basis_rows` (1280 as in the
released code, whatever the layer's width) or, with basis_rows=0, the tightest out/2 + in/2; never
fewer than r or out/2 + in/2. Each row of Q carries r/N of its energy, so the frozen blocks of a
narrow layer are smaller with N = 1280 than with the tight basis (docs/methods/b4m.md).
They are buffers, not parameters, so no optimizer (weight decay included) can move them, and any
two adapters made with the same seed share them bit for bit; that is what lets `make_joint` pair
the style run's B with the content run's D. D starts N(0, 1/r^2), B at zero.

The joint adapter is still a plain rank-r LoRA (A_lora = V, B_lora = U), so it exports exactly.
"""

from __future__ import annotations

import weakref
import zlib
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peft_core import layer
from peft_core.config import Capabilities, RankConfig, register_method
from peft_core.errors import AdapterError

if TYPE_CHECKING:
    from peft_core.model import AdapterHandle


@dataclass
class PlpConfig(RankConfig):
    """r: rank of U V (the paper uses 64 on SDXL); seed: frozen bases are a function of (seed, layer),
    so content and style runs must share it; orthogonal_init: True draws A, C from one orthonormal basis
    on every layer (spec pitfall 7); False gives A = 0 and a Gaussian C everywhere; "square_qkv" is the
    released code's mix: orthonormal on square to_q/to_k/to_v layers, A = 0 and a Gaussian C elsewhere.

    basis_rows: rows N of the orthonormal basis the frozen halves are cut from. The released code
    always uses 1280 (SDXL's widest attention layer); 0 means the tightest, out/2 + in/2 rows (the
    studio's earlier default, up to twice the frozen blocks' energy in a layer narrower than N).

    centered: leave out the frozen-by-frozen block A C and start D at zero, so the adapter is exactly
    zero at init, like a LoRA (spec pitfall 8). The paper's PLP (False) perturbs the base from step 0
    by A C and A D_0: on the embedded tiny SD that is ~35% of each adapted weight's norm."""

    method: ClassVar[str] = "plp"
    saved_before: ClassVar[dict] = {"basis_rows": 0}  # adapters saved before basis_rows cut out/2 + in/2 rows

    r: int = 64
    seed: int = 0
    orthogonal_init: bool | str = True
    centered: bool = False
    basis_rows: int = 1280

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.orthogonal_init not in (True, False, SQUARE_QKV):
            raise AdapterError(
                f"plp: orthogonal_init must be true, false or {SQUARE_QKV!r}, got {self.orthogonal_init!r}"
            )
        if self.basis_rows < 0:
            raise AdapterError(f"plp: basis_rows must be >= 0 (0: out/2 + in/2), got {self.basis_rows}")


SQUARE_QKV = "square_qkv"  # orthogonal_init as released: only square to_q / to_k / to_v layers


def orthogonal_layer(setting: bool | str, module_name: str, out_features: int, in_features: int) -> bool:
    """Whether layer `module_name` draws its frozen halves from an orthonormal basis under `setting`."""
    if setting == SQUARE_QKV:
        return module_name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") and out_features == in_features
    return bool(setting)


# ---------------------------------------------------------------------------------------------
# The math: pure tensor functions.
# ---------------------------------------------------------------------------------------------
def frozen_bases(
    out_features: int,
    in_features: int,
    r: int,
    seed: int,
    key: str,
    orthogonal: bool = True,
    basis_rows: int = 1280,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, C): A (out//2, r) and C (r, in//2), deterministic from (seed, key) on every machine.

    basis_rows: rows of the orthonormal basis (0: out//2 + in//2, the tightest that holds both)."""
    generator = torch.Generator().manual_seed((seed + zlib.crc32(key.encode())) % (2**63))
    rows_a, rows_c = out_features // 2, in_features // 2
    if not orthogonal:
        return torch.zeros(rows_a, r), torch.randn(r, rows_c, generator=generator) / r
    n = max(r, rows_a + rows_c, basis_rows)
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=generator, dtype=torch.float64))  # (n, r), q^T q = I
    rows = torch.randperm(n, generator=generator)
    a = q[rows[:rows_a]]  # (out//2, r)
    c = q[rows[rows_a : rows_a + rows_c]].t()  # (r, in//2)
    return a.float().contiguous(), c.float().contiguous()


def plp_factors(
    frozen_up: torch.Tensor, learnable_up: torch.Tensor, frozen_down: torch.Tensor, learnable_down: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """U = [A; B] (out x r) and V = [C | D] (r x in)."""
    return torch.cat([frozen_up, learnable_up], dim=0), torch.cat([frozen_down, learnable_down], dim=1)


def centered_pieces(
    frozen_up: torch.Tensor, learnable_up: torch.Tensor, frozen_down: torch.Tensor, learnable_down: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pieces of a rank-2r PLP equal to U V - [A; 0][C | 0], i.e. dW = [[0, A D], [B C, B D]]:

        U' = [A, -A; B, 0]    V' = [C, D; C, 0]

    Same learnable blocks (B, D receive exactly the centered product's gradients), so every PLP
    code path (the fused Function, merge, export) serves the centered variant unchanged."""
    return (
        torch.cat([frozen_up, -frozen_up], dim=1),
        torch.cat([learnable_up, torch.zeros_like(learnable_up)], dim=1),
        torch.cat([frozen_down, frozen_down], dim=0),
        torch.cat([learnable_down, torch.zeros_like(learnable_down)], dim=0),
    )


# q, k and v read one input tensor (the attention block's norm output), so the input half that D's
# gradient needs is copied once and shared: the caller's tensor object -> (weak ref to it, its
# version, the split column, weak ref to the copy). An entry goes when its tensor dies.
_input_halves: dict[int, tuple[weakref.ref, int, int, weakref.ref]] = {}


def shared_input_half(x: torch.Tensor, x2: torch.Tensor, start: int) -> torch.Tensor:
    """x2[:, start:] as a tensor of its own, made once for every PLP layer that reads the same `x`
    (same object, unchanged since, same split and dtype); x2 is x as (tokens, in) in compute dtype."""
    key = id(x)
    entry = _input_halves.get(key)
    if entry is not None:
        source, version, entry_start, half_ref = entry
        half = half_ref()
        if (
            source() is x
            and version == x._version
            and entry_start == start
            and half is not None
            and half.dtype == x2.dtype
        ):
            return half
    half = x2[:, start:].contiguous()
    _input_halves[key] = (
        weakref.ref(x, lambda _, key=key: _input_halves.pop(key, None)),
        x._version,
        start,
        weakref.ref(half),
    )
    return half


class PlpLinearFunction(torch.autograd.Function):
    """y = x W^T + b + (x V^T) U^T with U = [A; B], V = [C | D], computing only what training needs.

    Backward forms only the gradients of the learnable halves, dB = g[:, out/2:]^T h with h = x V^T,
    and dD = (g U)^T x[:, in/2:], never those of the frozen ones; the factors are saved by reference
    (they live on in the module) and U, V are rebuilt (cat + cast, r-wide) in backward.

    What it keeps of the input, whichever is smaller:
    - x itself, when x is a view of another op's tensor that op keeps anyway (attention's output
      before to_out.0 is SDPA's saved output): it costs nothing, and h is recomputed from it.
    - otherwise (a fresh activation such as a norm output, which only the adapters keep) the half
      that dD reads, copied once and shared by every PLP layer reading the same x (q, k, v), plus
      this layer's h (T x r). With both halves trained it is used while r <= in/4: one reader then
      keeps in/2 + r <= 0.75 in per token instead of in; three readers (q, k, v) keep in/2 + 3r,
      under in while r < in/6 (SD 1.5 at r = 64: 1.1, 0.8, 0.65 in at widths 320, 640, 1280).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, frozen_up, learnable_up, frozen_down, learnable_down, grad_enabled=True):
        # grad_enabled: torch.is_grad_enabled() of the caller (inside forward it is always off, and
        # needs_input_grad still says True under no_grad): with it off nothing is kept or copied.
        dtype = layer.compute_dtype(x)
        x2 = layer.cast_to(x.reshape(-1, x.shape[-1]), dtype)  # (T, in)
        up, down = (layer.cast_to(f, dtype) for f in plp_factors(frozen_up, learnable_up, frozen_down, learnable_down))
        with layer.autocast_off(x.device.type):
            h = x2 @ down.t()  # (T, r)
            y = layer.base_linear(x2, weight, bias, dtype)  # (T, out)
            y.addmm_(h, up.t())
        out = y.reshape(*x.shape[:-1], y.shape[-1])
        if not grad_enabled:  # inference: no backward will run
            return out
        needs_up, needs_down = ctx.needs_input_grad[4], ctx.needs_input_grad[6]
        kept_by_producer = x._base is not None and x.dtype == dtype  # x2 is then a view of that tensor too
        ctx.keep_input = (
            torch.compiler.is_compiling()
            or kept_by_producer
            or (needs_up and needs_down and 4 * h.shape[1] > x2.shape[1])
        )
        if ctx.keep_input:
            saved_input, saved_h = x2, None
        else:
            saved_input = shared_input_half(x, x2, frozen_down.shape[1]) if needs_down else None
            saved_h = h if needs_up else None
        ctx.save_for_backward(saved_input, saved_h, weight, frozen_up, learnable_up, frozen_down, learnable_down)
        ctx.compute_dtype, ctx.input_shape = dtype, x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_output):
        saved_input, h, weight, frozen_up, learnable_up, frozen_down, learnable_down = ctx.saved_tensors
        dtype = ctx.compute_dtype
        up, down = (layer.cast_to(f, dtype) for f in plp_factors(frozen_up, learnable_up, frozen_down, learnable_down))
        g = layer.cast_to(grad_output.reshape(-1, grad_output.shape[-1]), dtype)  # (T, out)
        grad_x = grad_bias = grad_up = grad_down = None
        with layer.autocast_off(g.device.type):
            grad_h = g @ up  # (T, r)
            if ctx.needs_input_grad[0]:
                grad_x = g @ layer.cast_to(weight, dtype)
                grad_x.addmm_(grad_h, down)
                grad_x = grad_x.reshape(ctx.input_shape)
            if ctx.needs_input_grad[4]:
                if ctx.keep_input:
                    h = saved_input @ down.t()  # (T, r), as in forward
                grad_up = layer.mm_float32(g[:, frozen_up.shape[0] :].t(), h).to(learnable_up.dtype)  # (out - out/2, r)
            if ctx.needs_input_grad[6]:
                input_half = saved_input[:, frozen_down.shape[1] :] if ctx.keep_input else saved_input
                grad_down = layer.mm_float32(grad_h.t(), input_half).to(learnable_down.dtype)  # (r, in - in/2)
            if ctx.needs_input_grad[2]:
                grad_bias = g.sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, None, grad_up, None, grad_down, None


def riemannian_precondition(
    grad_up: torch.Tensor, grad_down: torch.Tensor, up: torch.Tensor, down: torch.Tensor, delta: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled gradients of the learnable halves (Zhang & Pilanci 2024, as B4M's TOG version uses them).

    For dW = U V the preconditioned gradients are grad_U (V V^T + delta I)^-1 and
    (U^T U + delta I)^-1 grad_V. B is a block of U's rows and D a block of V's columns, so their
    scaled gradients are the same products with grad_B (rows) and grad_D (columns). The r x r
    systems are solved in float64; delta > 0 keeps a near-singular factor from producing huge steps.
    As in the released optimizer, a factor whose Gram matrix has norm <= 1e-6 (a zero factor) leaves
    the other factor's gradient unscaled.
    """
    eye = torch.eye(up.shape[1], dtype=torch.float64, device=up.device)
    down64, up64 = down.detach().double(), up.detach().double()

    def damped(gram: torch.Tensor) -> torch.Tensor:
        return gram + delta * eye if torch.linalg.matrix_norm(gram) > 1e-6 else eye

    gram_down = damped(down64 @ down64.t())  # V V^T + delta I  (r x r, symmetric)
    gram_up = damped(up64.t() @ up64)  # U^T U + delta I
    scaled_up = torch.linalg.solve(gram_down, grad_up.double().t()).t()  # grad_B (V V^T)^-1
    scaled_down = torch.linalg.solve(gram_up, grad_down.double())  # (U^T U)^-1 grad_D
    return scaled_up.to(grad_up.dtype), scaled_down.to(grad_down.dtype)


def precondition_gradients(handle: AdapterHandle, name: str, delta: float = 1e-6) -> None:
    """Replace the .grad of every layer's B and D of PLP adapter `name` by its Riemannian-scaled
    version (see riemannian_precondition); call between backward and the optimizer step."""
    for _, wrapper in handle.wrappers(name):
        adapter = wrapper.adapters[name]
        up_grad, down_grad = adapter.learnable_up.grad, adapter.learnable_down.grad
        if up_grad is None or down_grad is None:
            continue
        up, down = adapter.factors()
        adapter.learnable_up.grad, adapter.learnable_down.grad = riemannian_precondition(
            up_grad, down_grad, up, down, delta
        )


# ---------------------------------------------------------------------------------------------
# The module.
# ---------------------------------------------------------------------------------------------
class PlpAdapter(layer.Adapter):
    def __init__(self, base: nn.Module, config: PlpConfig, module_name: str) -> None:
        super().__init__(base, config, module_name)
        out_features, in_features = base.out_features, base.in_features
        if out_features < 2 or in_features < 2:
            raise AdapterError(f"plp: {module_name!r} ({in_features}->{out_features}) is too small to split in halves")
        dtype, device = layer.master_dtype(base.weight), base.weight.device
        orthogonal = orthogonal_layer(config.orthogonal_init, module_name, out_features, in_features)
        a, c = frozen_bases(
            out_features, in_features, config.r, config.seed, module_name, orthogonal, config.basis_rows
        )
        self.register_buffer("frozen_up", a.to(device, dtype))  # A
        self.register_buffer("frozen_down", c.to(device, dtype))  # C
        generator = torch.Generator().manual_seed((config.seed + zlib.crc32(("D:" + module_name).encode())) % (2**63))
        d = torch.randn(config.r, in_features - c.shape[1], generator=generator) / config.r
        if config.centered:
            d.zero_()  # drawn anyway, so the generator's later draws do not depend on the flag
        self.learnable_up = nn.Parameter(
            torch.zeros(out_features - a.shape[0], config.r, device=device, dtype=dtype)
        )  # B, style
        self.learnable_down = nn.Parameter(d.to(device, dtype))  # D, content
        self.up_weight, self.down_weight = 1.0, 1.0  # composition weights of B (style) and D (content)
        self.centered = config.centered

    def set_factor_weights(self, up: float = 1.0, down: float = 1.0) -> None:
        """Scale the learnable halves at generation time: dW = [A; up*B] [C | down*D]."""
        self.up_weight, self.down_weight = float(up), float(down)

    def pieces(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, weighted B, C, weighted D): what U and V are made of, composition weights applied."""
        up = self.learnable_up if self.up_weight == 1.0 else self.up_weight * self.learnable_up
        down = self.learnable_down if self.down_weight == 1.0 else self.down_weight * self.learnable_down
        return self.frozen_up, up, self.frozen_down, down

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """U = [A; B] and V = [C | D] (rank r; the Riemannian preconditioner's factors)."""
        return plp_factors(*self.pieces())

    def product_pieces(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pieces of the product the layer applies: U, V's, or the centered rank-2r ones."""
        return centered_pieces(*self.pieces()) if self.centered else self.pieces()

    def delta_forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        up, down = plp_factors(*self.product_pieces())
        return F.linear(F.linear(x, layer.cast_like_input(down, x)), layer.cast_like_input(up, x))

    def fused_forward(self, base: nn.Module, x: torch.Tensor, weight: float) -> torch.Tensor | None:
        # One autograd Function (x saved once, the factors by reference, no frozen-half gradients).
        # The adapter weight and the composition weights scale the learnable halves: W + w U V with
        # U = [A; uB], V = [C | dD] is not a rescaling of the pieces, so they go in as products.
        if not layer.has_dense_weight(base):
            return None
        frozen_up, up, frozen_down, down = self.product_pieces()
        if weight != 1.0:  # w U V = [wA; wB] V
            frozen_up, up = weight * frozen_up, weight * up
        return PlpLinearFunction.apply(
            x, base.weight, base.bias, frozen_up, up, frozen_down, down, torch.is_grad_enabled()
        )

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        up, down = plp_factors(*self.product_pieces())
        return up @ down

    def lora_factors(self, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        up, down = plp_factors(*self.product_pieces())  # rank r, or 2r when centered
        return down.detach().clone(), up.detach().clone()


def make_joint(
    handle: AdapterHandle,
    content: str = "content",
    style: str = "style",
    name: str = "joint",
    content_factor: str = "down",
    initial_down_in: Collection[str] = (),
) -> None:
    """Break-for-Make's *make* init: a new adapter U* = [A; B_style], V* = [C | D_content].

    content_factor="up" is the role swap (content trained B, style trained D): U* = [A; B_content],
    V* = [C | D_style]. Refuses adapters whose frozen bases differ (other seed, other layers):
    pairing them would be meaningless. The new adapter's B and D are trainable; the two source
    adapters are disabled.

    initial_down_in: module names whose joint D is not copied but keeps the new adapter's own initial
    value, the seeded D_0 both break runs started from. The released make stage does this, unasked,
    in every layer where it re-runs its orthogonal initialisation (docs/methods/b4m.md).
    """
    if content_factor not in ("down", "up"):
        raise AdapterError(f"make_joint: content_factor must be 'down' or 'up', got {content_factor!r}")
    up_source, down_source = (style, content) if content_factor == "down" else (content, style)
    for source in (content, style):
        if handle.configs.get(source) is None or handle.configs[source].method != "plp":
            raise AdapterError(
                f"make_joint needs a PLP adapter named {source!r}; this model has {handle.adapter_names}"
            )
    content_config, style_config = handle.configs[content], handle.configs[style]
    if (content_config.r, content_config.seed) != (style_config.r, style_config.seed):
        raise AdapterError(
            f"content (r={content_config.r}, seed={content_config.seed}) and style (r={style_config.r}, "
            f"seed={style_config.seed}) PLPs were made with different frozen bases; train both with the same r and seed"
        )
    if content_config.centered != style_config.centered:
        raise AdapterError(
            f"content (centered={content_config.centered}) and style (centered={style_config.centered}) "
            "PLPs apply different products; train both with the same `centered` setting"
        )
    content_layers = {module for module, _ in handle.wrappers(content)}
    if content_layers != {module for module, _ in handle.wrappers(style)}:
        raise AdapterError("content and style PLPs adapt different layers; train both with the same targets")
    for module_name, wrapper in handle.wrappers(content):
        a, b = wrapper.adapters[content], wrapper.adapters[style]
        if not (torch.equal(a.frozen_up, b.frozen_up) and torch.equal(a.frozen_down, b.frozen_down)):
            raise AdapterError(
                f"{module_name!r}: the content and style PLPs have different frozen bases; they cannot be paired"
            )

    unknown = set(initial_down_in) - content_layers
    if unknown:
        raise AdapterError(f"make_joint: initial_down_in names layers the PLPs do not adapt: {sorted(unknown)}")

    handle.add(content_config, name=name)
    with torch.no_grad():
        for module_name, wrapper in handle.wrappers(name):
            wrapper.adapters[name].learnable_up.copy_(wrapper.adapters[up_source].learnable_up)
            if module_name not in initial_down_in:  # else: keep the fresh adapter's D_0
                wrapper.adapters[name].learnable_down.copy_(wrapper.adapters[down_source].learnable_down)
    handle.set_trainable(name)
    handle.disable(content)
    handle.disable(style)


register_method(
    PlpConfig,
    PlpAdapter,
    capabilities=Capabilities(
        wraps=(nn.Linear,),
        mergeable=True,
        quantized_base=True,  # the update U V is added to the 4-bit layer's output; the fused path needs a dense one
        lora_export=True,  # a rank-r LoRA (rank 2r when centered)
        identity_at_init=False,  # A C + A D_0 from step 0 (the paper's PLP); centered=True starts at the base
        trainer_defaults={"llm": {"r": 8}, "diffusion": {"r": 16}},
        note="PLP changes the model from step 0 (its frozen halves), as the paper's; centered=true starts at the base.",
    ),
)
