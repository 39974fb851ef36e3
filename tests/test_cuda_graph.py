"""A captured training step must do exactly what the eager step does (CUDA only)."""

import warnings

import pytest
import torch

from aunn_fast import AUNN, AUNNConfig
from aunn_fast.cuda_graph import GraphedTrainStep, capturable
from aunn_fast.data import ToyData
from aunn_fast.train import TrainConfig, train, training_optimizer

from helpers import rel_err

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@needs_cuda
@pytest.mark.parametrize(
    "backend,hidden,precision",
    [
        ("reference", 64, "fp32"),
        ("triton", 64, "fp32"),
        ("triton", 256, "bf16"),  # the layer-wise path: cuBLAS GEMMs and epilogue kernels in the graph
    ],
)
def test_graphed_steps_match_eager_steps(backend, hidden, precision):
    data = ToyData(500)
    cfg = TrainConfig(batch_size=256, lr=3e-3)
    models = [
        AUNN(AUNNConfig(hidden=hidden, layers=6), backend=backend, precision=precision, seed=1).cuda() for _ in range(2)
    ]
    tol = 1e-5 if precision == "fp32" else 1e-3
    eager_opt, graph_opt = (training_optimizer(m, cfg) for m in models)
    graphed = GraphedTrainStep(models[1], graph_opt, cfg.batch_size)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(5):
        idx = torch.randint(0, data.length, (cfg.batch_size,), device="cuda", generator=gen)
        targets = data.targets(idx)
        eager_opt.zero_grad()
        eager_loss = models[0].loss(idx, targets)
        eager_loss.backward()
        eager_opt.step()
        graph_loss = graphed(idx, targets)
        assert abs(eager_loss.item() - graph_loss.item()) < tol * max(1.0, eager_loss.item())
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert rel_err(b, a) < tol


@needs_cuda
def test_graph_rejects_wrong_batch_size():
    model = AUNN(AUNNConfig(hidden=32, layers=3)).cuda()
    graphed = GraphedTrainStep(model, training_optimizer(model, TrainConfig()), 64)
    with pytest.raises(ValueError, match="exactly 64"):
        graphed(torch.zeros(63, dtype=torch.int64, device="cuda"), torch.zeros(63, dtype=torch.int64, device="cuda"))


@needs_cuda
def test_graph_refuses_what_it_would_silently_ignore():
    """Inputs of another dtype; a backend, precision or learning rate changed after capture; parameters
    or optimizer state replaced (not updated in place) after capture."""
    model = AUNN(AUNNConfig(hidden=32, layers=3), backend="reference", precision="fp32").cuda()
    # a float lr, which the graph captures as it is (the trainer's is a device tensor that the graph reads)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True, capturable=True)
    graphed = GraphedTrainStep(model, optimizer, 64)
    ids = torch.zeros(64, dtype=torch.int64, device="cuda")
    with pytest.raises(TypeError, match="int64"):
        graphed(ids.float(), ids)
    graphed(ids, ids)
    for change, undo in (
        (lambda: setattr(model, "precision", "bf16"), lambda: setattr(model, "precision", "fp32")),
        (lambda: optimizer.param_groups[0].update(lr=1e-2), lambda: optimizer.param_groups[0].update(lr=1e-3)),
    ):
        change()
        with pytest.raises(RuntimeError, match="capture a new GraphedTrainStep"):
            graphed(ids, ids)
        undo()
        graphed(ids, ids)
    optimizer.load_state_dict(optimizer.state_dict())  # new state tensors: the graph holds the old ones
    with pytest.raises(RuntimeError, match="replaced since capture"):
        graphed(ids, ids)
    graphed = GraphedTrainStep(model, optimizer, 64)
    graphed(ids, ids)
    model.in_bias.data = model.in_bias.data.clone()
    with pytest.raises(RuntimeError, match="replaced since capture"):
        graphed(ids, ids)


@needs_cuda
def test_graph_keeps_its_gradient_buffers():
    """A caller freeing the gradients (zero_grad(set_to_none=True)) and emptying the cache does not
    change what a replay computes: the graph holds the tensors it was captured with."""
    data = ToyData(500)
    cfg = TrainConfig(batch_size=256, lr=3e-3)
    models = [
        AUNN(AUNNConfig(hidden=64, layers=6), backend="reference", precision="fp32", seed=1).cuda() for _ in range(2)
    ]
    eager_opt, graph_opt = (training_optimizer(m, cfg) for m in models)
    graphed = GraphedTrainStep(models[1], graph_opt, cfg.batch_size)
    graph_opt.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    idx = torch.randint(0, data.length, (cfg.batch_size,), device="cuda")
    targets = data.targets(idx)
    eager_opt.zero_grad()
    models[0].loss(idx, targets).backward()
    eager_opt.step()
    graphed(idx, targets)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert rel_err(b, a) < 1e-5


