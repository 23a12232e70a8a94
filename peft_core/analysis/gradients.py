"""The LoRA attention gradient of Hu et al. (ICLR 2025, arXiv 2406.03136), written out as the paper's chain.

One head, the paper's orientation (row vectors: Q = X W_Q, not nn.Linear's x W^T):

    W_mu = W*_mu + s B_mu A_mu        X (L, d), W*_mu (d, d_h), B_mu (d, r), A_mu (r, d_h), s = alpha / r
    loss = 1/2 || D^-1 exp(beta X W_Q W_K^T X^T) X W_V - Y ||_F^2

`gradient_chain` computes dloss/dA, dloss/dB for every adapted projection through the chain of §2.2
(f, c, q, p1, p2, p), which the tests check against autograd in fp64. The chain takes the attention
matrix f as an argument, so a surrogate of f (a degree-g polynomial of exp, as in the paper's fast
algorithm, or a rank-m truncation) can be dropped in: `surrogate_gradient_error` measures what that
does to the gradient, and `problem_at_rho` builds problems whose adapted Q/K entries sit at a chosen
rho = Gamma / sqrt(ln L), the quantity the regime report measures on real models (see regime.py).
This module is the reference the report's thresholds come from; nothing here is fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

PROJECTIONS = ("Q", "K", "V")


@dataclass
class LoraAttentionProblem:
    """One head with LoRA on W_Q, W_K and W_V (set a B to zeros for partial adaptation)."""

    X: torch.Tensor  # (L, d)
    W: dict[str, torch.Tensor]  # "Q"/"K"/"V" -> frozen W* (d, d_h)
    A: dict[str, torch.Tensor]  # -> (r, d_h)
    B: dict[str, torch.Tensor]  # -> (d, r)
    Y: torch.Tensor  # (L, d_h)
    scaling: float  # s = alpha / r
    beta: float  # softmax scale, usually 1/sqrt(d_h)

    def adapted(self, name: str) -> torch.Tensor:
        return self.W[name] + self.scaling * self.B[name] @ self.A[name]

    def projections(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(self.X @ self.adapted(name) for name in PROJECTIONS)  # each (L, d_h)

    def logits(self) -> torch.Tensor:
        Q, K, _ = self.projections()
        return self.beta * Q @ K.T  # (L, L)


def attention_loss(problem: LoraAttentionProblem) -> torch.Tensor:
    """1/2 || softmax(beta Q K^T) V - Y ||_F^2 (the paper's loss; autograd reference)."""
    _, _, V = problem.projections()
    f = torch.softmax(problem.logits(), dim=-1)
    return 0.5 * ((f @ V - problem.Y) ** 2).sum()


def gradient_chain(problem: LoraAttentionProblem, f: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """dloss/dA_mu and dloss/dB_mu (keys "A_Q", "B_Q", ...) through the paper's chain.

    f: the attention matrix to use (default: the exact softmax); pass a surrogate to see its effect.
    """
    X, s, beta = problem.X, problem.scaling, problem.beta
    Q, K, V = problem.projections()
    if f is None:
        f = torch.softmax(beta * Q @ K.T, dim=-1)  # (L, L)
    c = f @ V - problem.Y  # (L, d_h): dO
    q = V @ c.T  # (L, L), rank <= d_h: q^T = dP = c V^T
    p1 = f * q.T  # f ⊙ dP
    p2 = p1.sum(dim=1, keepdim=True) * f  # diag(p1 1) f
    p = p1 - p2  # dS: dloss/d(logits)
    C1 = s * X
    # logits = beta Q K^T: the Q side sees C2 = X W_K, the K side sees X W_Q (transposed p).
    upstream = {
        "Q": C1.T @ (beta * p) @ K,  # (d, d_h) = s dloss/dW_Q
        "K": C1.T @ (beta * p).T @ Q,
        "V": C1.T @ f.T @ c,
    }
    grads = {}
    for name in PROJECTIONS:
        grads[f"A_{name}"] = problem.B[name].T @ upstream[name]  # B^T C1^T p C2
        grads[f"B_{name}"] = upstream[name] @ problem.A[name].T  # C1^T p C2 A^T
    return grads


def autograd_gradients(problem: LoraAttentionProblem) -> dict[str, torch.Tensor]:
    """The same gradients from autograd (the reference `gradient_chain` is tested against)."""
    A = {name: value.detach().clone().requires_grad_(True) for name, value in problem.A.items()}
    B = {name: value.detach().clone().requires_grad_(True) for name, value in problem.B.items()}
    loss = attention_loss(replace(problem, A=A, B=B))
    leaves = [A[name] for name in PROJECTIONS] + [B[name] for name in PROJECTIONS]
    values = torch.autograd.grad(loss, leaves)
    keys = [f"A_{name}" for name in PROJECTIONS] + [f"B_{name}" for name in PROJECTIONS]
    return dict(zip(keys, values))


# -- surrogates of the attention matrix ---------------------------------------------------------
def chebyshev_exp(S: torch.Tensor, degree: int, bound: float) -> torch.Tensor:
    """exp(S) elementwise through the degree-g Chebyshev interpolant of exp on [-bound, bound]
    (the polynomial the paper's fast algorithm factors through monomial features)."""
    bound = max(float(bound), 1e-12)
    nodes = torch.arange(degree + 1, dtype=torch.float64)
    theta = math.pi * (nodes + 0.5) / (degree + 1)  # Chebyshev nodes of the first kind
    values = torch.exp(bound * torch.cos(theta))
    coefficients = [(2.0 / (degree + 1)) * (values * torch.cos(k * theta)).sum().item() for k in range(degree + 1)]
    coefficients[0] /= 2
    x = (S / bound).clamp(-1.0, 1.0)
    previous, current = torch.ones_like(x), x  # T_0, T_1
    result = coefficients[0] * previous
    for k in range(1, degree + 1):
        result = result + coefficients[k] * current
        previous, current = current, 2 * x * current - previous
    return result


def polynomial_attention(logits: torch.Tensor, degree: int) -> torch.Tensor:
    """D^-1 P_g(S): softmax with exp replaced by its degree-g Chebyshev interpolant on [-max|S|, max|S|]."""
    weights = chebyshev_exp(logits, degree, logits.abs().max().item())
    return weights / weights.sum(dim=-1, keepdim=True)


def low_rank_attention(f: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-m approximation of f (truncated SVD): what any rank-m surrogate can do at best."""
    U, sigma, Vh = torch.linalg.svd(f)
    return (U[:, :rank] * sigma[:rank]) @ Vh[:rank]


def epsilon_rank(f: torch.Tensor, epsilon: float = 1e-2) -> int:
    """Smallest m with ||f - f_m||_2 <= epsilon ||f||_2."""
    sigma = torch.linalg.svdvals(f)
    return int((sigma > epsilon * sigma[0]).sum().item())


def relative_error(approx: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> float:
    """|| approx - exact ||_F / || exact ||_F over all gradients together."""
    diff = sum(((approx[key] - exact[key]) ** 2).sum() for key in exact)
    norm = sum((exact[key] ** 2).sum() for key in exact)
    return math.sqrt(float(diff) / max(float(norm), 1e-300))


def surrogate_gradient_error(
    problem: LoraAttentionProblem, degree: int | None = None, rank: int | None = None
) -> float:
    """Relative gradient error of the chain run on a degree-g polynomial or a rank-m surrogate of f."""
    if (degree is None) == (rank is None):
        raise ValueError("pass exactly one of degree (polynomial surrogate) or rank (low-rank surrogate)")
    logits = problem.logits()
    exact_f = torch.softmax(logits, dim=-1)
    f = polynomial_attention(logits, degree) if degree is not None else low_rank_attention(exact_f, rank)
    return relative_error(gradient_chain(problem, f), gradient_chain(problem, exact_f))


def problem_at_rho(
    length: int,
    rho: float,
    head_dim: int = 16,
    rank: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> LoraAttentionProblem:
    """A random full-LoRA head whose adapted sqrt(beta) Q and sqrt(beta) K have max entry exactly
    Gamma = rho * sqrt(ln L) (W* and B of each projection scaled together, so the LoRA share stays)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype)

    d = head_dim
    X = randn(length, d)
    W = {name: randn(d, d) / math.sqrt(d) for name in PROJECTIONS}
    A = {name: randn(rank, d) / math.sqrt(rank) for name in PROJECTIONS}
    B = {name: randn(d, rank) / math.sqrt(d) for name in PROJECTIONS}
    problem = LoraAttentionProblem(X=X, W=W, A=A, B=B, Y=randn(length, d), scaling=1.0, beta=1.0 / math.sqrt(d))
    gamma = rho * math.sqrt(math.log(length))
    for name in ("Q", "K"):
        current = (math.sqrt(problem.beta) * X @ problem.adapted(name)).abs().max().item()
        W[name], B[name] = W[name] * (gamma / current), B[name] * (gamma / current)
    return problem
