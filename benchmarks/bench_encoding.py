"""Dense passage-encoding throughput: this project's encoding path vs sentence-transformers, measured in one run.

Both sides run the same tiny random Llama (one of the tiny presets, saved in Hugging Face format), the same
tokenizer, the same texts, the same max length and batch size, on the CPU with the same torch thread count:

- sentence-transformers: ``SentenceTransformer([Transformer(model dir), Pooling(dim, "mean")]).encode(texts)``
  (it sorts texts by character length, pads each batch to its longest text, runs the causal decoder and
  mean-pools);
- ours: ``retriever.encoding.encode_texts`` / ``encode_corpus`` on the same weights (bidirectional decoder,
  L2-normalised tokens mean-pooled, as the project's dense encoder defines it), plus the encoder's plain
  ``encode_passages`` loop for reference.

The two models do the same matrix products (decoder layers only, no LM head); their pooling differs by one
normalisation per token. Texts: the DL19 passage pool (real MS MARCO passages, ../shared/data) tokenized with the
real Llama-3 tokenizer, or, when that data is absent, the synthetic benchmark corpus with a BPE tokenizer trained on
it. Systems run interleaved in every round; the table shows the median over rounds, so that other load on the
machine affects every system alike.

Run from the repository root:  PYTHONPATH=. python benchmarks/bench_encoding.py [--backbones tiny-s tiny-m tiny-l]
(needs ``pip install sentence-transformers``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from retriever.config import BackboneConfig, EncoderConfig, LoraConfig
from retriever.encoding import encode_corpus, encode_texts, load_inference_encoder
from retriever.models.encoders import build_encoder, load_encoder

DEFAULT_DATA = Path(os.environ.get("RETRIEVER_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def load_texts(data_dir: Path, count: int, scratch: Path) -> tuple[list[str], str, str]:
    """(texts, description, tokenizer reference): the DL19 passage pool with Llama-3's tokenizer, or synthetic."""
    pool_dir = data_dir / "msmarco_trecdl" / "rank_llm_retrieve_results"
    llama3 = data_dir / "tokenizers" / "llama3" / "tokenizer.model"
    if pool_dir.is_dir() and llama3.is_file():
        from retriever.data.passage_pool import load_passage_pool

        texts = list(load_passage_pool(pool_dir).values())[:count]
        return texts, f"DL19 passage pool (first {len(texts)} passages), Llama-3 tokenizer", str(llama3)
    from retriever.data.synthetic import ensure_synthetic
    from retriever.models.tokenizers import train_bpe_tokenizer

    bench = ensure_synthetic(scratch / "synthetic", num_docs=max(count, 2000))
    texts = list(bench.docs().values())[:count]
    train_bpe_tokenizer(texts, vocab_size=4096, out_dir=scratch / "bpe")
    return (
        texts,
        f"synthetic corpus ({len(texts)} docs; {data_dir} not found), BPE-4096 tokenizer",
        str(scratch / "bpe"),
    )


def build_models(backbone: str, tokenizer: str, max_length: int, scratch: Path) -> tuple[Path, Path]:
    """The encoder directory (ours) and a plain HF model folder with the same weights and tokenizer (theirs)."""
    encoder = build_encoder(
        BackboneConfig(name=backbone, tokenizer=tokenizer, lora=LoraConfig(enabled=False), seed=0),
        EncoderConfig(paradigm="dense", pooling="mean", passage_max_length=max_length),
    )
    encoder_dir = encoder.save(scratch / f"encoder-{backbone}")
    hf_dir = scratch / f"hf-{backbone}"
    shutil.copytree(encoder_dir / "backbone", hf_dir)
    for item in (encoder_dir / "tokenizer").iterdir():
        shutil.copy(item, hf_dir / item.name)
    return encoder_dir, hf_dir


def sentence_transformer(hf_dir: Path, max_length: int):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    transformer = Transformer(str(hf_dir), max_seq_length=max_length)
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    return SentenceTransformer(modules=[transformer, pooling], device="cpu")


def measure(systems: dict[str, tuple[str, Callable[[], object]]], rounds: int, count: int) -> dict[str, list[float]]:
    """Texts per second of every system in every round; systems interleaved within a round."""
    rates: dict[str, list[float]] = {key: [] for key in systems}
    for round_index in range(rounds):
        for key, (_, run) in systems.items():
            start = time.perf_counter()
            run()
            rates[key].append(count / (time.perf_counter() - start))
        line = ", ".join(f"{key} {values[-1]:.0f}" for key, values in rates.items())
        print(f"  round {round_index + 1}/{rounds}: {line}", file=sys.stderr, flush=True)
    return rates


