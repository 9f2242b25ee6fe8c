"""The project's own CLIP-style BPE tokenizer, trained on the synthetic captions (no hub files)."""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer

from instaflow_edge.synthetic.captions import vocabulary_corpus

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
ALPHABET = string.ascii_lowercase + string.digits + string.punctuation


def build_tokenizer(out_dir: Path, vocab_size: int, max_length: int) -> CLIPTokenizer:
    """Train a BPE in CLIP's format (vocab.json, merges.txt, "</w>" word ends) and save it.

    Every lowercase letter, digit and punctuation mark has a token (alone and word-final), so any
    ASCII prompt tokenizes without unknown tokens; caption words become single tokens.
    """
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=EOS))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        end_of_word_suffix="</w>",
        initial_alphabet=list(ALPHABET),
        show_progress=False,
    )
    bpe.train_from_iterator(vocabulary_corpus(), trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"]
    # The trainer's merges are deterministic but its ids for equally frequent tokens are not:
    # number the vocabulary ourselves, so the same corpus always gives the same files.
    tokens = [BOS, EOS, *ALPHABET, *(char + "</w>" for char in ALPHABET)]
    tokens += ["".join(pair) for pair in merges]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    if len(vocab) > vocab_size:
        raise ValueError(f"tokenizer has {len(vocab)} tokens, more than {vocab_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merge_lines = "".join(f"{left} {right}\n" for left, right in merges)
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + merge_lines)
    tokenizer = CLIPTokenizer.from_pretrained(out_dir, model_max_length=max_length)
    tokenizer.save_pretrained(out_dir)  # adds tokenizer.json, for runtimes with `tokenizers` only
    return tokenizer
