"""Train a SentencePiece (or Hugging Face byte-level BPE) tokenizer from JSONL/text corpora, streaming,
with reservoir sampling.

Documents are cut at line boundaries into "sentences" of at most `max_sentence_bytes` (SentencePiece
silently drops longer sentences). Because '\\n' is a user-defined symbol in the code preset, no piece
can span a newline anyway, so cutting there loses nothing. A uniform sample of at most
`max_sentences` sentences is kept (reservoir sampling, Algorithm R), so memory is bounded by
max_sentences * max_sentence_bytes however large the corpus.

Special ids: unk 0, bos 1, eos 2 (= EOD for the datasets), pad 3, then user-defined symbols.
"""
from __future__ import annotations

import io
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence

from megatron_mhmoe import atomic

from .errors import DataError
from .input_reader import InputConfig, InputStats, iter_documents

Log = Callable[[str], None]

# Settings under which decode(encode(code)) == code exactly.
PRESETS: dict[str, dict] = {
    "code": dict(byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
                 allow_whitespace_only_pieces=True, user_defined_symbols=["\n", "\t"], character_coverage=1.0,
                 split_digits=False),
    # Prose: NFKC normalisation and whitespace folding (no exact round trip, by design).
    "text": dict(byte_fallback=True, normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True,
                 allow_whitespace_only_pieces=False, user_defined_symbols=[], character_coverage=0.9995,
                 split_digits=True),
}
SPECIAL_IDS = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=3)


@dataclass
class TokenizerTrainConfig:
    """Options of tools/train_tokenizer.py."""

    inputs: Sequence[str]
    """Corpus files, directories or globs (JSONL or text, optionally .gz)."""
    model_prefix: str
    """Writes <model_prefix>.model and <model_prefix>.vocab."""
    vocab_size: int = 8000
    model_type: str = "bpe"
    """'bpe' or 'unigram'."""
    preset: str = "code"
    """'code' (exact round trip of source code, the default) or 'text'."""
    byte_fallback: Optional[bool] = None
    """Override the preset's byte_fallback."""
    user_defined_symbols: Sequence[str] = ()
    """Extra pieces always kept whole (e.g. '<|fim_prefix|>'), added after the preset's."""
    control_symbols: Sequence[str] = ()
    """Extra reserved ids that never come out of encode (e.g. '<|sep|>')."""
    max_sentences: int = 300_000
    """Reservoir size: sentences kept for training."""
    max_sentence_bytes: int = 4096
    """Documents are cut at newlines into sentences at most this long."""
    seed: int = 1234
    num_threads: int = max(1, os.cpu_count() or 1)
    verify_docs: int = 200
    """Check decode(encode(doc)) == doc on this many sampled documents (code preset)."""
    log_interval: int = 10_000
    input: InputConfig = field(default_factory=InputConfig)
    extra: dict = field(default_factory=dict)
    """Any other SentencePieceTrainer option, passed through."""


@dataclass
class TokenizerTrainResult:
    model_path: str
    vocab_size: int
    sentences_seen: int
    sentences_used: int
    roundtrip_checked: int
    roundtrip_failed: int
    stats: InputStats


