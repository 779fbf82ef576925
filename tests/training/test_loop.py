"""The training loop: seeded determinism, non-finite loss, best-epoch restore."""

from __future__ import annotations

import pytest
import torch

from peftflow.errors import TrainingError
from peftflow.task.classification import predict_logits
from peftflow.task.registry import build_for_training
from peftflow.training.batching import batch_order
from tests.conftest import train_classifier
from tests.models.test_methods import encoded_table, tiny_config


def train_once(model_dir, **train_fields):
    cfg = tiny_config(model_dir, "full")
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=train_fields)})
    model, tokenizer, _ = build_for_training(cfg)
    data = encoded_table(cfg, tokenizer)
    return train_classifier(model, data, data, cfg, tokenizer.pad_token_id), model


def test_same_seed_gives_same_metrics(tiny_models):
    first, _ = train_once(tiny_models["llama"], epochs=2)
    second, _ = train_once(tiny_models["llama"], epochs=2)
    assert first.history == second.history
    assert len(first.history) == 2 and "val_f1" in first.history[0]


@pytest.mark.parametrize("grouped", [False, True])
def test_batch_order_is_seeded_per_epoch_and_covers_every_example(grouped):
    lengths = list(range(1, 401))
    first = batch_order(lengths, 4, seed=1, epoch=1, group_by_length=grouped)
    assert first == batch_order(lengths, 4, seed=1, epoch=1, group_by_length=grouped)
    assert first != batch_order(lengths, 4, seed=1, epoch=2, group_by_length=grouped)
    assert sorted(i for batch in first for i in batch) == list(range(400))


def test_grouping_by_length_cuts_padding():
    lengths = [
        int(x) for x in torch.randint(5, 200, (1000,), generator=torch.Generator().manual_seed(0))
    ]

    def padded_tokens(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    random_order = padded_tokens(batch_order(lengths, 16, 0, 1, group_by_length=False))
    grouped = padded_tokens(batch_order(lengths, 16, 0, 1, group_by_length=True))
    assert grouped < 0.7 * random_order


def test_non_finite_loss_stops_training(tiny_models):
    cfg = tiny_config(tiny_models["bert"], "full")
    model, tokenizer, _ = build_for_training(cfg)
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))  # every logit, hence every loss, becomes NaN
    data = encoded_table(cfg, tokenizer)
    with pytest.raises(TrainingError, match="non-finite loss in epoch 1"):
        train_classifier(model, data, data, cfg, tokenizer.pad_token_id)


def test_gradient_accumulation_and_metrics_reported(tiny_models):
    outcome, model = train_once(tiny_models["gpt2"], grad_accum_steps=2, epochs=2)
    assert outcome.best_epoch in (1, 2)
    assert outcome.examples_per_second > 0 and outcome.tokens_per_second > 0
    assert outcome.peak_memory_mb > 0 and outcome.device == "cpu"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_cuda_request_without_gpu_is_refused(tiny_models):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(TrainingError, match="no CUDA GPU is visible"):
        train_once(tiny_models["bert"], device="cuda")


def test_bf16_autocast_trains_and_predicts_in_float32(tiny_models):
    outcome, model = train_once(tiny_models["llama"], precision="bf16")
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in outcome.history)
    cfg = tiny_config(tiny_models["llama"], "full")
    data = encoded_table(cfg, build_for_training(cfg)[1], n=8)
    logits = predict_logits(model, data, 8, pad_id=0, side="right", precision="bf16")
    assert logits.dtype == torch.float32 and logits.shape == (8, 2)


PEAK_MEMORY_PROBE = """
import torch
from peftflow.training.memory import peak_memory_mb, reset_peak_memory
cpu = torch.device("cpu")
spike = b"\\x01" * (400 * 2**20)  # 400 MiB written (so resident) before the run
del spike
before = peak_memory_mb(cpu)
reset_peak_memory(cpu)
print(before, peak_memory_mb(cpu))
"""


def test_peak_memory_counts_this_run_not_the_process_lifetime():
    """A flow process runs many stages: a run's peak starts when it starts training.

    Probed in a fresh interpreter: in the long-lived pytest process, freed but still
    resident heap pages from earlier tests can absorb the spike and hide it.
    """
    import subprocess
    import sys

    probe = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY_PROBE], capture_output=True, text=True, check=True
    )
    before, after = map(float, probe.stdout.split())
    assert after < before - 300  # the earlier spike is no longer charged
    assert after > 50  # still the whole process (libraries, interpreter)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("method", ["lora", "dora", "last_block", "ia3", "bottleneck_adapter"])
