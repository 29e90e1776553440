"""Text embedders: the built-in hashed character n-gram TF-IDF (the default, no download), the
mean-pooled hidden states of an lmforge run (`HiddenStateEmbedder`), and any local
sentence-transformers model directory (`SentenceTransformerEmbedder`, `pip install sentence-transformers`).

Each text is lowercased, runs of whitespace become one space, and every character n-gram
(n in `ngrams`, over UTF-8 bytes) is hashed into one of `dim` buckets; the vector is the
sublinear term frequency log(1 + count) per bucket. The IDF weights depend on the whole
collection, which changes with every re-index, so the index stores the raw TF vectors and the
bucket document frequencies, and `tfidf_scores` applies IDF at query time: an exact TF-IDF
cosine whatever was added or removed since (Salton & Buckley 1988; the hashing trick,
Weinberger et al. 2009). Character n-grams match invented names and inflections that a word
vocabulary would miss ("Brarken" ~ "Brarken's").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_SPACES = re.compile(r"\s+")
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads the polynomial hash over 64 bits


@dataclass(frozen=True)
class NgramEmbedder:
    """Hashed character n-gram term frequencies; `name` and fields are stored in the index so a
    query is embedded exactly as the chunks were."""

    dim: int = 1024
    ngrams: tuple[int, ...] = (3, 4, 5)
    name: str = "ngram-tfidf"

    def __post_init__(self):
        if self.dim < 16:
            raise ValueError(f"embedding dim={self.dim} must be >= 16")
        if not self.ngrams or min(self.ngrams) < 1:
            raise ValueError(f"ngrams={self.ngrams} must be lengths >= 1")

    def config(self) -> dict:
        return {"name": self.name, "dim": self.dim, "ngrams": list(self.ngrams)}

    def term_frequencies(self, text: str) -> np.ndarray:
        """(dim,) float32 log(1 + count) of the hashed n-grams of `text`.

        "ab" with ngrams=(1,) -> buckets of " ", "a", "b" (padded with a space each side) get log 2.
        """
        data = np.frombuffer((" " + _SPACES.sub(" ", text.lower()).strip() + " ").encode("utf-8"), dtype=np.uint8)
        counts = np.zeros(self.dim, dtype=np.float64)
        b = data.astype(np.uint64)
        for n in self.ngrams:
            if len(b) < n:
                continue
            h = np.zeros(len(b) - n + 1, dtype=np.uint64)
            for j in range(n):  # polynomial hash of each window, base 257 (wraps mod 2**64)
                h = h * np.uint64(257) + b[j : len(b) - n + 1 + j]
            h = (h + np.uint64(n)) * _MIX  # the length in the hash: "ab" as 2-gram != any 3-gram
            counts += np.bincount((h >> np.uint64(40)) % np.uint64(self.dim), minlength=self.dim)
        return np.log1p(counts).astype(np.float32)

    uses_idf = True  # scores apply the collection's IDF weights (tfidf_scores)

    def vector(self, text: str) -> np.ndarray:
        return self.term_frequencies(text)

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32 term-frequency rows."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            out[i] = self.term_frequencies(t)
        return out


class HiddenStateEmbedder:
    """Mean-pooled final hidden states (after the last norm, before the head) of an lmforge run:
    a text's tokens through the model, averaged over positions; plain cosine, no IDF. Texts
    longer than the context keep their first block_size tokens."""

    uses_idf = False
    name = "hidden-states"

    def __init__(self, run: str, device: str = "cpu"):
        from lmforge.infer import load_run  # torch and a model: only for this embedder

        self.run = str(run)
        self.model, self.tokenizer = load_run(run, device=device)
        self.model.eval()
        self.dim = self.model.config.n_embd
        self.device = device

    def config(self) -> dict:
        return {"name": self.name, "run": self.run, "dim": self.dim}

    def vector(self, text: str) -> np.ndarray:
        import torch

        ids = self.tokenizer.encode(text)[: self.model.config.block_size] or [self.tokenizer.eos_id or 0]
        captured = []
        handle = self.model.norm.register_forward_hook(lambda module, inp, out: captured.append(out))
        try:
            with torch.inference_mode():
                self.model(torch.tensor([ids], device=self.device))
        finally:
            handle.remove()
        return captured[0][0].float().mean(dim=0).cpu().numpy().astype(np.float32)  # (T, C) -> (C,)

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            out[i] = self.vector(t)
        return out


ST_INSTALL = "pip install sentence-transformers (or pip install 'lmforge[rag]')"


def load_sentence_transformer(path: str | Path, device: str = "cpu"):
    """`sentence_transformers.SentenceTransformer` of a local model directory, never a download.

    The directory must hold modules.json, the module list `SentenceTransformer.save` writes:
    without it sentence-transformers would guess a mean-pooled model from a bare transformers
    checkpoint, or read the path as a Hugging Face Hub name and try to download it."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such sentence-transformers model directory")
    if not (path / "modules.json").is_file():
        raise ValueError(f"{path}: not a sentence-transformers model directory (no modules.json; "
                         f"SentenceTransformer(...).save(dir) writes one)")
    try:
        from sentence_transformers import SentenceTransformer  # torch and transformers: only for this embedder
    except ImportError as e:
        raise ValueError(f"{path}: embedding with a sentence-transformers model needs the sentence-transformers "
                         f"package ({e}); install it with {ST_INSTALL}") from None
    try:
        return SentenceTransformer(str(path), device=device, local_files_only=True)
    except Exception as e:  # a broken directory fails in many ways (missing weights, bad JSON, unknown module)
        raise ValueError(f"{path}: cannot load as a sentence-transformers model ({type(e).__name__}: {e})") from None


