"""Generation and conditioning by backprop: the two ways an AUNN is prompted.

Generation reads predictions at indices past the end of the data. Conditioning
teaches a *copy* of the model a prompt at indices ``at .. at+P-1`` with a few
gradient steps (Adam by default, or plain SGD) and then reads its predictions after
the prompt; the original model is untouched. On CUDA, from GRAPH_MIN_STEPS steps on, the
steps replay one captured CUDA graph.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch

from .cpp_backend import OneCallStep
from .cuda_graph import GraphedTrainStep
from .errors import UserInputError, UserTypeError
from .model import AUNN
from .resources import INDEX_BYTES, check_fits
from .validation import check_targets

GENERATE_BATCH = 65_536
GENERATE_LOGITS_MAX = 1 << 24  # logits held at once when sampling: fewer indices for a large vocabulary


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """float [..., V] logits -> int64 [...] tokens: argmax at temperature 0, else softmax sampling.

    The logits are scaled in float64 after subtracting their maximum, so that any temperature > 0, however
    small (1e-300), gives the argmax's limit (ties drawn among the largest) instead of NaN probabilities."""
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise UserTypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not 0 <= temperature < math.inf:
        raise UserInputError(f"temperature must be a finite number >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits.double()
    probs = torch.softmax((scaled - scaled.amax(-1, keepdim=True)) / temperature, dim=-1)
    flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]).cpu(), 1, generator=generator)
    return flat.reshape(logits.shape[:-1]).to(logits.device)


def span(model: AUNN, start: int, length: int) -> torch.Tensor:
    """int64 [length] indices start .. start+length-1 on the model's device, checked to be its indices
    (an addition, as arange's end may not be 2**63)."""
    model.cfg.check_span(start, length)
    return start + torch.arange(length, device=model.device, dtype=torch.int64)


def generate_batch(model: AUNN) -> int:
    """Indices predicted at once: GENERATE_BATCH, fewer where their logits would exceed GENERATE_LOGITS_MAX."""
    return max(1, min(GENERATE_BATCH, GENERATE_LOGITS_MAX // model.cfg.vocab_size))


def check_output_fits(model: AUNN, length: int) -> None:
    """ResourceError unless ``length`` generated int64 tokens (and one batch's work) fit on the model's device."""
    batch = generate_batch(model)
    check_fits(f"generating {length:,} tokens", length * INDEX_BYTES + batch * model.cfg.vocab_size * 8, model.device)


@torch.no_grad()
def generate(
    model: AUNN, start: int, length: int, temperature: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Tokens at indices start .. start+length-1: int64 [length], predicted GENERATE_BATCH at a time.
    Checks the span and that the tokens fit in memory before any work."""
    model.cfg.check_span(start, length)
    check_output_fits(model, length)
    out = torch.empty(length, dtype=torch.int64, device=model.device)
    batch = generate_batch(model)
    for offset in range(0, length, batch):
        idx = span(model, start + offset, min(batch, length - offset))
        out[offset : offset + idx.numel()] = (
            model.predict(idx) if temperature == 0 else sample(model(idx), temperature, generator)
        )
    return out


CONDITION_OPTIMIZERS = ("adam", "sgd")

# On CUDA, from this many gradient steps on (in all, for generate_by_backprop), one step is captured in a
# CUDA graph (GraphedTrainStep) and replayed: a step on a prompt's few indices is a few dozen small
# launches, 2.3-2.8 ms eagerly for the seed model on the H100 (bench `condition`), which a replay avoids;
# the capture costs its 3 warm-up steps (undone afterwards) and the capture itself.
GRAPH_MIN_STEPS = 8


def conditioning_optimizer(model: AUNN, name: str, lr: float, capturable: bool = False) -> torch.optim.Optimizer:
    """The optimizer of a conditioning run: a fresh Adam (its first step moves every weight by ~lr; on CUDA
    fused, one launch per step instead of a dozen) or SGD; capturable: an Adam whose step a CUDA graph can
    hold (SGD's always can)."""
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, capturable=capturable, fused=model.device.type == "cuda")
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    raise UserInputError(f"unknown conditioning optimizer {name!r}; choose from {', '.join(CONDITION_OPTIMIZERS)}")


def optimizer_step(
    model: AUNN, optimizer: str, lr: float, batch: int, total_steps: int
) -> Callable[[torch.Tensor, torch.Tensor], object]:
    """``step(idx, targets)``: one step of a fresh optimizer on ``batch`` indices and their targets, run
    ``total_steps`` times in all: replayed from one captured CUDA graph where that is GRAPH_MIN_STEPS or more
    on CUDA, one C++ call per step with the cpp backend (their steps check no input: the caller does), else
    eager."""
    if model.active_backend().name == "cpp":
        conditioning_optimizer(model, optimizer, lr)  # the same errors for a bad name or learning rate
        return OneCallStep(model, optimizer, lr)
    graphed = model.device.type == "cuda" and batch > 0 and total_steps >= GRAPH_MIN_STEPS
    opt = conditioning_optimizer(model, optimizer, lr, capturable=graphed)
    if graphed:
        return GraphedTrainStep(model, opt, batch)

    def step(idx: torch.Tensor, targets: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        model.loss(idx, targets).backward()
        opt.step()

    return step


def condition(
    model: AUNN, prompt: torch.Tensor, at: int, steps: int = 1, lr: float = 1e-3, optimizer: str = "adam"
) -> AUNN:
    """A copy of ``model`` after ``steps`` optimizer steps on the prompt (integer token ids [P]) at indices
    at..at+P-1. TypeError for a prompt that is not integer ids (float targets included); ValueError for ids
    outside the vocabulary, a span past the model's indices, steps < 0 or a learning rate not finite >= 0."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise UserInputError(f"steps must be an integer >= 0, got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise UserInputError(f"lr must be a finite number >= 0, got {lr!r}")
    if not isinstance(prompt, torch.Tensor):
        raise UserTypeError(f"prompt must be a torch.Tensor of token ids, got {type(prompt).__name__}")
    idx = span(model, at, prompt.numel())
    prompt = check_targets(prompt.reshape(-1).to(model.device), idx, model.cfg)  # dtype first, once, before any step
    tuned = copy.deepcopy(model)
    step = optimizer_step(tuned, optimizer, lr, prompt.numel(), steps)
    for _ in range(steps):
        step(idx, prompt)
    return tuned


def generate_by_backprop(
    model: AUNN,
    start: int,
    length: int,
    temperature: float = 0.0,
    steps: int = 1,
    lr: float = 1e-3,
    optimizer: str = "adam",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Gwern's sampling scheme: predict index i, train a copy on (i, prediction) as data, move to i+1.

    Returns int64 [length]; the model passed in is untouched. One optimizer (fresh here) trains the copy
    through every position.
    """
    model.cfg.check_span(start, length)  # before any training step, not at the position past the range
    check_fits(f"generating {length:,} tokens", length * INDEX_BYTES, "cpu")
    tuned = copy.deepcopy(model)
    step = optimizer_step(tuned, optimizer, lr, 1, length * steps)  # targets: the model's own, valid, tokens
    out = torch.empty(length, dtype=torch.int64)
    for offset in range(length):
        idx = torch.tensor([start + offset], device=tuned.device, dtype=torch.int64)
        with torch.no_grad():
            token = sample(tuned(idx), temperature, generator)
        out[offset] = token.item()
        for _ in range(steps):
            step(idx, token)
    return out