def bench_backbone(
    backbone: str, texts: list[str], tokenizer: str, args: argparse.Namespace, scratch: Path
) -> list[tuple[str, float, float]]:
    batch, length = args.batch_size, args.max_length
    encoder_dir, hf_dir = build_models(backbone, tokenizer, length, scratch)
    st = sentence_transformer(hf_dir, length)
    ours = load_inference_encoder(encoder_dir, device="cpu")
    plain = load_encoder(encoder_dir)
    docs = [(str(i), text) for i, text in enumerate(texts)]
    out_dir = scratch / f"out-{backbone}"
    systems: dict[str, tuple[str, Callable[[], object]]] = {
        "st": ("sentence-transformers encode", lambda: st.encode(texts, batch_size=batch)),
        "ours": (
            f"ours: encode_texts (batch_size={batch})",
            lambda: encode_texts(ours, texts, "passage", batch_size=batch, max_length=length),
        ),
        "budget": (
            f"ours: encode_texts (token budget {batch}x{length})",
            lambda: encode_texts(
                ours, texts, "passage", batch_size=4 * batch, max_batch_tokens=batch * length, max_length=length
            ),
        ),
        "corpus": (
            "ours: encode_corpus (load + parquet)",
            lambda: encode_corpus(
                encoder_dir, docs, out_dir, batch_size=batch, max_length=length, progress=False, overwrite=True
            ),
        ),
        "plain": (
            "ours: encoder.encode_passages (plain loop)",
            lambda: plain.encode_passages(texts, batch_size=batch, max_length=length),
        ),
    }
    # Correctness of the fast path against the encoder's own loop, and warm-up of every system.
    fast = encode_texts(ours, texts[:256], "passage", batch_size=batch, max_length=length)
    reference = plain.encode_passages(texts[:256], batch_size=batch, max_length=length).numpy()
    error = float(np.abs(fast - reference).max())
    assert error < 1e-4, f"fast path differs from encode_passages by {error}"
    st.encode(texts[:64], batch_size=batch)
    encode_texts(ours, texts[:64], "passage", batch_size=batch, max_length=length)
    plain.encode_passages(texts[:64], batch_size=batch, max_length=length)
    params = sum(p.numel() for p in ours.parameters())
    print(
        f"\n{backbone}: {params / 1e6:.1f}M parameters (hidden {ours.lm.config.hidden_size}, "
        f"{ours.lm.config.num_hidden_layers} layers); max |ours - encode_passages| = {error:.1e}",
        file=sys.stderr,
    )
    rates = measure(systems, args.rounds, len(texts))
    baseline = rates["st"]
    rows = []
    for key, values in rates.items():
        speedups = [value / base for value, base in zip(values, baseline)]
        rows.append((systems[key][0], statistics.median(values), statistics.median(speedups)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--backbones", nargs="+", default=["tiny-s", "tiny-m", "tiny-l"])
    parser.add_argument("--texts", type=int, default=2000, help="number of passages")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for every system (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import sentence_transformers
    import transformers

    with tempfile.TemporaryDirectory(prefix="bench-encoding-") as tmp:
        scratch = Path(tmp)
        texts, description, tokenizer = load_texts(args.data_dir, args.texts, scratch)
        print(
            f"texts: {description}\nmax_length {args.max_length}, batch_size {args.batch_size}, "
            f"{args.rounds} rounds (median shown), torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"transformers {transformers.__version__}, sentence-transformers {sentence_transformers.__version__}, "
            f"load average at start {os.getloadavg()[0]:.2f}"
        )
        results = {backbone: bench_backbone(backbone, texts, tokenizer, args, scratch) for backbone in args.backbones}
    width = max(len(name) for rows in results.values() for name, _, _ in rows)
    print(f"\n| backbone | {'system'.ljust(width)} | passages/s | vs sentence-transformers |")
    print(f"|---|{'-' * (width + 2)}|---:|---:|")
    for backbone, rows in results.items():
        for name, rate, speedup in rows:
            print(f"| {backbone} | {name.ljust(width)} | {rate:10.0f} | {speedup:.2f}x |")
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