class SentenceTransformerEmbedder:
    """A local sentence-transformers model: its normalised sentence embeddings, compared by plain
    cosine (no IDF). The directory's absolute path and name are stored in the index, so queries
    are embedded by the same model when the index is opened again."""

    uses_idf = False
    name = "sentence-transformers"

    def __init__(self, path: str | Path, device: str = "cpu", batch_size: int = 32):
        self.path = str(Path(path).resolve())
        self.model_name = Path(self.path).name
        self.model = load_sentence_transformer(self.path, device)
        self.batch_size = batch_size
        # read off an output, not asked of the model: the method's name changed between versions
        self.dim = int(self.model.encode(["dimension probe"], convert_to_numpy=True).shape[1])

    def config(self) -> dict:
        return {"name": self.name, "path": self.path, "model": self.model_name, "dim": self.dim}

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32 unit rows (normalize_embeddings=True): cosine is a dot product."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)

    def vector(self, text: str) -> np.ndarray:
        return self.embed([text])[0]


def embedder_from_config(config: dict):
    """The embedder an index was built with (its stored config)."""
    if config.get("name") == "ngram-tfidf":
        return NgramEmbedder(dim=int(config["dim"]), ngrams=tuple(int(n) for n in config["ngrams"]))
    if config.get("name") == "hidden-states":
        return HiddenStateEmbedder(config["run"])
    if config.get("name") == "sentence-transformers":
        emb = SentenceTransformerEmbedder(config["path"])
        if emb.dim != int(config["dim"]):  # another model saved over the directory since indexing
            raise ValueError(f"{config['path']}: the model now gives {emb.dim}-dim embeddings, the index holds "
                             f"{config['dim']}-dim ones; re-index into a new file")
        return emb
    raise ValueError(f"unknown embedder {config.get('name')!r} in the index "
                     f"(this lmforge knows: ngram-tfidf, hidden-states, sentence-transformers)")


def idf_weights(df: np.ndarray, n_chunks: int) -> np.ndarray:
    """Smoothed IDF per bucket: log((1 + N) / (1 + df)) + 1 (scikit-learn's smooth_idf)."""
    return (np.log((1.0 + n_chunks) / (1.0 + df)) + 1.0).astype(np.float32)


def tfidf_scores(query_tf: np.ndarray, matrix: np.ndarray, row_norms: np.ndarray, idf: np.ndarray) -> np.ndarray:
    """Cosine similarity of the query with every row under IDF weighting, in [0, 1].

    cos(q*idf, d*idf) = sum_j q_j d_j idf_j^2 / (|q*idf| |d*idf|); row_norms = |d*idf| per row.
    """
    return tfidf_scores_by_columns(query_tf, matrix.T, row_norms, idf)


def tfidf_scores_by_columns(query_tf: np.ndarray, columns: np.ndarray, row_norms: np.ndarray, idf: np.ndarray) -> np.ndarray:
    """`tfidf_scores` on the matrix stored by columns (dim, n_chunks), reading only the columns
    of the query's non-zero buckets: a 10-word question touches ~10% of a 1024-bucket matrix."""
    q = query_tf * idf
    qn = float(np.linalg.norm(q))
    if qn == 0.0:
        return np.zeros(columns.shape[1], dtype=np.float32)
    nz = np.flatnonzero(q)
    return (q[nz] * idf[nz]) @ columns[nz] / (row_norms * qn)  # (n_chunks,)


def row_norms(matrix: np.ndarray, idf: np.ndarray) -> np.ndarray:
    """|d * idf| for each row of matrix (n, dim), never 0 (an empty row scores 0, not NaN)."""
    return np.maximum(np.sqrt((matrix * matrix) @ (idf * idf)), 1e-12).astype(np.float32)