def split_sentences(doc: str, max_bytes: int) -> Iterator[str]:
    """Cut a document at line ends into pieces of <= max_bytes UTF-8 bytes (newlines kept)."""
    cur: list[str] = []
    cur_bytes = 0
    for line in doc.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if n > max_bytes:  # a single overlong line: hard cut (by chars, 4 bytes per char worst case)
            if cur:
                yield "".join(cur)
                cur, cur_bytes = [], 0
            step = max(1, max_bytes // 4)
            for i in range(0, len(line), step):
                yield line[i:i + step]
            continue
        if cur_bytes + n > max_bytes and cur:
            yield "".join(cur)
            cur, cur_bytes = [], 0
        cur.append(line)
        cur_bytes += n
    if cur:
        yield "".join(cur)


def reservoir_sample(items: Iterable[str], k: int, rng: random.Random) -> tuple[list[str], int]:
    """Uniform sample of k items from a stream (Algorithm R); returns (sample, items seen)."""
    sample: list[str] = []
    seen = 0
    for item in items:
        seen += 1
        if len(sample) < k:
            sample.append(item)
        else:
            j = rng.randrange(seen)
            if j < k:
                sample[j] = item
    return sample, seen


def _sample(cfg: TokenizerTrainConfig, log: Log) -> tuple[list[str], int, list[str], InputStats, float]:
    """(sentences sampled, sentences seen, documents kept for the round-trip check, stats, start time)."""
    stats = InputStats()
    rng = random.Random(cfg.seed)
    start = time.perf_counter()
    verify_pool: list[str] = []

    def sentences() -> Iterator[str]:
        for docs in iter_documents(cfg.inputs, cfg.input, stats):
            for doc in docs:
                if len(verify_pool) < cfg.verify_docs and len(doc.encode("utf-8")) <= 1 << 20:
                    verify_pool.append(doc)
                yield from split_sentences(doc, cfg.max_sentence_bytes)
            if stats.documents % cfg.log_interval == 0:
                dt = time.perf_counter() - start
                log(f"read {stats.documents} documents, {stats.bytes / 1e6:.1f} MB ({stats.bytes / 1e6 / dt:.1f} MB/s)")

    sample, seen = reservoir_sample(sentences(), cfg.max_sentences, rng)
    for w in stats.warnings():
        log(f"WARNING: {w}")
    if not sample:
        raise DataError(f"no text to train a tokenizer on in {list(cfg.inputs)} ({stats.lines} records read); "
                        "check the files and --json-keys.")
    return sample, seen, verify_pool, stats, start


def train_tokenizer(cfg: TokenizerTrainConfig, log: Log = lambda m: print(m, file=sys.stderr, flush=True)
                    ) -> TokenizerTrainResult:
    """Sample the corpus, train SentencePiece, write the model, and check the round trip."""
    import sentencepiece as spm

    if cfg.preset not in PRESETS:
        raise DataError(f"unknown preset {cfg.preset!r}; choose one of {sorted(PRESETS)}")
    if cfg.model_type not in ("bpe", "unigram"):
        raise DataError(f"--model-type must be bpe or unigram, not {cfg.model_type!r}")
    if cfg.max_sentences < 1:
        raise DataError(f"--max-sentences must be >= 1, got {cfg.max_sentences}")
    sample, seen, verify_pool, stats, start = _sample(cfg, log)
    log(f"sampled {len(sample)} of {seen} sentences from {stats.documents} documents "
        f"({stats.bytes / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s; training {cfg.model_type} "
        f"vocab {cfg.vocab_size}")
    options = dict(PRESETS[cfg.preset])
    if cfg.byte_fallback is not None:
        options["byte_fallback"] = cfg.byte_fallback
    options["user_defined_symbols"] = list(options["user_defined_symbols"]) + [
        s for s in cfg.user_defined_symbols if s not in options["user_defined_symbols"]]
    if cfg.control_symbols:
        options["control_symbols"] = list(cfg.control_symbols)
    options.update(SPECIAL_IDS)
    options.update(cfg.extra)
    model = io.BytesIO()
    t0 = time.perf_counter()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample), model_writer=model, vocab_size=cfg.vocab_size,
            model_type=cfg.model_type, max_sentence_length=cfg.max_sentence_bytes + 16,
            input_sentence_size=0, shuffle_input_sentence=False,  # we sampled already
            num_threads=cfg.num_threads, minloglevel=2, **options)
    except RuntimeError as e:
        raise DataError(f"SentencePiece training failed: {e}. For a small corpus lower --vocab-size; with byte "
                        "fallback it must also exceed 256 + the special and user-defined symbols.") from None
    log(f"trained in {time.perf_counter() - t0:.1f} s")
    folder = os.path.dirname(cfg.model_prefix)
    if folder:
        os.makedirs(folder, exist_ok=True)
    model_path = cfg.model_prefix + ".model"
    atomic.write_bytes(model_path, model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with open(cfg.model_prefix + ".vocab", "w", encoding="utf-8") as f:
        for i in range(sp.GetPieceSize()):
            piece = sp.IdToPiece(i).replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
            f.write(f"{piece}\t{sp.GetScore(i)}\n")  # escaped: the code preset has '\n' and '\t' pieces
    failed = 0
    if cfg.preset == "code":
        failed = sum(sp.DecodeIds(sp.EncodeAsIds(d)) != d for d in verify_pool)
        msg = f"round trip decode(encode(doc)) == doc on {len(verify_pool) - failed}/{len(verify_pool)} documents"
        log(msg if not failed else f"WARNING: {msg}")
    log(f"wrote {model_path} (vocab {sp.GetPieceSize()}, eod/eos id {sp.eos_id()}, pad id {sp.pad_id()})")
    return TokenizerTrainResult(model_path, sp.GetPieceSize(), seen, len(sample), len(verify_pool), failed, stats)


HF_EOD = "<|endoftext|>"


def train_hf_tokenizer(cfg: TokenizerTrainConfig, log: Log = lambda m: print(m, file=sys.stderr, flush=True)
                       ) -> TokenizerTrainResult:
    """Train a byte-level BPE Hugging Face tokenizer (the `tokenizers` library) on the same sample.

    Writes `<model_prefix>/tokenizer.json` and a tokenizer_config.json naming its eos token (the
    datasets' EOD, id 0, then the user-defined symbols as special tokens, then the 256 byte symbols and
    the merges). Byte-level pre-tokenization covers every UTF-8 byte, so there is no unknown token and,
    with the code preset (no normalizer), decode(encode(text)) == text for any text.
    """
    try:
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    except ImportError:
        raise DataError("--type hf-bpe needs the 'tokenizers' package: pip install -r requirements.txt") from None

    if cfg.preset not in PRESETS:
        raise DataError(f"unknown preset {cfg.preset!r}; choose one of {sorted(PRESETS)}")
    if cfg.model_type != "bpe":
        raise DataError(f"--type hf-bpe trains BPE only, not --model-type {cfg.model_type}")
    if cfg.control_symbols:
        raise DataError("--control-symbols is SentencePiece-only (a tokenizer.json matches every special token in "
                        "text); use --user-defined-symbols, or --type sentencepiece")
    if cfg.byte_fallback is False:
        raise DataError("--no-byte-fallback does not apply to --type hf-bpe: a byte-level BPE always covers bytes")
    if cfg.max_sentences < 1:
        raise DataError(f"--max-sentences must be >= 1, got {cfg.max_sentences}")
    specials = [HF_EOD] + [s for s in cfg.user_defined_symbols if s != HF_EOD]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if cfg.vocab_size <= len(alphabet) + len(specials):
        raise DataError(f"--vocab-size {cfg.vocab_size} leaves no room for merges: a byte-level BPE needs more than "
                        f"{len(alphabet)} byte symbols + {len(specials)} special token(s)")
    sample, seen, verify_pool, stats, start = _sample(cfg, log)
    log(f"sampled {len(sample)} of {seen} sentences from {stats.documents} documents "
        f"({stats.bytes / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s; training byte-level BPE "
        f"vocab {cfg.vocab_size}")
    tk = Tokenizer(models.BPE())
    if cfg.preset == "text":
        tk.normalizer = normalizers.NFKC()
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  min_frequency=2, show_progress=False)
    t0 = time.perf_counter()
    tk.train_from_iterator(sample, trainer=trainer, length=len(sample))
    log(f"trained in {time.perf_counter() - t0:.1f} s")
    vocab = tk.get_vocab_size(with_added_tokens=True)
    if vocab < cfg.vocab_size:
        log(f"WARNING: the corpus supports only {vocab} tokens (asked for {cfg.vocab_size}): it has too few "
            "repeated byte pairs for more merges")
    folder = cfg.model_prefix
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tokenizer.json")
    with atomic.atomic_path(path) as tmp:
        tk.save(tmp)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": HF_EOD, "bos_token": HF_EOD,
              "unk_token": None, "clean_up_tokenization_spaces": False,
              "additional_special_tokens": specials[1:]}
    atomic.write_json(os.path.join(folder, "tokenizer_config.json"), config)
    failed = 0
    if cfg.preset == "code":
        failed = sum(tk.decode(tk.encode(d, add_special_tokens=False).ids, skip_special_tokens=False) != d
                     for d in verify_pool)
        msg = f"round trip decode(encode(doc)) == doc on {len(verify_pool) - failed}/{len(verify_pool)} documents"
        log(msg if not failed else f"WARNING: {msg}")
    log(f"wrote {path} (vocab {vocab}, eod/eos {HF_EOD} id {tk.token_to_id(HF_EOD)})")
    return TokenizerTrainResult(path, vocab, seen, len(sample), len(verify_pool), failed, stats)
