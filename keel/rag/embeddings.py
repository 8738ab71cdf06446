"""Embedding providers behind one interface; WordLlama's packaged weights by default.

The default needs no network: WordLlama 0.4.0's wheel ships its weights
(``wordllama/weights/l2_supercat_256.safetensors``) and tokenizer config, which are loaded
from the installed package directly (``WordLlama.load`` would look for the tokenizer in a
folder the wheel does not have, then try Hugging Face). A sentence-transformers model in a
local folder, or an OpenAI-compatible ``/v1/embeddings`` endpoint, replaces it by
configuration (`EmbeddingConfig`). Vectors are L2-normalised float32, so an inner product is
the cosine similarity.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np

PROVIDERS = ("wordllama", "sentence-transformers", "openai")


class EmbeddingError(RuntimeError):
    """The configured embedding provider cannot be set up or did not answer."""


class Embedder(Protocol):
    """Turns texts into L2-normalised float32 vectors; names and hashes its model."""

    name: str
    dimension: int
    model_hash: str

    def embed(self, texts: list[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class EmbeddingConfig:
    """Which provider embeds, and its model.

    ``model`` is a folder for sentence-transformers and a model name for an endpoint;
    ``url`` and ``api_key_env`` (the variable holding its key) serve ``openai`` only.
    """

    provider: str = "wordllama"
    model: str = ""
    url: str = ""
    api_key_env: str = "KEEL_RAG_EMBEDDINGS_API_KEY"


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return vectors / norms


def _file_hash(*paths: str) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class WordLlamaEmbedder:
    """WordLlama ``l2_supercat`` at 256 dimensions, from the files inside the installed wheel."""

    name = "wordllama/l2_supercat_256"
    dimension = 256

    def __init__(self) -> None:
        from importlib.resources import files

        from safetensors import safe_open
        from tokenizers import Tokenizer
        from wordllama.inference import WordLlamaInference

        root = files("wordllama")
        weights = str(root / "weights" / "l2_supercat_256.safetensors")
        tokenizer = str(root / "tokenizers" / "l2_supercat_tokenizer_config.json")
        for path in (weights, tokenizer):
            if not os.path.exists(path):
                raise EmbeddingError(f"the wordllama wheel lacks {path}: reinstall wordllama")
        with safe_open(weights, framework="np") as handle:
            matrix = handle.get_tensor("embedding.weight")
        self._model = WordLlamaInference(matrix, Tokenizer.from_file(tokenizer))
        self.model_hash = _file_hash(weights, tokenizer)

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        # Batches of similar lengths pad less: sort by length, embed, restore the order.
        order = np.argsort([len(t) for t in texts], kind="stable")
        vectors = self._model.embed([texts[i] for i in order], norm=False, batch_size=256)
        result = np.empty_like(vectors)
        result[order] = vectors
        return _normalise(result)


class SentenceTransformerEmbedder:
    """A sentence-transformers model from a local folder (never downloaded)."""

    def __init__(self, folder: str) -> None:
        if not folder or not os.path.isdir(folder):
            raise EmbeddingError(
                f"sentence-transformers needs a model folder on disk; {folder!r} is not one"
            )
        try:
            from sentence_transformers import SentenceTransformer
        except ModuleNotFoundError as error:
            raise EmbeddingError("sentence-transformers is not installed") from error
        self._model = SentenceTransformer(folder, local_files_only=True)
        self.name = f"sentence-transformers/{os.path.basename(folder.rstrip('/'))}"
        self.dimension = int(self._model.get_sentence_embedding_dimension())
        weights = sorted(
            os.path.join(folder, f)
            for f in os.listdir(folder)
            if f.endswith((".safetensors", ".bin", ".json"))
        )
        self.model_hash = _file_hash(*weights)

    def embed(self, texts: list[str]) -> np.ndarray:
        return _normalise(self._model.encode(texts, batch_size=64, convert_to_numpy=True))


class OpenAIEmbedder:
    """An OpenAI-compatible ``POST {url}/embeddings`` endpoint (vLLM, Ollama, a hosted API)."""

    def __init__(self, url: str, model: str, api_key: str = "", timeout_s: float = 30.0) -> None:
        if not url or not model:
            raise EmbeddingError("the openai embedding provider needs both a url and a model")
        self.url = url.rstrip("/")
        self.name = f"openai/{model}"
        self._model = model
        self._api_key = api_key
        self._timeout = timeout_s
        # An endpoint's weights are not ours to hash: the name stands for the model.
        self.model_hash = hashlib.sha256(f"{self.url}|{model}".encode()).hexdigest()
        self.dimension = int(self.embed(["dimension probe"]).shape[1])

    def embed(self, texts: list[str]) -> np.ndarray:
        import httpx

        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        vectors = []
        for lo in range(0, len(texts), 128):
            try:
                response = httpx.post(
                    f"{self.url}/embeddings",
                    json={"model": self._model, "input": texts[lo : lo + 128]},
                    headers=headers,
                    timeout=self._timeout,
                )
                response.raise_for_status()
                data = sorted(response.json()["data"], key=lambda item: item["index"])
            except (httpx.HTTPError, KeyError, ValueError) as error:
                raise EmbeddingError(f"embeddings endpoint {self.url} failed: {error}") from error
            vectors.extend(item["embedding"] for item in data)
        return _normalise(np.asarray(vectors, dtype=np.float32))


_CACHE: dict[EmbeddingConfig, Embedder] = {}


def embedder(config: EmbeddingConfig | None = None) -> Embedder:
    """The provider ``config`` names, built once per process."""
    config = config or EmbeddingConfig()
    if config not in _CACHE:
        if config.provider == "wordllama":
            _CACHE[config] = WordLlamaEmbedder()
        elif config.provider == "sentence-transformers":
            _CACHE[config] = SentenceTransformerEmbedder(config.model)
        elif config.provider == "openai":
            _CACHE[config] = OpenAIEmbedder(
                config.url, config.model, os.environ.get(config.api_key_env, "")
            )
        else:
            raise EmbeddingError(
                f"unknown embedding provider {config.provider!r}; one of {', '.join(PROVIDERS)}"
            )
    return _CACHE[config]