@needs_cuda
def test_trainer_mixes_graphed_and_eager_steps():
    """With a short last batch per epoch the trainer alternates replays and eager steps; the result
    must match a run without the graph. torch's warning that a capturable optimizer steps uncaptured
    (the warm-up, the short steps: both meant) is not shown."""
    data = ToyData(60)  # 240 indices: three batches of 64 and one of 48 per epoch
    results = []  # both with the default warm-up, cosine decay and clipping: the graph must follow them
    for cuda_graph in (False, True):
        model = AUNN(AUNNConfig(hidden=32, layers=4), backend="reference", precision="fp32", seed=2).cuda()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(model, data, TrainConfig(batch_size=64, epochs=3, lr=3e-3, cuda_graph=cuda_graph), progress=False)
        assert not [w for w in caught if "capturable=True" in str(w.message)]
        results.append([p.detach().clone() for p in model.parameters()])
    for eager, graphed in zip(*results):
        assert rel_err(graphed, eager) < 1e-4


@needs_cuda
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_graphed_conditioning_matches_eager_conditioning(optimizer, monkeypatch):
    """condition and generate_by_backprop replay one captured step from GRAPH_MIN_STEPS steps on: the same
    tuned weights and tokens as their eager steps (Adam fused, captured with capturable=True; SGD as it is)."""
    from aunn_fast import inference

    model = AUNN(AUNNConfig(hidden=32, layers=4, vocab_size=5), backend="triton", precision="fp32", seed=3).cuda()
    assert inference.conditioning_optimizer(model, "adam", 1e-3).defaults["fused"]
    prompt = torch.tensor([1, 4, 0, 2, 3, 3, 1], device="cuda")
    results, graph_min_steps = [], inference.GRAPH_MIN_STEPS
    for min_steps in (graph_min_steps, 1 << 30):  # graphed, then eager
        monkeypatch.setattr(inference, "GRAPH_MIN_STEPS", min_steps)
        tuned = inference.condition(model, prompt, 1000, steps=10, lr=1e-2, optimizer=optimizer)
        tokens = inference.generate_by_backprop(model, 2000, 6, steps=2, lr=1e-2, optimizer=optimizer)
        results.append(([p.detach().clone() for p in tuned.parameters()], tokens))
    (graphed, graphed_tokens), (eager, eager_tokens) = results
    for a, b in zip(graphed, eager):
        assert rel_err(a, b) < 1e-4
    assert torch.equal(graphed_tokens, eager_tokens)
    monkeypatch.setattr(inference, "GRAPH_MIN_STEPS", graph_min_steps)
    with pytest.raises(ValueError, match="outside the vocabulary"):  # checked once, before the graph
        inference.condition(model, prompt + 5, 1000, steps=graph_min_steps)


# The checks that run before any capture, on the CPU too.


def test_graphs_take_capturable_optimizers_and_sgd():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert capturable(torch.optim.SGD(params, lr=0.1)) and capturable(torch.optim.Adam(params, capturable=True))
    assert not capturable(torch.optim.Adam(params)) and not capturable(torch.optim.AdamW(params))


def test_graphed_step_needs_a_cuda_model():
    model = AUNN(AUNNConfig(vocab_size=4, hidden=16, layers=3), seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), capturable=True)
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedTrainStep(model, optimizer, 8)


def test_graphed_step_restore_undoes_the_warm_up():
    """_restore puts back the parameters and zeroes optimizer state the warm-up created (no step taken yet)."""
    model = AUNN(AUNNConfig(vocab_size=4, hidden=16, layers=3), seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = object.__new__(GraphedTrainStep)
    step.model, step.optimizer = model, optimizer
    saved = [p.detach().clone() for p in model.parameters()]
    model.loss(torch.arange(16), torch.arange(16) % 4).backward()
    optimizer.step()
    step._restore(saved, {})
    assert all(torch.equal(a, b) for a, b in zip(saved, model.parameters()))
    for state in optimizer.state.values():
        assert all(not v.any() for v in state.values() if torch.is_tensor(v))


def test_graphed_step_refuses_other_dtypes_before_replaying():
    step = object.__new__(GraphedTrainStep)
    step.batch_size = 4
    ids = torch.zeros(4, dtype=torch.int64)
    for idx, targets in ((ids.int(), ids), (ids, ids.int())):
        with pytest.raises(TypeError, match="int64"):
            step(idx, targets)