def test_frozen_weights_kept_in_bf16_compute_exactly_what_autocast_computes(
    tiny_models, kind, method
):
    """Storing frozen matmul weights in bf16 once == autocast casting them every forward."""
    import torch

    from peftflow.task.registry import build_for_training
    from peftflow.training.precision import frozen_matmul_weights, store_frozen_weights_for_autocast
    from tests.models.test_methods import tiny_config

    cfg = tiny_config(tiny_models[kind], method)
    cast, _, _ = build_for_training(cfg)
    plain, _, _ = build_for_training(cfg)
    cpu = torch.device("cpu")
    frozen = len(frozen_matmul_weights(cast))
    store_frozen_weights_for_autocast(cast, cpu, "bf16")
    assert frozen > 0 and frozen_matmul_weights(cast) == []
    ids = torch.randint(5, 200, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    for model in (cast, plain):
        model.train()
        torch.manual_seed(0)  # same dropout masks
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.out = model(ids, mask).float()
        model.out.sum().backward()
    assert torch.equal(cast.out, plain.out)
    for (name, a), b in zip(cast.named_parameters(), plain.parameters(), strict=True):
        if a.requires_grad:
            assert torch.equal(a.grad, b.grad), name
    untouched, _, _ = build_for_training(cfg)
    store_frozen_weights_for_autocast(untouched, cpu, "fp32")  # no autocast: nothing changes
    assert all(p.dtype == torch.float32 for p in untouched.parameters())


@pytest.mark.slow
def test_compiled_forward_computes_what_eager_does_and_trains(tiny_models):
    """train.compile: the compiled forward/backward equals eager (no dropout: compiled
    dropout draws other random numbers, one reason a compiled run has its own key);
    a compiled run trains and its parameters keep their names."""
    import torch._dynamo

    from peftflow.training.precision import compiled_for_training

    torch._dynamo.reset()
    cfg = tiny_config(tiny_models["llama"], "lora")
    model, _, _ = build_for_training(cfg)
    compiled = compiled_for_training(model, True)
    assert compiled_for_training(model, False) is model
    ids = torch.randint(5, 200, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    model.eval()  # dropout off: the same function on both paths
    grads = []
    for forward in (model, compiled):
        model.zero_grad()
        out = forward(ids, mask)
        out.float().square().sum().backward()
        grads.append(
            (out.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad])
        )
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-5)
    for eager_grad, compiled_grad in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(eager_grad, compiled_grad, rtol=1e-3, atol=1e-5)
    outcome, trained = train_once(tiny_models["llama"], epochs=1, compile=True)
    assert torch.isfinite(torch.tensor(outcome.history[0]["train_loss"]))
    _, eager_model = train_once(tiny_models["llama"], epochs=1)
    assert trained.state_dict().keys() == eager_model.state_dict().keys()


def test_compile_keys_a_run_only_when_on():
    """Configs written before train.compile existed keep their hash; compiled runs differ."""
    from peftflow.config.loading import parse_config

    plain = parse_config({"name": "x"})
    compiled = parse_config({"name": "x", "train": {"compile": True}})
    assert plain.train.compile is False
    assert parse_config({"name": "x", "train": {"compile": False}}).config_hash() == (
        plain.config_hash()
    )
    assert compiled.config_hash() != plain.config_hash()


def test_train_seed_changes_what_training_draws_and_nothing_else(tiny_models):
    """train.seed sets initialisation, batch order and dropout; the experiment seed (the
    split's) alone decides when train.seed is unset."""
    default, default_model = train_once(tiny_models["bert"], epochs=1)
    same, _ = train_once(
        tiny_models["bert"], epochs=1, seed=tiny_config(tiny_models["bert"], "full").seed
    )
    other, other_model = train_once(tiny_models["bert"], epochs=1, seed=7)
    assert same.history == default.history
    assert other.history != default.history
    head = [
        name
        for name, _ in default_model.named_parameters()
        if "head" in name or "classifier" in name
    ]
    assert head, "the tiny classifier has a head"
    weights = dict(default_model.named_parameters())
    assert any(not torch.equal(weights[n], dict(other_model.named_parameters())[n]) for n in head)


def test_train_seed_and_max_examples_key_a_run_only_when_set():
    """Configs written before the fields existed keep their hash (and their cached runs)."""
    from peftflow.config.loading import parse_config

    plain = parse_config({"name": "x", "seed": 5})
    assert plain.training_seed == 5
    for train in ({"seed": None}, {"max_examples": None}):
        assert parse_config({"name": "x", "seed": 5, "train": train}).config_hash() == (
            plain.config_hash()
        )
    seeded = parse_config({"name": "x", "seed": 5, "train": {"seed": 1}})
    assert seeded.training_seed == 1 and seeded.config_hash() != plain.config_hash()
    capped = parse_config({"name": "x", "seed": 5, "train": {"max_examples": 100}})
    assert capped.config_hash() != plain.config_hash()


def test_max_examples_trains_on_one_stratified_sample_for_every_training_seed():
    import pandas as pd

    from peftflow.config.loading import parse_config
    from peftflow.task.run import training_splits

    train = pd.DataFrame({"id": range(100), "text": "x", "label": ["ham"] * 80 + ["spam"] * 20})
    splits = {"train": train, "val": train.head(10), "test": train.head(20)}
    picked = []
    for seed in (1, 2):
        cfg = parse_config({"name": "x", "seed": 5, "train": {"seed": seed, "max_examples": 10}})
        cut = training_splits(cfg, splits)
        assert cut["val"] is splits["val"] and cut["test"] is splits["test"]
        # data.split.max_train_examples's quotas: one row a class, the rest in proportion.
        assert cut["train"]["label"].value_counts().to_dict() == {"ham": 7, "spam": 3}
        picked.append(sorted(cut["train"]["id"]))
    assert picked[0] == picked[1]
    assert training_splits(parse_config({"name": "x"}), splits) is splits
