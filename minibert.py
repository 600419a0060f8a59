"""minibert: BERT pretraining from scratch, in one file of plain PyTorch.

The recipe of Devlin et al. (2018): WordPiece, [CLS] A [SEP] B [SEP] sentence pairs, token + position + segment
embeddings, a post-LayerNorm Transformer encoder, two heads trained jointly, their losses summed: masked-language
modelling (MLM) and next-sentence prediction (NSP). Weight for weight, transformers' BertForPreTraining (`export`).

    python minibert.py train --device cuda            # WikiText-2 from the Hugging Face hub
    python minibert.py train --data wiki.txt          # offline: any text file
    python minibert.py demo "the [MASK] sat on the mat ."
    torchrun --nproc_per_node 4 minibert.py train     # several GPUs: DistributedDataParallel

Left out on purpose: a Trainer with callbacks, output objects, head pruning, cross-attention, key/value caches,
whole-word masking, heads beyond a classifier (use `export`). The paper's two lengths, 128 then 512: --short_share.

References: Devlin et al. 2018, "BERT" (arXiv:1810.04805); Turc et al. 2019 (the size presets); google-research/bert."""

import argparse
import bisect
import bz2
import csv
import ctypes
import dataclasses
import gzip
import hashlib
import inspect
import io
import json
import lzma
import math
import os
import random
import re
import signal
import sys
import time
import timeit
from array import array
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# ----------------------------------------------------------------------------- config

@dataclass
class Config:  # each field's comment is also its flag's --help (add_config_flags)
    # model: --preset sets layers, hidden, heads, ffn and lr (the defaults are "mini")
    layers: int = 4  # Transformer encoder layers
    hidden: int = 256  # hidden size H, in features
    heads: int = 4  # attention heads nh; head size hs = H / nh (64 in every preset)
    ffn: int = 1024  # feed-forward inner size, in features (4 H)
    vocab_size: int = 16384  # WordPiece vocabulary V, in tokens (a small corpus may give fewer)
    max_position: int = 512  # learned position embeddings, in tokens
    dropout: float = 0.1  # on the embeddings, the attention probabilities and each residual branch
    init_std: float = 0.02  # std of the initial weights (BERT's initializer_range; tiny on a CPU: 0.06, README)
    dataset: str = "Salesforce/wikitext"  # Hugging Face hub dataset with a text column, if no --data
    dataset_config: str = "wikitext-2-raw-v1"  # its configuration; wikitext-103-raw-v1 has 50x the text
    max_len: int = 128  # tokens per training sequence, [CLS] and both [SEP] included
    short_seq_prob: float = 0.1  # share of pairs built to a random shorter length, as in the paper's code
    short_share: float = 0.0  # share of the run (steps or --budget) on half as long sequences, twice as many a batch
    mask_prob: float = 0.15  # share of the real tokens of each sequence chosen for MLM
    val_share: float = 0.1  # share of the documents held out for evaluation, if there is no validation split
    batch_size: int = 32  # sequences per optimizer step, over all GPUs and micro-batches
    grad_accum: int = 1  # micro-batches per optimizer step on each GPU: the same update, less memory
    epochs: int = 40  # passes over the training pairs
    max_steps: int = 0  # if > 0: the run's length in optimizer steps, instead of epochs
    budget: float = 0  # if > 0: the run's length in minutes of training, instead of steps (not bit-exact on --resume)
    lr: float = 5e-4  # peak learning rate of AdamW; each preset has its own, an explicit --lr wins
    warmup: float = 0.1  # share of the steps spent warming the learning rate up linearly from 0
    beta2: float = 0.999  # AdamW's decay of its squared-gradient average (RoBERTa: 0.98)
    weight_decay: float = 0.01  # AdamW decay on weight matrices and embeddings (not on biases and LayerNorm)
    grad_clip: float = 1.0  # maximum global gradient norm (0: no clipping)
    seed: int = 1337  # for pairs, data order, masks, dropout and initialisation
    log_every: int = 50  # optimizer steps between log lines
    save_every: int = 1000  # optimizer steps between evaluations and checkpoints (also at each epoch's end and the end)
    device: str = "auto"  # auto, cuda or cpu
    compile: bool = False  # torch.compile the step: forward, both losses and backward as one graph
    out: str = "out"  # checkpoint folder

# Turc et al. 2019's sizes, name: (layers, hidden, peak lr, fine-tuning lr); heads = hidden / 64, ffn = 4 hidden. Peak
# lr: the best on held-out MLM; fine-tuning: tiny's 1e-3 beat 3e-4, 3e-3 on SST-2 (0.82, 0.79, 0.70); others: Google's.
PRESETS = {"tiny": (2, 128, 2e-3, 1e-3), "mini": (4, 256, 5e-4, 3e-4), "small": (4, 512, 2e-4, 1e-4),
           "medium": (8, 512, 1.5e-4, 1e-4), "base": (12, 768, 1e-4, 5e-5)}

def apply_preset(cfg, name):
    layers, hidden, lr, _ = PRESETS[name]
    return dataclasses.replace(cfg, layers=layers, hidden=hidden, heads=hidden // 64, ffn=4 * hidden, lr=lr)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # the tokenizer gives them the ids 0..4, in this order
PAD, UNK, CLS, SEP, MASK = range(len(SPECIALS))

# ----------------------------------------------------------------------------- tokenizer

def wordpiece(vocab=None, lowercase=True):
    """BERT's WordPiece tokenizer (uncased unless lowercase=False); vocab: {token: id}, or None for one to train."""
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)  # lower-case and strip accents
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # split on spaces and punctuation
    tok.decoder = decoders.WordPiece(prefix="##")  # "play ##ing" -> "playing"
    tok.post_processor = processors.TemplateProcessing(  # encode(a) or encode(a, b); segment ids 0 for a, 1 for b
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(t, (vocab or {}).get(t, i)) for t, i in (("[CLS]", CLS), ("[SEP]", SEP))])  # (export: BERT's)
    return tok

def train_tokenizer(sentences, vocab_size, max_sentences=200_000):
    """WordPiece from <= 200k sampled sentences: WikiText-2 x 10 (21M words) in 6.5 s, not 24 s, 96 % the same."""
    sentences = random.Random(0).sample(s := list(sentences), min(len(s), max_sentences))  # (all of them, shuffled)
    tok, bar = wordpiece(), sys.stderr.isatty()  # the trainer's progress bar: on a terminal only (else: blank lines)
    tok.train_from_iterator(sentences, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                                 show_progress=bar))
    return tok

# ----------------------------------------------------------------------------- corpus and pairs
# Text is documents (a list of lists of sentences: parse_wikitext, read_corpus, after the demo); tokenized, a Corpus.
# WikiText-2's train split (600 articles, 2.1M words): ~2.6M tokens, ~21k pairs of <= 128 tokens per epoch.

class Corpus(NamedTuple):  # three flat arrays: 21M words take ~100 MB, not ~3 GB
    ids: torch.Tensor  # (N,) int32: the token ids of every sentence, back to back
    sents: torch.Tensor  # (S + 1,) int64: sentence s is ids[sents[s] : sents[s + 1]]
    docs: torch.Tensor  # (D + 1,) int64: document d is sentences docs[d] .. docs[d + 1] - 1

ODD_SPACE = re.compile("[\x0b\x0c\x1c-\x1f\x85\u2028\u2029]")  # split() breaks words at these, BERT doesn't

def encode_corpus(tok, docs):
    """Documents -> Corpus, empty sentences dropped (a document left empty keeps its index)."""
    texts = [s for d in docs for s in d]
    words = list({w for s in texts for w in s.split()})  # BERT's tokenizer splits at spaces first: each word once
    enc = tok.encode_batch_fast(words, add_special_tokens=False)  # WikiText-2 x 10 (21M words), 2 cores: 9 s, not 37 s
    cache = {w: array("i", e.ids).tobytes() for w, e in zip(words, enc)}  # word -> its ids as int32 bytes
    parts = [array("i", tok.encode(s, add_special_tokens=False).ids).tobytes() if ODD_SPACE.search(s) else
             b"".join(map(cache.__getitem__, s.split())) for s in texts]  # each sentence's ids as int32 bytes
    lens = torch.tensor([len(b) // 4 for b in parts], dtype=torch.int64)  # (sentences,) in tokens (4 bytes each)
    sents = F.pad(lens[lens > 0].cumsum(0), (1, 0))  # (S + 1,) offsets of the non-empty sentences
    firsts = F.pad(torch.tensor([len(d) for d in docs], dtype=torch.int64).cumsum(0), (1, 0))  # (D + 1,) in texts
    doc_starts = F.pad((lens > 0).cumsum(0), (1, 0))[firsts]  # (D + 1,) each document's first non-empty sentence
    return Corpus(torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.int32), sents, doc_starts)

def make_pairs(corpus, doc_ids, max_len, seed, short_seq_prob=0.1):
    """(A, B, label) pairs from the documents doc_ids of a corpus, as google-research/bert makes them: sentences fill a
    chunk of the sequence's length, A is a random-length prefix of it, B either the rest (label 0, IsNext) or a run from
    another document (label 1, NotNext). -> (N, 5) int64: A's start, A's length, B's start, B's length (offsets into
    corpus.ids), label. Unlike the paper's code, a chunk holds two sentences or more, and labels come from a shuffled
    deck (balanced to one pair). Example: s0..s3 fill the target, the cut falls after s1: A = s0 s1; IsNext: B = s2 s3,
    the next chunk starts at s4; NotNext: B from another document, the next chunk starts at s2. What truncation cuts off
    a pair's end starts the next chunk (the paper's code drops it: an epoch's pairs use 88 % of WikiText-2; here 92)."""
    S, D = cut_long(corpus, (max_len - 2) // 2)  # pieces, two of which fill a sequence
    docs = [d for d in doc_ids if D[d + 1] > D[d]]
    if len(docs) < 2:  # NotNext needs another document
        return torch.zeros(0, 5, dtype=torch.int64)
    rng, pairs, deck = random.Random(seed), [], []
    max_tokens = max_len - 3  # room for [CLS], [SEP], [SEP]
    for j, d in enumerate(docs):
        start, end = D[d], D[d + 1]  # the next chunk starts at sentence start; the document ends before end
        a0 = S[start]  # at this token: sentence start's first, or where the chunk before cut it
        while start < end - 1:  # two sentences or more are left (a last lone one is only used as a NotNext B)
            target = rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens
            i = start + 1  # the chunk is sentences start..i: it grows until it holds target tokens or the document ends
            while i < end - 1 and S[i + 1] - a0 < target:
                i += 1
            cut = rng.randint(start + 1, i)  # A is sentences start..cut-1
            deck = deck or rng.sample([0, 1], 2)  # labels are dealt from a shuffled deck of two
            label, a1 = deck.pop(), S[cut]
            if label == 0:  # IsNext: B is the rest of the chunk
                b0, b1 = a1, S[i + 1]
            else:  # NotNext: B comes from another document, and the chunk's unused sentences go back to the pool
                b0, b1 = random_segment(S, D, docs, j, max(1, target - (a1 - a0)), rng)
            a0, a1, b0, b1 = truncate_pair(a0, a1, b0, b1, max_tokens, rng)
            pairs.append((a0, a1 - a0, b0, b1 - b0, label))
            a0 = b1 if label == 0 else a1  # the next chunk starts after the pair (with what truncation cut off)
            start = bisect.bisect_right(S, a0, start, i + 2) - 1  # in the sentence that holds that token
    return torch.tensor(pairs, dtype=torch.int64).view(-1, 5)

def cut_long(corpus, n):
    """Corpus' offsets, sentences over n tokens cut in pieces of n (unpunctuated text pairs too). -> S, D (int lists)"""
    lens = corpus.sents.diff()  # (S,) each sentence's tokens
    k = (lens + n - 1) // n  # (S,) its pieces
    first = F.pad(k.cumsum(0), (1, 0))  # (S + 1,) its first piece
    s = torch.repeat_interleave(torch.arange(len(lens)), k)  # (P,) each piece's sentence
    starts = corpus.sents[s] + (torch.arange(len(s)) - first[s]) * n  # (P,)
    return torch.cat([starts, corpus.sents[-1:]]).tolist(), first[corpus.docs].tolist()

def random_segment(S, D, docs, j, target, rng):
    """Consecutive sentences of a random document other than docs[j], at least target tokens if it can."""
    other = rng.randrange(len(docs) - 1)
    d = docs[other + (other >= j)]  # skip docs[j] itself
    s = rng.randrange(D[d], D[d + 1])  # the first sentence
    return S[s], S[bisect.bisect_left(S, S[s] + target, s + 1, D[d + 1])]  # to the sentence that reaches target

def truncate_pair(a0, a1, b0, b1, max_tokens, rng):
    """Trim the longer of A and B one token at a time, at a random end, until they fit."""
    while a1 - a0 + b1 - b0 > max_tokens:
        if a1 - a0 > b1 - b0:
            a0, a1 = (a0 + 1, a1) if rng.random() < 0.5 else (a0, a1 - 1)
        else:
            b0, b1 = (b0 + 1, b1) if rng.random() < 0.5 else (b0, b1 - 1)
    return a0, a1, b0, b1

def epoch_pairs(corpus, docs, cfg, epoch, n, pairs0):
    """New pairs each epoch (fixed ones let NSP memorise), from (seed, epoch) for resumes. -> (n, 5), repeated or cut"""
    if epoch or pairs0 is None:  # pairs0: epoch 0's, if made
        pairs0 = make_pairs(corpus, docs, cfg.max_len, cfg.seed + epoch, cfg.short_seq_prob)
    order = torch.randperm(len(pairs0), generator=torch.Generator().manual_seed(cfg.seed + 1000 + epoch))
    return pairs0[order.repeat(1 + n // len(pairs0))[:n]]  # (n, 5)

def collate(tokens, pairs, T):
    """Pairs (B, 5) -> token ids and segment ids (B, T): [CLS] A [SEP] B [SEP] [PAD]..., from tokens (corpus.ids)."""
    a0, la, b0, lb, nsp = (c[:, None] for c in pairs.unbind(1))  # (B, 1) each
    t = torch.arange(T, device=pairs.device)  # (T,) position: 0 [CLS] | 1..la A | la+1 [SEP] | la+2..la+lb+1 B | [SEP]
    in_a, in_b = (t >= 1) & (t <= la), (t >= la + 2) & (t < la + lb + 2)  # (B, T)
    src = torch.where(in_a, a0 + t - 1, b0 + t - la - 2).clamp(0, len(tokens) - 1)  # (B, T) its place in the corpus
    x = torch.where(in_a | in_b, tokens[src].long(), PAD)  # (B, T), gathered on the device: a GPU makes its batches
    x = torch.where((t == la + 1) | (t == la + lb + 2), SEP, torch.where(t == 0, CLS, x))
    seg = ((t >= la + 2) & (t <= la + lb + 2)).long()  # (B, T) 0 for [CLS] A [SEP], 1 for B [SEP]
    return x, seg, nsp[:, 0]  # nsp (B,): 0 = IsNext, 1 = NotNext

# ----------------------------------------------------------------------------- masking

def mask_tokens(ids, vocab_size, gen, mask_prob=0.15):
    """BERT's MLM corruption, new each call: round(15 %) of each row's real tokens (>= 1; never [CLS], [SEP], [PAD]) are
    chosen; 80 % become [MASK], 10 % a random token, 10 % stay: the model can't tell which changed, so it must represent
    every token, and fine-tuning has no [MASK]. -> inputs (B, T); positions, labels (B, P): -100 in unused slots."""
    B, T = ids.shape  # batch, sequence length
    P = math.ceil((T - 3) * mask_prob)  # prediction slots: 19 at T = 128, what 125 real tokens need (paper's code: 20)
    real = (ids != PAD) & (ids != CLS) & (ids != SEP)  # (B, T)
    k = (real.sum(1) * mask_prob).round().clamp(min=1)  # (B,) tokens to choose per row
    score = torch.rand(B, T, generator=gen, device=ids.device).masked_fill(~real, 2.0)  # specials sort last
    pos = score.topk(P, dim=1, largest=False).indices  # (B, P) the P lowest scores, lowest first
    used = torch.arange(P, device=ids.device) < k[:, None]  # (B, P) so the first k slots are the chosen
    orig = ids.gather(1, pos)  # (B, P)
    r = torch.rand(B, P, generator=gen, device=ids.device)
    random_ids = torch.randint(len(SPECIALS), vocab_size, (B, P), generator=gen, device=ids.device)  # never special
    new = torch.where(r < 0.8, MASK, torch.where(r < 0.9, random_ids, orig))
    return ids.scatter(1, pos, torch.where(used, new, orig)), pos, orig.masked_fill(~used, -100)

# ----------------------------------------------------------------------------- model

def dropout(x, p, training):
    """F.dropout; on the CPU one 64-bit draw makes four 15-bit ones, not one each (P(keep) within 2^-15): 1.6x faster"""
    if not training or p == 0 or x.device.type != "cpu":  # a GPU uses torch's own
        return F.dropout(x, p, training)
    bits = torch.randint(0, 2**63 - 1, ((x.numel() + 3) // 4,), dtype=torch.int64).view(torch.int16)[: x.numel()]
    return torch.where((bits & 0x7FFF).view(x.shape) >= round(p * 32768), x / (1 - p), 0.0)

def attention(q, k, v, mask, p):
    """softmax(q k^T / sqrt(hs)) v over the keys mask allows; on the CPU with dropout p, written out to use dropout"""
    if p == 0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, nh, Tq, hs)
    att = (q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))).masked_fill(~mask, float("-inf"))  # (B, nh, Tq, T)
    return dropout(att.softmax(-1), p, True) @ v  # (B, nh, Tq, hs)

class Layer(nn.Module):
    """One encoder layer: self-attention, then a feed-forward network, each added to its input, then normalised."""
    def __init__(self, cfg):
        super().__init__()
        self.nh, self.p = cfg.heads, cfg.dropout
        self.qkv, self.proj = nn.Linear(cfg.hidden, 3 * cfg.hidden), nn.Linear(cfg.hidden, cfg.hidden)  # fused q, k, v
        self.ln1 = nn.LayerNorm(cfg.hidden, eps=1e-12)  # post-LN, as in the paper: what BERT's weights expect
        self.fc1, self.fc2 = nn.Linear(cfg.hidden, cfg.ffn), nn.Linear(cfg.ffn, cfg.hidden)  # the feed-forward network
        self.ln2 = nn.LayerNorm(cfg.hidden, eps=1e-12)  # (GPT-2's pre-LN trains more stably at depth)

    def forward(self, x, mask, idx=None):
        """x (B, T, H) -> (B, T, H), or (B, Tq, H) at idx (B, Tq) alone; mask (B, 1, 1, T): False at [PAD] keys."""
        B, T, H = x.shape  # batch, sequence length, hidden size
        q, k, v = self.qkv(x).split(H, dim=2)  # 3 x (B, T, H)
        if idx is not None:  # BERT.forward's last layer: queries at idx alone, still attending to every position
            idx = idx[:, :, None].expand(-1, -1, H)  # (B, Tq, H)
            q, x = q.gather(1, idx), x.gather(1, idx)  # (B, Tq, H) the queries and the residual at those rows
        q, k, v = (t.view(B, -1, self.nh, H // self.nh).transpose(1, 2) for t in (q, k, v))  # (B, nh, Tq or T, hs)
        y = attention(q, k, v, mask, self.p if self.training else 0.0)  # (B, nh, Tq, hs)
        a = self.proj(y.transpose(1, 2).reshape(x.shape))  # (B, Tq, H)
        x = self.ln1(x + dropout(a, self.p, self.training))  # (B, Tq, H)
        h = self.fc2(F.gelu(self.fc1(x)))  # (B, Tq, H); exact erf GELU, as in the paper's code
        return self.ln2(x + dropout(h, self.p, self.training))  # (B, Tq, H)

class BERT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.hidden)  # the input is the sum of three embeddings:
        self.pos_emb = nn.Embedding(cfg.max_position, cfg.hidden)  # token, position (learned, not sinusoidal)
        self.seg_emb = nn.Embedding(2, cfg.hidden)  # and segment (sentence A or B)
        self.emb_ln = nn.LayerNorm(cfg.hidden, eps=1e-12)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.layers))
        self.pool = nn.Linear(cfg.hidden, cfg.hidden)  # the tanh "pooler": [CLS] -> a sentence-pair vector
        self.nsp_head = nn.Linear(cfg.hidden, 2)  # IsNext / NotNext
        self.mlm_dense, self.mlm_ln = nn.Linear(cfg.hidden, cfg.hidden), nn.LayerNorm(cfg.hidden, eps=1e-12)
        self.decoder = nn.Linear(cfg.hidden, cfg.vocab_size)  # with its own bias, but ...
        self.apply(lambda m: self._init(m, cfg.init_std))
        self.decoder.weight = self.tok_emb.weight  # ... tied: a word's input and output vector are one (V x H fewer)
        self.p = cfg.dropout

    @staticmethod
    def _init(m, std):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)  # small: the first predictions are near uniform (test)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)

    def forward(self, ids, seg, pos=None):
        """ids, seg (B, T) -> MLM logits (B, T, V), NSP logits (B, 2); with pos (B, P), mask_tokens' positions, MLM
        logits there alone (B, P, V): the losses read only [CLS] and pos, so the last layer and the V-wide decoder run
        there alone, same losses and gradients (tested). Mini, 2 cores, batch 32 x 128: 927 ms a step, not 2,145."""
        x, pooled = self.encode(ids, seg, None if pos is None else F.pad(pos, (1, 0)))  # [CLS] (position 0), pos
        h = x if pos is None else x[:, 1:]  # (B, T or P, H)
        return self.decoder(self.mlm_ln(F.gelu(self.mlm_dense(h)))), self.nsp_head(pooled)  # (B, T or P, V), (B, 2)

    def encode(self, ids, seg, idx=None):
        """The encoder alone, for a head of your own: ids, seg (B, T) -> hidden states, pooled [CLS] (no MLM logits)."""
        mask = (ids != PAD)[:, None, None, :]  # (B, 1, 1, T) the keys a query may attend to
        x = self.tok_emb(ids) + self.pos_emb.weight[: ids.size(1)] + self.seg_emb(seg)  # (B, T, H)
        x = dropout(self.emb_ln(x), self.p, self.training)  # (B, T, H)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, idx if i == len(self.layers) - 1 else None)  # (B, T or Tq, H)
        return x, torch.tanh(self.pool(x[:, 0]))  # the last layer's (B, T, H), or (B, Tq, H) at idx; (B, H)

class Classifier(nn.Module):
    """BERT fine-tuned for a label per text or text pair (the paper's section 3.2), as BertForSequenceClassification."""
    def __init__(self, cfg, n_labels):
        super().__init__()
        self.bert, self.p = BERT(cfg), cfg.dropout
        self.classifier = nn.Linear(cfg.hidden, n_labels)  # the one new layer, on the pooled [CLS]; all weights train
        BERT._init(self.classifier, cfg.init_std)

    def forward(self, ids, seg):  # ids, seg (B, T) -> logits (B, n_labels)
        return self.classifier(F.dropout(self.bert.encode(ids, seg)[1], self.p, self.training))

# ----------------------------------------------------------------------------- training

def lr_at(step, total, cfg):
    """Linear warm-up over the run's first `warmup` share, then linear decay to 0 at its end, in optimizer steps."""
    warm = max(1, int(cfg.warmup * total))  # --budget: in seconds (Geiping and Goldstein 2022, "Cramming")
    return cfg.lr * min((step + 1) / warm, max(0.0, (total - step) / max(1, total - warm)))

def make_optimizer(model, cfg):
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": cfg.weight_decay},  # matrices
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]  # biases, LayerNorms
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-6, fused=True)  # honours found_inf

def reuse_freed_memory():
    """glibc maps each block over 32 MB (the logits) fresh and frees it: ~20,000 page faults a tiny step, 15 % of it."""
    with suppress(OSError, AttributeError):  # (not glibc)
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks under 1 GB come from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: up to 1 GB free at its top stays in the process

def autocast(device):  # bf16 on CUDA; the CPU stays in fp32 (its bf16 matmuls are far slower)
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

class CrossEntropySum(torch.autograd.Function):
    """F.cross_entropy(logits, target, reduction="sum"), -100 ignored, with a cheaper backward: the gradient, softmax
    minus one-hot, is written in place into the saved log-probabilities, where torch's zero-fills an (M, V) tensor,
    scatters into it and runs log_softmax's backward over it (tested against F.cross_entropy)."""
    @staticmethod
    def forward(ctx, logits, target):  # (M, V), (M,)
        logp = logits.log_softmax(-1)  # (M, V)
        used = target != -100  # (M,) the slots that hold a label
        t = target.clamp(min=0)  # (M,) an unused slot reads class 0, and counts 0 times
        ctx.save_for_backward(logp, used, t)
        return -(logp.gather(1, t[:, None])[:, 0] * used).sum()

    @staticmethod
    def backward(ctx, grad):
        logp, used, t = ctx.saved_tensors
        d = logp.exp_()  # (M, V) the softmax, in place
        d[torch.arange(len(d), device=d.device), t] -= 1  # minus the one-hot target
        return d.mul_((used * grad)[:, None]), None  # (M, V)

def pretraining_loss(model, ids, seg, pos, labels, nsp, n_mlm, n_seq):
    """The paper's objective, MLM + NSP cross-entropy, as sums over the whole batch's counts (n_mlm masked tokens, n_seq
    sequences), so micro-batches and GPUs add up to the batch's means. -> the loss, and (loss, MLM, NSP, MLM acc, NSP
    acc) detached. Known-good: at step 0 the loss is ln V + ln 2 (9.70 + 0.69 at V = 16384, tested)."""
    with autocast(ids.device):  # no host sync, no data-dependent shape below: it compiles whole
        mlm_logits, nsp_logits = model(ids, seg, pos)  # (B, P, V), (B, 2)
    mlm = CrossEntropySum.apply(mlm_logits.flatten(0, 1).float(), labels.flatten()) / n_mlm  # -100 ignored
    nsp_loss = F.cross_entropy(nsp_logits.float(), nsp, reduction="sum") / n_seq
    top = mlm_logits.amax(-1)  # (B, P) the best logit: whether the label's is it, not argmax (3x dearer on the CPU)
    hit = mlm_logits.gather(-1, labels.clamp(min=0)[..., None])[..., 0] == top  # (B, P)
    mlm_acc = (hit & (labels != -100)).sum() / n_mlm  # an unused slot, -100, never counts
    nsp_acc = (nsp_logits.argmax(-1) == nsp).sum() / n_seq
    return mlm + nsp_loss, torch.stack([mlm + nsp_loss, mlm, nsp_loss, mlm_acc, nsp_acc]).detach()

def train_step(model, optimizer, loss_fn, batch, lr, cfg, rank=0, world=1, norms=None):
    """This rank's share of the batch in grad_accum micro-batches, clip, AdamW. -> stats, and 1.0 if it was skipped."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    B = len(batch[0])  # batch: the whole batch, the same on every rank (pretraining's: ids, seg, pos, labels, nsp)
    norms = ((batch[3] != -100).sum(), B) if norms is None else norms  # pretraining_loss's: masked tokens, sequences
    mine = [t[rank * B // world : (rank + 1) * B // world].chunk(cfg.grad_accum) for t in batch]  # this rank's
    stats = 0
    for i, micro in enumerate(zip(*mine)):
        with model.no_sync() if world > 1 and i < cfg.grad_accum - 1 else nullcontext():  # all-reduce once, at the end
            loss, s = loss_fn(model, *micro, *norms)
            (loss * world).backward()  # DDP averages the ranks' gradients; the batch's loss is their sum
        stats = stats + s
    norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)  # non-finite if a loss is
    optimizer.found_inf = (~norm.isfinite()).float()  # as GradScaler sets it (not a documented API: a test pins it)
    optimizer.step()  # fused AdamW skips a found_inf step, weights and moments alike, on the device: no host sync
    optimizer.zero_grad(set_to_none=True)
    return stats, optimizer.found_inf  # both stay on the device

def train(cfg, tok, corpus, train_docs, val_pairs, resume=None, stop_at=None, pairs0=None, meta={}, init=None):
    """The loop, over train_docs (indices into corpus); pairs0: epoch 0's pairs; init: a state to start from."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    say = print if rank == 0 else (lambda *a, **k: None)  # torchrun: rank 0 alone prints, evaluates and saves
    device, B, T = torch.device(cfg.device), cfg.batch_size, cfg.max_len
    half = dataclasses.replace(cfg, max_len=T // 2, batch_size=2 * B)  # short_share's sequences, as many tokens a step
    torch.manual_seed(cfg.seed)
    raw = BERT(cfg).to(device)  # the same initial weights on every rank
    model = nn.parallel.DistributedDataParallel(raw) if world > 1 else raw
    optimizer = make_optimizer(raw, cfg)
    loss_fn = torch.compile(pretraining_loss) if cfg.compile else pretraining_loss
    reuse_freed_memory()
    gen = torch.Generator(device).manual_seed(cfg.seed + 1)  # masks: the same on every rank
    torch.manual_seed(cfg.seed + rank)  # dropout: not the same on every rank
    tokens = corpus.ids.to(device)  # the whole tokenized corpus: batches are gathered on the GPU
    if init is not None:  # --init: a pretrained BERT's weights, with a new optimizer and schedule
        load_weights(raw, init, meta["init"])
    pairs0 = pairs_or_die(corpus, train_docs, cfg, cfg.seed) if pairs0 is None else pairs0  # epoch 0's
    N, steps_per_epoch = len(pairs0), math.ceil(len(pairs0) / B)  # pairs per epoch
    total = math.inf if cfg.budget else cfg.max_steps or cfg.epochs * steps_per_epoch  # in steps
    budget = 60 * cfg.budget or math.inf  # in seconds of training: evaluations and checkpoints don't count
    step, history, saved, trained = 0, [], None, 0.0  # trained: seconds spent training
    kept = lambda: f"the last checkpoint (step {saved}) is in {cfg.out}/" if saved else "no checkpoint was written"
    if resume is not None:  # a checkpoint's state: weights, moments, random generators, as if it had never stopped
        load_weights(raw, resume, cfg.out)
        optimizer.load_state_dict(resume["optimizer"])
        torch.set_rng_state(resume["rng"]["torch"])
        if resume["rng"]["mask"].shape == gen.get_state().shape:
            gen.set_state(resume["rng"]["mask"])
        else:  # the run moved between the CPU and a GPU, whose generators differ: new masks from here on
            gen.manual_seed(cfg.seed + 1 + resume["step"])
            say("note: the run moved between the CPU and a GPU: it goes on with other random masks (not bit-exact)")
        if device.type == "cuda" and resume["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(resume["rng"]["cuda"])
        step, history, saved, trained = resume["step"], resume["history"], resume["step"], resume.get("trained_s", 0.0)
        if rank > 0:  # rank 0's dropout state was saved: the others draw new masks (exact with --dropout 0)
            torch.manual_seed(cfg.seed + rank + 1000 * step)
    if step >= total or trained >= budget:
        say(f"the run in {cfg.out}/ had finished ({step} steps, {trained / 60:.1f} min); to go on, --resume with more "
            + ("--budget" if cfg.budget else "--epochs or --max_steps"))
        return raw
    os.makedirs(cfg.out, exist_ok=True)
    say(f"model: {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M parameters | {N} training pairs per epoch, "
        f"{steps_per_epoch} steps per epoch of {B} sequences, "
        f"{f'{cfg.budget:g} minutes of training' if cfg.budget else f'{total} steps'}{f', from {step}' * (step > 0)}")
    sums = torch.zeros(5, device=device)  # the steps' stats, summed over a log interval, on the device
    skipped, in_a_row, worst = (torch.zeros((), device=device) for _ in range(3))  # non-finite steps
    pairs, n_steps, t_data, t0 = None, 0, 0.0, time.time()
    clock0 = t0 - trained  # trained = the time since clock0, which moves on by each pause to evaluate and save
    with stop_request() as stopped:  # Ctrl-C, or stop_at (for tests): stop after that step
        while step < total and trained < budget:
            # the batch: B of this epoch's pairs, as token ids, then masked; all on the device
            t, (epoch, i) = time.time(), divmod(step, steps_per_epoch)
            c = half if (trained < cfg.short_share * budget if cfg.budget else step < cfg.short_share * total) else cfg
            if i == 0 or pairs is None or c.max_len != pairs_len:  # new pairs each epoch (epoch 0's were made above)
                pairs, pairs_len = epoch_pairs(corpus, train_docs, c, epoch, steps_per_epoch * c.batch_size,
                                               pairs0 if c is cfg else None).to(device), c.max_len
            x, seg, nsp = collate(tokens, pairs[i * c.batch_size : (i + 1) * c.batch_size], c.max_len)  # (B, T) ...
            x, pos, labels = mask_tokens(x, cfg.vocab_size, gen, cfg.mask_prob)  # (B, T), (B, P), (B, P)
            t_data += time.time() - t
            # the step: learning rate, forward, backward, clip, AdamW (train_step)
            lr = lr_at(trained, budget, cfg) if cfg.budget else lr_at(step, total, cfg)
            stats, bad = train_step(model, optimizer, loss_fn, (x, seg, pos, labels, nsp), lr, cfg, rank, world)
            step, n_steps, trained = step + 1, n_steps + 1, time.time() - clock0
            sums += torch.where(bad > 0, 0.0, stats)  # a skipped step's stats are not finite
            skipped, in_a_row = skipped + bad, (in_a_row + 1) * bad  # in_a_row: back to 0 after a good step
            worst = torch.maximum(worst, in_a_row)
            last_step, log_now = step == total or trained >= budget, step % cfg.log_every == 0
            stop = (stopped[0] or step == stop_at) and (world == 1 or log_now)  # torchrun: it waits for a log step
            if world > 1 and log_now:  # the ranks must stop at the same step: they agree on it at log steps
                flag = torch.tensor(float(stop), device=device)
                dist.all_reduce(flag, dist.ReduceOp.MAX)
                stop = bool(flag)  # a host sync, once per log interval
            evaluate_now = step % steps_per_epoch == 0 or step % cfg.save_every == 0 or last_step
            # log: the device's counters are read here, once per interval
            if (log_now or evaluate_now or stop) and worst >= 3:
                die(f"{int(worst)} non-finite losses in a row at step {step} (those steps changed nothing); "
                    f"lower --lr; {kept()}")
            if log_now or last_step:
                if world > 1:
                    dist.all_reduce(sums)
                if skipped > 0:
                    say(f"warning: {int(skipped)} step(s) skipped, non-finite loss", file=sys.stderr)
                dt, m = time.time() - t0, (sums / max(1, n_steps - int(skipped))).tolist()
                rec = dict(step=step, loss=m[0], mlm_loss=m[1], nsp_loss=m[2], mlm_acc=m[3], nsp_acc=m[4], lr=lr,
                           tok_per_s=n_steps * B * T / dt, data_share=t_data / dt, trained_s=trained)
                done = f"{trained / 60:.1f}/{cfg.budget:g} min" if cfg.budget else f"{total}"
                say(f"step {step}/{done} | loss {m[0]:.4f} | mlm {m[1]:.4f} | nsp {m[2]:.4f} | mlm_acc {m[3]:.3f} | "
                    f"nsp_acc {m[4]:.3f} | lr {lr:.2e} | {rec['tok_per_s']:,.0f} tok/s | data {100 * t_data / dt:.1f}%")
                if rank == 0:
                    log(cfg.out, rec, kept())
                sums, skipped, n_steps, t_data, t0 = sums.zero_(), skipped.zero_(), 0, 0.0, time.time()
            # evaluate and checkpoint: each epoch's end, every save_every steps, the end; not counted in tokens/s
            if (evaluate_now or stop) and device.type == "cuda":
                torch.cuda.synchronize()  # the queued steps count as training, not as the pause
            t_pause, ev = time.time(), None
            if evaluate_now and val_pairs is not None and rank == 0:
                ev = evaluate(raw, tokens, val_pairs.to(device), cfg)
                when = "end" if last_step else f"epoch {round(step / steps_per_epoch, 2):g}"
                say(f"eval ({when}) step {step}: mlm_loss {ev['mlm_loss']:.4f} | mlm_acc {ev['mlm_acc']:.4f} | "
                    f"nsp_acc {ev['nsp_acc']:.4f} | top_share {ev['top_share']:.2f}")
                if warning := health_warning(history, ev):
                    say(f"warning: {warning}", file=sys.stderr)
            ok = ev is None or math.isfinite(ev["mlm_loss"])  # weights that evaluate to NaN are not saved
            if (evaluate_now or stop) and rank == 0 and ok:  # the checkpoint: all that demo and --resume need
                rng = {"torch": torch.get_rng_state(), "mask": gen.get_state(),
                       "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}
                history += [ev] if ev else []
                save_checkpoint(os.path.join(cfg.out, "model.pt"), {
                    "model": raw.state_dict(), "optimizer": optimizer.state_dict(), "config": dataclasses.asdict(cfg),
                    "tokenizer": tok.to_str(), "rng": rng, "step": step, "n_train_pairs": N, "history": history,
                    "trained_s": trained, **meta}, kept())
                saved = step
                if ev:  # after the save: metrics.jsonl holds no evaluation that no checkpoint has
                    log(cfg.out, {"eval": step, **ev}, kept())
            t0, clock0 = t0 + time.time() - t_pause, clock0 + time.time() - t_pause
            if stop and not last_step:
                say(f"stopped at step {step}; checkpoint saved in {cfg.out}/, continue with --resume", file=sys.stderr)
                sys.exit(130)  # as for Ctrl-C
    say(f"done: checkpoint in {cfg.out}/model.pt; try: python minibert.py demo \"the [MASK] sat .\" --ckpt {cfg.out}")
    return raw

# ----------------------------------------------------------------------------- demo

@torch.no_grad()
def fill_mask(model, tok, text, top_k=5):
    """-> the top_k (word, probability) guesses for each [MASK] in text, read whole as [CLS] text [SEP]."""
    x = torch.tensor([tok.encode(text).ids], device=model.tok_emb.weight.device)  # (1, T)
    probs = model.eval()(x, torch.zeros_like(x))[0][0].float().softmax(-1)  # (T, V); eval(): no dropout
    top = probs[x[0] == MASK].topk(min(top_k, probs.size(-1)))  # (masks, top_k)
    return [[(tok.id_to_token(i), p) for p, i in zip(*t)] for t in zip(top.values.tolist(), top.indices.tolist())]

# ----------------------------------------------------------------------------- evaluation, checkpoints, Ctrl-C

@torch.no_grad()
def evaluate(model, tokens, pairs, cfg, batch_size=64):
    """Held-out MLM loss and accuracy, NSP accuracy, and top_share: the most frequent MLM prediction's share."""
    was_training, gen = model.training, torch.Generator(tokens.device).manual_seed(cfg.seed)  # same masks every call
    model.eval()
    loss, hits, nsp_hits, counts = 0, 0, 0, torch.zeros(cfg.vocab_size, device=tokens.device)
    for i in range(0, len(pairs), batch_size):
        x, seg, nsp = collate(tokens, pairs[i : i + batch_size], cfg.max_len)
        x, pos, labels = mask_tokens(x, cfg.vocab_size, gen, cfg.mask_prob)
        with autocast(tokens.device):
            mlm_logits, nsp_logits = model(x, seg, pos)
        used, pred = labels != -100, mlm_logits.argmax(-1)  # (B, P) each
        loss = loss + F.cross_entropy(mlm_logits[used].float(), labels[used], reduction="sum")
        hits, nsp_hits = hits + (pred == labels).sum(), nsp_hits + (nsp_logits.argmax(-1) == nsp).sum()  # -100: no hit
        counts += torch.bincount(pred[used], minlength=cfg.vocab_size)  # (V,)
    model.train(was_training)
    n = counts.sum()
    return {"mlm_loss": float(loss / n), "mlm_acc": float(hits / n), "nsp_acc": float(nsp_hits) / len(pairs),
            "top_share": float(counts.max() / n)}  # near 1: one token predicted everywhere

def health_warning(history, m):
    """A warning if m shows a collapse (back to the plateau's one token everywhere, after leaving it) or divergence."""
    if not math.isfinite(m["mlm_loss"]):
        return f"the held-out MLM loss is {m['mlm_loss']}: these weights are not saved; lower --lr"
    best_acc = max([h["mlm_acc"] for h in history if h["top_share"] <= 0.9] or [0])
    best_loss = min([h["mlm_loss"] for h in history] or [1e9])
    if m["top_share"] > 0.9 and m["mlm_acc"] < 0.8 * best_acc:
        return (f"the model collapsed: it predicts one token at {m['top_share']:.0%} of the masked positions "
                f"(MLM accuracy {m['mlm_acc']:.3f}, it had {best_acc:.3f}); start again with a lower --lr")
    if m["mlm_loss"] > best_loss + 0.5:
        return (f"the held-out MLM loss rose to {m['mlm_loss']:.3f} from its best, {best_loss:.3f}: training "
                "is diverging; start again with a lower --lr")

def save_checkpoint(path, state, kept=None):
    """Atomic: a temp file renamed over the old one. A failed write (full disk) keeps the old; with kept: one line."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush(), os.fsync(f.fileno())
        os.replace(tmp, path)  # a kill at any instant leaves the old checkpoint or the new, never half of one
    except BaseException as e:
        with suppress(OSError):
            os.remove(tmp)  # a write cut short removes its temporary file
        if KeyboardInterrupt in (type(e), type(e.__context__)):  # a second Ctrl-C, mid-write
            raise KeyboardInterrupt from None  # (not the zip writer's complaint about being cut short)
        if kept is not None and isinstance(e, (OSError, RuntimeError)):  # (torch's RuntimeError follows an OSError)
            die(f"cannot write {path} ({getattr(e.__context__ or e, 'strerror', None) or e}); {kept}")
        raise

@contextmanager
def stop_request():
    """Ctrl-C or SIGTERM sets stop[0]; the loop saves and exits between steps, never mid-update."""
    stop = [False]
    def handle(sig, frame):
        if stop[0]:  # a second Ctrl-C aborts
            raise KeyboardInterrupt
        stop[0] = True
        print("\nstopping after this step (Ctrl-C again: abort without saving)", file=sys.stderr)
    old = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)

def log(folder, record, kept):  # metrics.jsonl: one JSON object per log line and per evaluation
    try:
        with open(os.path.join(folder, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:  # a full disk: one line that says which checkpoint is kept
        die(f"cannot write {folder}/metrics.jsonl ({e.strerror}); {kept}")

# ----------------------------------------------------------------------------- reading text, the corpus cache

def die(msg):  # bad input ends here: one line on stderr that says what to do, and exit status 1
    sys.exit(f"minibert: error: {msg}")

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[0-9%s])|(?<=[。！？])" % "".join(  # ". The", ". Ärger", "。"
    c for c in map(chr, range(0x2000)) if c.isupper()))  # (the capitals of Latin, Greek, Cyrillic, ... scripts)
WIKI_DETOK = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), ("<unk>", "[UNK]")]
TITLE = re.compile("= (?!=).* =")  # a whole line " = Title = " starts an article; " = = Section = = " is a heading

def parse_wikitext(lines, by="blank"):
    """Lines -> documents (lists of sentences): WikiText's articles if there are title lines, else split by "blank"
    (blank lines end a document), "line" (a line each: a table's rows) or "whole" (one: a folder's file)."""
    lines = [s.replace("\n", " ").strip() for s in lines]
    titled, docs = any(map(TITLE.fullmatch, lines)), [[]]
    for s in lines:
        if TITLE.fullmatch(s) if titled else (s if by == "line" else not s and by == "blank"):
            docs.append([])
        if s and not s.startswith("="):  # headings are not sentences
            for a, b in WIKI_DETOK:
                s = s.replace(a, b)
            docs[-1].extend(SENTENCE_END.split(s))
    return [d for d in docs if d]

PACKED = {b"\x1f\x8b": gzip, b"BZh": bz2, b"\xfd7zXZ": lzma}  # gzip, bzip2 and xz files start with these bytes

def read_text(path):
    """A file -> its text: gzip, bzip2 or xz unpacked; UTF-8 (a BOM dropped), or UTF-16 with its BOM."""
    try:
        data = Path(path).read_bytes()
        data = next((m.decompress(data) for magic, m in PACKED.items() if data.startswith(magic)), data)
    except Exception as e:  # missing, unreadable, or damaged
        die(f"cannot read {path} ({getattr(e, 'strerror', None) or e})")
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return data.decode("utf-16")
    if b"\0" in data[:4096]:  # (text has none)
        die(f"{path} is not text: a zip or 7z archive (unpack it), UTF-16 without a byte-order mark (iconv -f "
            "UTF-16LE -t UTF-8), or binary")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        die(f"{path} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start:,} (line "
            f"{data.count(10, 0, e.start) + 1}: {e.reason}); convert it to UTF-8 (iconv -f ENCODING -t UTF-8)")

TABLES = (".parquet", ".jsonl", ".json", ".csv", ".tsv")
unpacked = lambda path: re.sub(r"\.(gz|bz2|xz)$", "", path)  # the name without its compression's suffix

def read_table(path):
    """A .parquet, .jsonl, .json (a list of objects), .csv or .tsv (a header row) file -> {column: its values}."""
    name = unpacked(path)
    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq
            return pq.read_table(path).to_pydict()
        text, tsv = read_text(path), dict(delimiter="\t", quoting=csv.QUOTE_NONE)  # GLUE's .tsv quotes nothing
        rows = (list(csv.DictReader(io.StringIO(text, newline=""), **tsv if name.endswith(".tsv") else {}))
                if name.endswith((".csv", ".tsv")) else json.loads(text) if name.endswith(".json") else
                json.loads("[" + ",\n".join(s if s.strip() else "null" for s in text.splitlines()) + "]"))  # JSONL:
        # one array, line for line, so that an error names its line; (a field missing from a row: None)
    except Exception as e:  # unreadable, damaged, not what its name says
        die(f"cannot read {path} ({getattr(e, 'strerror', None) or str(e).split('. ')[0]})")
    rows = [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
    return {c: [r.get(c) for r in rows] for c in dict.fromkeys(k for r in rows for k in r if k is not None)} or die(
        f"{path} holds no rows; pass a table: a header row, then a row per example (or a list of objects)")

def read_cornell(folder):
    """Cornell Movie-Dialogs: each conversation is a document, each utterance a sentence."""
    def fields(name):
        if not os.path.isfile(os.path.join(folder, name)):
            die(f"--data {folder} is a folder without {name}; pass a text file, or the Cornell Movie-Dialogs folder")
        with open(os.path.join(folder, name), encoding="iso-8859-1") as f:
            return [line.rstrip("\n").split(" +++$+++ ") for line in f]
    lines = {r[0]: r[4].strip() for r in fields("movie_lines.txt") if len(r) == 5}
    convs = [re.findall(r"L\d+", r[-1]) for r in fields("movie_conversations.txt")]
    return [d for d in ([lines[i] for i in ids if lines.get(i)] for ids in convs) if d]

def read_docs(path, whole=False):  # one file -> documents (read_corpus)
    if unpacked(path).endswith(TABLES):
        table = read_table(path)
        return parse_wikitext(map(str, filter(None, table["text"])), "line") if "text" in table else die(
            f"{path} has no 'text' column (its columns: {', '.join(map(str, table))}); name the text's column text")
    lines = read_text(path).splitlines()
    return parse_wikitext(lines, "whole" if whole else "blank" if any(not s.strip() for s in lines) else "line")

DOCUMENTS = ("A document is: in text, a WikiText article (' = Title = ' lines), else what blank lines separate, else "
             "a line; in .jsonl, .json, .csv, .tsv, .parquet, a row's 'text'; in a folder, a file (Cornell "
             "Movie-Dialogs: a conversation). .gz, .bz2, .xz: unpacked")

def read_corpus(paths):
    """--data FILE|FOLDER ... -> documents (lists of sentences), as DOCUMENTS (--help) says."""
    docs = []
    for path in paths:
        if os.path.isfile(os.path.join(path, "movie_lines.txt")):
            docs += read_cornell(path)
        elif os.path.isdir(path):  # its text files, each a document (in WikiText layout: its articles)
            names = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if not f.startswith(".") and
                           unpacked(f).endswith((".txt", ".md")))
            docs += [d for f in names for d in read_docs(f, whole=True)] if names else die(
                f"--data {path} is a folder without .txt or .md files; pass files, or the Cornell Movie-Dialogs folder")
        else:
            docs += read_docs(path)
    return docs or die(f"--data {' '.join(paths)} holds no text; pass a file with sentences in it")

def load_hub(cfg):
    """A Hugging Face hub dataset -> {"train": documents, and "validation" if it has one}, read as a --data file."""
    try:
        import datasets, huggingface_hub  # (only a hub run needs them)
        datasets.logging.set_verbosity_error(), huggingface_hub.logging.set_verbosity_error()  # no retry-by-retry log
        ds = datasets.load_dataset(cfg.dataset, cfg.dataset_config or None)
    except Exception as e:  # no network, no hub, no datasets, no such dataset: all end the same way
        die(f"cannot load {cfg.dataset} ({cfg.dataset_config}) from the Hugging Face hub ({type(e).__name__}); "
            "offline, pass --data FILE")
    if "train" not in ds or "text" not in ds["train"].column_names:
        die(f"{cfg.dataset} has no train split with a 'text' column; pass --data FILE")
    return {split: parse_wikitext(ds[split]["text"], "line") for split in ("train", "validation") if split in ds}

def split_docs(docs, cfg):
    """-> (training documents, held-out documents): --val_share of them, whole, at random (none if too few)."""
    docs, share = docs[:], cfg.val_share
    random.Random(cfg.seed).shuffle(docs)
    n_val = max(2, round(share * len(docs))) if share > 0 and len(docs) >= 8 else 0  # NotNext needs two
    return docs[n_val:], docs[:n_val]

def held_out(data, cfg):
    """--data's files (or the hub's dataset) -> training documents, held-out documents, a note for the data line."""
    hub = {} if data else load_hub(cfg)
    docs, note = read_corpus(data) if data else hub["train"], ""
    if len(docs) == 1:  # one document: cut into 20 by words, so that NotNext has partners and some can be held out
        words, note = " ".join(docs[0]).split(), " (one document, cut into parts: NotNext needs two)"
        k = max(100, -(-len(words) // 20))  # words per part: a part shorter than a pair could not make one
        docs = [[" ".join(words[i : i + k])] for i in range(0, len(words), k)]
    return *((docs, hub["validation"]) if "validation" in hub else split_docs(docs, cfg)), note

VAL_PAIRS = 4096  # held-out pairs, at most, that train evaluates on (eval of the run without --data: the same)

def pairs_or_die(corpus, docs, cfg, seed):
    pairs = make_pairs(corpus, docs, cfg.max_len, seed, cfg.short_seq_prob)
    return pairs if len(pairs) else die("too little text to build a single sentence pair: give at least two documents "
                                        "of two sentences or more")

def cached_corpus(tok, docs, folder, save=True):
    """encode_corpus, cached in folder/corpus-KEY.pt (best effort). -> Corpus, cached?, the text's hash (--resume's)"""
    h = hashlib.sha256()
    for d in docs:
        h.update("\n".join(d).encode() + b"\0")
    key = hashlib.sha256((tok.to_str() + h.hexdigest()).encode())  # the tokenizer and the text: no other's cache
    path = os.path.join(folder, f"corpus-{key.hexdigest()[:16]}.pt")
    if os.path.exists(path):
        with suppress(Exception):
            c = Corpus(**torch.load(path, weights_only=True))
            if len(c.docs) == len(docs) + 1 and c.docs[-1] == len(c.sents) - 1 and c.sents[-1] == len(c.ids):
                return c, True, h.hexdigest()
        print(f"warning: {path} is damaged; tokenizing again", file=sys.stderr)
    corpus = encode_corpus(tok, docs)
    if save:  # (under torchrun, rank 0 alone writes it; a read-only folder gets no cache)
        with suppress(Exception):  # a full disk, a read-only folder: no cache
            save_checkpoint(path, corpus._asdict())
    return corpus, False, h.hexdigest()

def load_checkpoint(folder):
    """folder/model.pt (or that file) -> (state, tokenizer, config), or a one-line error."""
    folder = os.path.dirname(folder) if os.path.basename(folder) == "model.pt" else folder
    path = os.path.join(folder, "model.pt")
    if not os.path.isfile(path):
        die(f"no checkpoint at {path}; train one first: python minibert.py train --data FILE --out {folder} (or pass a "
            "transformers BERT folder)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state, Tokenizer.from_str(state["tokenizer"]), Config(**state["config"])
    except Exception as e:  # truncated, foreign or from another program
        die(f"{path} is not a minibert checkpoint ({type(e).__name__}); retrain, or point --ckpt at another folder")

def load_tokenizer(path, lowercase=True):
    """A checkpoint, tokenizer.json or vocab.txt -> tokenizer (specials at 0..4), order (our id i: file's order[i])"""
    if os.path.isdir(path) or path.endswith(".pt"):  # a minibert checkpoint: its folder or model.pt
        return load_checkpoint(path)[1], None
    try:
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f)["model"]["vocab"] if path.endswith(".json") else f.read().splitlines()
    except (OSError, ValueError, KeyError, TypeError) as e:
        die(f"cannot read --tokenizer {path} ({getattr(e, 'strerror', None) or type(e).__name__}); pass a checkpoint "
            "folder, a WordPiece tokenizer.json or a vocab.txt")
    vocab = sorted(vocab, key=vocab.get) if isinstance(vocab, dict) else vocab  # tokens in id order
    if missing := [t for t in SPECIALS if t not in vocab]:
        die(f"{path} has no {' '.join(missing)}; minibert needs BERT's {' '.join(SPECIALS)}")
    ids = {t: i for i, t in enumerate(vocab)}
    order = [ids[t] for t in dict.fromkeys(SPECIALS + vocab)]  # the specials first, then the rest in the file's order
    tok = wordpiece({t: i for i, t in enumerate(dict.fromkeys(SPECIALS + vocab))}, lowercase)
    tok.add_special_tokens(SPECIALS)  # "[MASK]" in a text is the token, not "[", "mask", "]" (as trained ones do)
    return tok, None if order == sorted(order) else order

def load_weights(model, state, folder):  # weights named or shaped otherwise: one line, not a traceback
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        die(f"the checkpoint in {folder} holds the weights of another version of minibert; retrain with this one")

def load_model(folder, device):  # for demo, eval and export: the model (a BERT or a Classifier), in eval mode
    state, tok, cfg = load_source(folder)
    model = Classifier(cfg, len(state["labels"])) if "labels" in state else BERT(cfg)
    load_weights(model, state, folder)
    return model.to(device).eval(), tok, cfg, state

# ----------------------------------------------------------------------------- fine-tuning

TEXT_COLUMNS = [("sentence1", "sentence2"), ("question1", "question2"), ("question", "sentence"),
                ("premise", "hypothesis"), ("sentence",), ("text",)]  # GLUE's files, and the common names
NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")  # a label: "4.2", "1.0", "-1" (not "nan")

def read_labelled(path, cols=None, label="label", names=None, task=None):
    """A table (read_table) -> rows ((one or two texts), label), label names, text columns, rows skipped, task. The task
    (None: from the labels) is "regression" if the labels are all numbers, not all integers (STS-B's 0.0-5.0): the
    label is a float and names is [label]; else "classification": a label id, names the labels a model knows (else the
    file's, sorted), "1.0" the class "1". cols: text columns."""
    if not unpacked(path).endswith(TABLES):
        die(f"{path} is not a table; pass a .tsv, .csv, .jsonl, .json or .parquet file with a label column")
    table = read_table(path)  # {column: values}
    cols = cols or next((c for c in TEXT_COLUMNS if set(c) <= table.keys()), ())  # else the header's first of these
    if label not in table or not cols or not set(cols) <= table.keys():
        die(f"{path} has the columns {', '.join(table)}: it needs a {label!r} column (--label_col) and one or two "
            "text columns (--text_cols; found by name: sentence, text, sentence1/sentence2, question/sentence...)")
    kept = [f for f in ([str(v).strip() if v is not None else "" for v in r] for r in zip(*(table[c] for c in
            (*cols, label)))) if all(f) and f != [*cols, label]]  # skipped: a field empty; a header again (cat a b)
    skipped = len(table[label]) - len(kept) if kept else die(f"{path} has no labelled rows (each has a field empty)")
    value = {f[-1]: float(f[-1]) if NUMBER.fullmatch(f[-1]) else None for f in kept}  # each label's number, or None
    numbers = None not in value.values()
    task = task or ("regression" if numbers and any(x % 1 for x in value.values()) else "classification")
    if task == "regression" and not numbers:
        die(f"{path}: regression needs a number in each {label!r}, not {min(v for v in value if value[v] is None)}")
    if task == "regression":
        return [(tuple(f[:-1]), value[f[-1]]) for f in kept], [label], cols, skipped, task
    name = {v: str(int(x)) if numbers and x % 1 == 0 else v for v, x in value.items()}  # "1.0", "1" -> the class "1"
    names = names or sorted(set(name.values()), key=float if numbers else str)
    if unknown := set(name.values()) - set(names):
        die(f"{path} has the label(s) {', '.join(sorted(unknown))}, which the model was not trained on "
            f"(its labels: {', '.join(names)})")
    return [(tuple(f[:-1]), names.index(name[f[-1]])) for f in kept], names, cols, skipped, task

def encode_rows(tok, rows, max_len):
    """rows (texts, label) -> ((ids, segment ids), label), cut to max_len tokens; and how many were cut."""
    tok.enable_truncation(max_len)  # cuts the longer text first
    enc = tok.encode_batch([t if len(t) == 2 else t[0] for t, _ in rows])  # [CLS] a [SEP] (b [SEP]), as in pretraining
    tok.no_truncation()
    return [((e.ids, e.type_ids), y) for e, (_, y) in zip(enc, rows)], sum(len(e.overflowing) > 0 for e in enc)

def padded(rows, device):
    """-> ids, seg (B, T), labels (B,): padded with 0 ([PAD], segment 0) to the longest row (not to max_len)."""
    T = -(-max(len(x[0]) for x, _ in rows) // 8) * 8  # a multiple of 8: fewer shapes (each new one costs a CPU plan)
    ids, seg = ([t + [PAD] * (T - len(t)) for t in col] for col in zip(*(x for x, _ in rows)))
    return tuple(torch.tensor(t, device=device) for t in (ids, seg, [y for _, y in rows]))

def classify_loss(model, ids, seg, y, n):
    """Cross-entropy, or squared error for a float y (regression), summed, over n. -> loss, (loss, acc) or (loss,)"""
    with autocast(ids.device):
        logits = model(ids, seg).float()  # (B, labels)
    if y.is_floating_point():  # as BertForSequenceClassification with num_labels 1
        loss = F.mse_loss(logits[:, 0], y, reduction="sum") / n
        return loss, loss[None].detach()
    loss = F.cross_entropy(logits, y, reduction="sum") / n
    return loss, torch.stack([loss, (logits.argmax(-1) == y).sum() / n]).detach()

def ranks(v):  # (N,) -> (N,) each value's rank from 0; tied values share their mean rank, as Spearman's needs
    _, group, count = v.unique(return_inverse=True, return_counts=True)  # by distinct value, in order
    return (count.cumsum(0) - (count + 1) / 2)[group]  # (N,)
correlation = lambda a, b: torch.corrcoef(torch.stack([a, b]))[0, 1].item()  # Pearson's, of two (N,) tensors

@torch.no_grad()
def evaluate_classifier(model, rows, device):
    """-> mean loss and accuracy; for regression, mean squared error and Pearson's and Spearman's correlation."""
    was_training, model = model.training, model.eval()
    with autocast(torch.device(device)):  # 256 rows at a time
        out = torch.cat([model(*padded(rows[i : i + 256], device)[:2]).float() for i in range(0, len(rows), 256)])
    model.train(was_training)
    y = torch.tensor([y for _, y in rows], device=out.device)  # (N,)
    if y.is_floating_point():
        p = out[:, 0]  # (N,) the predicted numbers
        return {"mse": F.mse_loss(p, y).item(), "pearson": correlation(p, y),
                "spearman": correlation(ranks(p), ranks(y))}  # Spearman's: Pearson's of the ranks
    return {"loss": F.cross_entropy(out, y).item(), "acc": (out.argmax(-1) == y).float().mean().item()}

scores = lambda m: " | ".join(f"{k} {v:.4f}" for k, v in m.items())  # "loss 0.4012 | acc 0.8125"

def finetune(cfg, model, tok, rows, val, meta, stop_at=None):
    """Train a Classifier on rows; evaluate on val each epoch; keep the best (regression: least error), with meta."""
    device, B, N = torch.device(cfg.device), cfg.batch_size, len(rows)
    optimizer, gen = make_optimizer(model.to(device).train(), cfg), torch.Generator().manual_seed(cfg.seed)
    total, step, best = cfg.epochs * math.ceil(N / B), 0, None
    with stop_request() as stopped:
        for _ in range(cfg.epochs):
            order, sums, n, t0 = torch.randperm(N, generator=gen).tolist(), 0, 0, time.time()  # a new order each epoch
            for i in range(0, N, B):
                lr, batch = lr_at(step, total, cfg), padded([rows[j] for j in order[i : i + B]], device)
                stats, _ = train_step(model, optimizer, classify_loss, batch, lr, cfg, norms=(len(batch[2]),))
                sums, n, step, stop = sums + stats, n + 1, step + 1, stopped[0] or step + 1 == stop_at
                if step % cfg.log_every == 0 or stop:
                    loss, *acc = (sums / n).tolist()  # (no accuracy for regression)
                    print(f"step {step}/{total} | loss {loss:.4f}{''.join(f' | acc {a:.3f}' for a in acc)} | lr "
                          f"{lr:.2e}" + " | warning: a non-finite loss; lower --lr" * (not math.isfinite(loss)))
                    sums, n = 0, 0
                if stop:
                    break
            ev = evaluate_classifier(model, val, device)
            m = {"epoch": round(step / total * cfg.epochs, 2), "s": round(time.time() - t0), **ev}
            print(f"eval (epoch {m['epoch']:g}, {m['s']} s) step {step}: {scores(ev)}")
            kept = f"epoch {best[1]['epoch']:g}'s model is kept" if best else "no checkpoint was written"
            log(cfg.out, {"eval": step, **m}, kept)
            score = ev["acc"] if "acc" in ev else -ev["mse"]  # regression: the least squared error
            if best is None or score > best[0]:  # the model kept is the best epoch's
                save_checkpoint(os.path.join(cfg.out, "model.pt"), {"model": model.state_dict(), "eval": m, **meta,
                                "config": dataclasses.asdict(cfg), "tokenizer": tok.to_str()}, kept)
                best = score, m, ev
            if stop:  # the best epoch so far is saved; main says "interrupted", exit status 130
                raise KeyboardInterrupt
    print(f"done: the best epoch, {best[1]['epoch']:g} (held-out {scores(best[2])}), is in {cfg.out}/model.pt; "
          f"try: python minibert.py demo \"a text\" --ckpt {cfg.out}")

# ----------------------------------------------------------------------------- bench

def train_flops(cfg, B, T, P):
    """Useful FLOPs per training step as run: the last layer's attention output, FFN and MLM head at [CLS] + P slots."""
    H, F_, V = cfg.hidden, cfg.ffn, cfg.vocab_size  # 2 FLOPs per multiply-add
    layer = 2 * (4 * H * H + 2 * H * F_) + 4 * T * H  # per position: qkv, proj, ffn; q.k and att.v
    last = B * T * 2 * 3 * H * H + B * (1 + P) * (2 * (H * H + 2 * H * F_) + 4 * T * H)
    heads = B * P * 2 * (H * H + H * V) + B * 2 * (H * H + 2 * H)  # MLM at the slots; pooler and NSP
    return 3 * ((cfg.layers - 1) * B * T * layer + last + heads)  # backward = 2 x forward

def bench(cfg, steps=20, warmup=5):
    """Time train_step (forward, losses, backward, clip, AdamW) on a synthetic batch of full sequences, and its MFU."""
    device, B, T, V = torch.device(cfg.device), cfg.batch_size, cfg.max_len, cfg.vocab_size
    torch.backends.cuda.matmul.allow_tf32 = True  # on CUDA, for what autocast leaves in fp32
    torch.manual_seed(cfg.seed)
    model = BERT(cfg).to(device).train()
    optimizer = make_optimizer(model, cfg)
    reuse_freed_memory()
    loss_fn = torch.compile(pretraining_loss) if cfg.compile else pretraining_loss
    gen = torch.Generator(device).manual_seed(cfg.seed)
    ids = torch.randint(len(SPECIALS), V, (B, T), generator=gen, device=device)
    ids[:, 0], ids[:, T // 2], ids[:, -1] = CLS, SEP, SEP
    inputs, pos, labels = mask_tokens(ids, V, gen, cfg.mask_prob)
    seg = (torch.arange(T, device=device) > T // 2).long().expand(B, T)
    batch = (inputs, seg, pos, labels, torch.randint(0, 2, (B,), generator=gen, device=device))
    times = []
    for n in (warmup, steps):
        t = time.perf_counter()
        for _ in range(n):
            train_step(model, optimizer, loss_fn, batch, cfg.lr, cfg)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    if device.type == "cuda":
        name, peaks = torch.cuda.get_device_name(device), {"A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}
        peak = next((v for k, v in peaks.items() if k in name), 989e12)  # bf16 dense; else an H100's or H200's
        note = f"{name}, assumed bf16 dense peak {peak / 1e12:.0f} TFLOP/s"
    else:
        a = torch.randn(1024, 1024)
        peak = 2 * 1024**3 / min(timeit.repeat(lambda: a @ a, number=1, repeat=20))  # the best of 20
        note = f"CPU, {torch.get_num_threads()} thread(s), measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s"
    dt, flops = times[1] / steps, train_flops(cfg, B, T, pos.size(1))
    return {"device": str(device), "peak_note": note, "batch_size": B, "max_len": T, "ms_per_step": 1e3 * dt,
            "tokens_per_s": B * T / dt, "tflops_per_step": flops / 1e12, "mfu": flops / dt / peak, "warmup_s": times[0]}

# ----------------------------------------------------------------------------- transformers' BERT: export and import

LAYER = "bert.encoder.layer.{i}."  # transformers' name of layer i
HF_NAMES = {  # minibert module -> transformers' BertForPreTraining module(s) ({i}: layer index), both ways
    "tok_emb": "bert.embeddings.word_embeddings", "pos_emb": "bert.embeddings.position_embeddings",
    "seg_emb": "bert.embeddings.token_type_embeddings", "emb_ln": "bert.embeddings.LayerNorm",
    "layers.{i}.qkv": tuple(LAYER + f"attention.self.{n}" for n in ("query", "key", "value")),
    "layers.{i}.proj": LAYER + "attention.output.dense", "layers.{i}.ln1": LAYER + "attention.output.LayerNorm",
    "layers.{i}.fc1": LAYER + "intermediate.dense", "layers.{i}.fc2": LAYER + "output.dense",
    "layers.{i}.ln2": LAYER + "output.LayerNorm", "pool": "bert.pooler.dense",
    "nsp_head": "cls.seq_relationship", "mlm_dense": "cls.predictions.transform.dense",
    "mlm_ln": "cls.predictions.transform.LayerNorm", "decoder": "cls.predictions",  # its weight is tok_emb's
    "classifier": "classifier"}  # a Classifier's head, as BertForSequenceClassification names it
HF_CONFIG = {"num_hidden_layers": "layers", "hidden_size": "hidden", "num_attention_heads": "heads",  # config.json
             "intermediate_size": "ffn", "vocab_size": "vocab_size", "max_position_embeddings": "max_position",
             "hidden_dropout_prob": "dropout", "attention_probs_dropout_prob": "dropout",
             "initializer_range": "init_std"}
BERT_ONLY = {"model_type": "bert", "hidden_act": "gelu", "type_vocab_size": 2, "layer_norm_eps": 1e-12,
             "position_embedding_type": "absolute"}  # what minibert's layers compute (and BertConfig's defaults)

def hf_pairs(cfg):  # -> (our tensor's name, [their tensors' names]) for each of HF_NAMES: qkv is three of theirs
    return [(f"{ours.format(i=i)}.{kind}", [f"{t.format(i=i)}.{kind}" for t in
             ((theirs,) if isinstance(theirs, str) else theirs)]) for ours, theirs in HF_NAMES.items()
            for i in range(cfg.layers if "{i}" in ours else 1) for kind in ("weight", "bias")]

def export_hf(folder, to):
    """A folder that transformers loads; an imported model's vocabulary goes back to its own order ([UNK] at 100)."""
    model, tok, cfg, state = load_model(folder, "cpu")  # another version's checkpoint: one line, nothing written
    labels, sd = state.get("labels"), model.state_dict()
    arch = "BertForSequenceClassification" if labels else "BertForPreTraining"  # the first without "cls." heads
    if there := [f for f in ("config.json", "model.safetensors", "tokenizer.json") if os.path.exists(Path(to, f))]:
        die(f"--to {to} already holds {', '.join(there)}; export overwrites nothing: pick a new folder")
    try:
        os.makedirs(to, exist_ok=True)
    except OSError as e:
        die(f"cannot create --to {to}: {e.strerror}")
    back = torch.tensor(state.get("vocab_order") or range(cfg.vocab_size)).argsort()  # the file's id j is our back[j]
    lowercase = json.loads(tok.to_str())["normalizer"]["lowercase"]
    vocab = [tok.id_to_token(i) for i in back.tolist()]  # in the file's order
    config = {"architectures": [arch], **BERT_ONLY, **{k: getattr(cfg, v) for k, v in HF_CONFIG.items()},
              "pad_token_id": vocab.index("[PAD]"), "tie_word_embeddings": True}
    config |= {"problem_type": "regression"} if state.get("task") == "regression" else {}  # (num_labels 1)
    if labels:
        config |= {"id2label": dict(enumerate(labels)), "label2id": {v: i for i, v in enumerate(labels)}}
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_len,  # as trained
                  **dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), SPECIALS)),
                  "do_lower_case": lowercase, "model_input_names": ["input_ids", "token_type_ids", "attention_mask"]}
    for name, obj in (("config.json", config), ("tokenizer_config.json", tok_config)):
        Path(to, name).write_text(json.dumps(obj, indent=2))
    if state.get("vocab_order"):  # the tokenizer with the file's ids
        tok = wordpiece({t: i for i, t in enumerate(vocab)}, lowercase)
        tok.add_special_tokens(SPECIALS)
    tok.save(os.path.join(to, "tokenizer.json"))  # and vocab.txt, for the slow BertTokenizer:
    Path(to, "vocab.txt").write_text("".join(f"{t}\n" for t in vocab), "utf-8")
    from safetensors.torch import save_file
    sd = {k.removeprefix("bert."): v for k, v in sd.items()}  # (a Classifier's BERT is .bert)
    hf = {t: x for ours, theirs in hf_pairs(cfg) if ours in sd and ours != "decoder.weight"  # decoder: tied
          for t, x in zip(theirs, sd[ours].chunk(len(theirs)))}  # our names -> theirs, the qkv split in three
    for name in ("bert.embeddings.word_embeddings.weight", "cls.predictions.bias"):  # rows in the file's order
        hf[name] = hf[name][back]
    weights = {k: v.float().contiguous().clone() for k, v in hf.items() if not (labels and k.startswith("cls."))}
    save_file(weights, os.path.join(to, "model.safetensors"), metadata={"format": "pt"})
    os.chmod(os.path.join(to, "model.safetensors"), os.stat(os.path.join(to, "config.json")).st_mode)  # not 600
    print(f"exported {folder} to {to}/; load it with transformers.{arch}.from_pretrained({to!r})")

def load_hf(folder):
    """A transformers BERT folder -> (state, tokenizer, config), as load_checkpoint gives: export_hf's inverse."""
    path = lambda name: os.path.join(folder, name)
    try:
        conf = json.loads(Path(path("config.json")).read_text())
        cfg = Config(**{ours: conf[theirs] for theirs, ours in HF_CONFIG.items()}, device="cpu",
                     max_len=min(Config.max_len, conf["max_position_embeddings"]))  # (fine-tuning's length)
        if os.path.isfile(path("model.safetensors")):
            from safetensors.torch import load_file
            hf = load_file(path("model.safetensors"))
        else:
            hf = torch.load(path("pytorch_model.bin"), map_location="cpu", weights_only=True)
    except Exception as e:  # missing, damaged, not a BERT's config
        die(f"cannot read the transformers BERT {folder} ({getattr(e, 'strerror', None) or f'{type(e).__name__}: {e}'})"
            "; it needs config.json, and model.safetensors or pytorch_model.bin")
    if other := [f"{k} {conf[k]}" for k, v in BERT_ONLY.items() if conf.get(k, v) != v]:
        die(f"{folder} holds another architecture ({', '.join(other)}); minibert computes BERT's: "
            + ", ".join(f"{k} {v}" for k, v in BERT_ONLY.items()))
    lowercase = True  # uncased, unless its tokenizer_config.json says otherwise (bert-base-cased)
    with suppress(OSError, ValueError, AttributeError):
        lowercase = json.loads(Path(path("tokenizer_config.json")).read_text()).get("do_lower_case", True)
    vocab = next((path(f) for f in ("vocab.txt", "tokenizer.json") if os.path.isfile(path(f))), None) or die(
        f"{folder} has no vocab.txt or tokenizer.json; put the model's vocabulary there")
    tok, order = load_tokenizer(vocab, lowercase)
    if tok.get_vocab_size() != cfg.vocab_size:
        die(f"{vocab} has {tok.get_vocab_size()} tokens, the model in {folder} {cfg.vocab_size}; put its own there")
    hf = {re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k)): v for k, v in hf.items()}  # TF-era names
    hf = {k if k.startswith(("bert.", "cls.", "classifier.")) else f"bert.{k}": v for k, v in hf.items()}  # BertModel
    if "cls.predictions.decoder.bias" in hf:  # the MLM bias is tied to the decoder's: saved under either name
        hf.setdefault("cls.predictions.bias", hf["cls.predictions.decoder.bias"])
    torch.manual_seed(0)
    sd = BERT(cfg).state_dict()  # what the folder lacks keeps these initial weights
    ours = {k: torch.cat([hf[t] for t in theirs]) for k, theirs in hf_pairs(cfg)  # export's renaming, backwards;
            if k in sd and all(t in hf for t in theirs)}  # (a classifier's head is not BERT's)
    lacks = {k: t[0].rsplit(".", 1)[0] for k, t in hf_pairs(cfg) if k in sd.keys() - ours - {"decoder.weight"}}
    if encoder := [v for k, v in lacks.items() if not k.startswith(("pool", "nsp_head", "mlm_", "decoder."))]:
        die(f"{folder} has no {', '.join(dict.fromkeys(encoder))}: not a BERT's weights")
    if lacks:
        print(f"note: {folder} has no {', '.join(dict.fromkeys(lacks.values()))}: random initial weights there "
              f"(std {cfg.init_std})")
    sd |= ours
    for name in ("tok_emb.weight", "decoder.bias"):  # rows in our order: the specials at 0..4
        sd[name] = sd[name][order] if order else sd[name]
    sd["decoder.weight"] = sd["tok_emb.weight"]  # tied
    return {"model": sd, "vocab_order": order, "hf": folder}, tok, cfg

def load_source(path):
    """--ckpt, --init: a minibert checkpoint, a transformers BERT folder or a hub name -> (state, tokenizer, config)"""
    if os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, "model.pt")):
        return load_hf(path)
    if not os.path.exists(path) and path.count("/") == 1 and not os.path.exists(path.split("/")[0]):  # a hub name
        try:
            from huggingface_hub import snapshot_download
            folder = snapshot_download(path, allow_patterns=["*.json", "vocab.txt", "*model.safetensors", "*model.bin"])
        except Exception as e:  # offline, no such model
            die(f"{path} is not a folder here, and the Hugging Face hub did not give it ({type(e).__name__}); offline, "
                "pass a folder: a minibert checkpoint, or a transformers BERT (config.json, weights, vocab.txt)")
        return load_hf(folder)
    return load_checkpoint(path)

# ----------------------------------------------------------------------------- command line

DEVICES = ["auto", "cuda", "cpu"]

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"minibert: error: {message} (see: python {self.prog} --help)\n")

def add_config_flags(p, names=None, defaults={}):
    """Each Config field (or those in names) becomes a flag of its name and type, its comment the help: no drift."""
    helps = dict(re.findall(r"^    (\w+): \w+ = .+?  # (.+)$", inspect.getsource(Config), re.M))
    for f in (f for f in dataclasses.fields(Config) if names is None or f.name in names.split()):
        h = f"{helps[f.name]} (default {defaults.get(f.name, f.default)})".replace("%", "%%")
        kind = (dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(choices=DEVICES)
                if f.name == "device" else dict(type=f.type, metavar=f.type.__name__.upper()))
        p.add_argument(f"--{f.name}", help=h, **kind)  # defaults: the help's, where a command's differs from Config's
    if names is None:
        presets = ", ".join(f"{k} ({n} x {h}, lr {lr:g})" for k, (n, h, lr, _) in PRESETS.items())
        p.add_argument("--preset", choices=list(PRESETS), help=f"model size and its learning rate: {presets}; "
                       "explicit flags (--layers, --lr, ...) win (default mini)")

RULES = [("layers hidden heads ffn max_position max_len batch_size grad_accum epochs lr log_every save_every",
          lambda v: 0 < v < math.inf, "must be positive and finite"),
         ("vocab_size", lambda v: v > len(SPECIALS), f"must exceed the {len(SPECIALS)} special tokens"),
         ("dropout short_seq_prob short_share warmup val_share beta2", lambda v: 0 <= v < 1, "must be in [0, 1)"),
         ("mask_prob init_std", lambda v: 0 < v < 1, "must be in (0, 1)"),
         ("max_steps budget weight_decay grad_clip", lambda v: 0 <= v < math.inf, "must be finite, not negative")]

def build_config(args, base=None, world=1):
    """Defaults (or base), then the preset, then each flag given; checked: a bad value is one line."""
    cfg = apply_preset(base or Config(), args.preset) if getattr(args, "preset", None) else base or Config()
    cfg = dataclasses.replace(cfg, **{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
                                      if getattr(args, f.name, None) is not None})
    for names, ok, rule in RULES:
        for name in (n for n in names.split() if not ok(getattr(cfg, n))):
            die(f"--{name} {rule}, not {getattr(cfg, name)}")
    if cfg.hidden % cfg.heads:
        die(f"--hidden {cfg.hidden} is not divisible by --heads {cfg.heads}")
    if not (low := 16 if cfg.short_share else 8) <= cfg.max_len <= cfg.max_position:  # --short_share halves max_len
        die(f"--max_len must be between {low}{' (--short_share halves it)' * (low > 8)} and --max_position "
            f"({cfg.max_position}), not {cfg.max_len}")
    if cfg.batch_size % (world * cfg.grad_accum):
        die(f"--batch_size {cfg.batch_size} must be a multiple of {world} process(es) x --grad_accum {cfg.grad_accum}")
    return dataclasses.replace(cfg, device=resolve_device(cfg.device))

def resolve_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        die("--device cuda, but torch sees no CUDA GPU; use --device cpu (or install a CUDA build of torch)")
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name

def writable(out):
    """Make --out and lock it: a second run there ends in one line. -> the lock file, for the caller to hold open."""
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(os.path.join(out, "lock"), "a+")
        with suppress(ImportError):  # (POSIX's flock, freed when this process ends however it ends; not on Windows)
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            lock.truncate(0), lock.write(str(os.getpid())), lock.flush()
    except BlockingIOError:
        die(f"--out {out} is in use by another run (process {lock.seek(0) or lock.read()}); wait, or pick a new --out")
    except OSError as e:
        die(f"cannot write to --out {out} ({e.strerror}); pick another folder with --out")
    return lock

# A new run on one CPU (each flag unless one of its group is given): the best of the README's table, measured on 2 cores
CPU_RECIPE = {"preset": ("tiny", ["layers", "hidden"]), "budget": (15, ["epochs", "max_steps"]), "max_len": (64, []),
              "batch_size": (64, ["max_len"]), "dropout": (0.0, []), "short_share": (0.9, []), "init_std": (0.06, [])}

def cmd_train(args):
    if "RANK" in os.environ:  # under torchrun: one process per GPU, NCCL between GPUs, gloo between CPUs
        cuda = args.device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    out, resume, saved, init, source = args.out or Config.out, None, None, None, None
    if args.resume:
        resume, tok, saved = load_checkpoint(out) if not args.init else die("--resume goes on with the run in --out, "
                                                                            "--init starts a new one: drop one of them")
        args.data = args.data or resume.get("data")  # the run's files (none: the hub's dataset)
        if "labels" in resume:  # (a fine-tuned model keeps no optimizer, no step)
            die(f"{out}/ holds a fine-tuned model, which cannot go on; --resume goes on with a train run's --out")
    elif os.path.exists(os.path.join(out, "model.pt")):
        die(f"{out}/ already holds a checkpoint; continue it with --resume, or pick a new folder with --out")
    if args.init:  # a new run from a pretrained BERT: its shape, weights and tokenizer; a new optimizer and schedule
        init, tok, source = load_source(args.init)
        weights = {k.removeprefix("bert."): v for k, v in init["model"].items() if not k.startswith("classifier")}
        init = {"model": weights, "vocab_order": init.get("vocab_order")}  # (a fine-tuned checkpoint: its BERT)
    if not saved and world == 1 and resolve_device(args.device or "auto") == "cpu":  # the CPU's own default recipe
        recipe = {k: v for k, v in CPU_RECIPE.items() if not (init and k in ("preset", "short_share", "init_std"))}
        chosen = {k: v for k, (v, more) in recipe.items() if all(getattr(args, f) is None for f in [k, *more])}
        vars(args).update(chosen)
        if chosen:
            print(f"recipe: on a CPU, {' '.join(f'--{k} {v}' for k, v in chosen.items())} (the README's table; mini's "
                  "40 epochs would take a day here); your own flags win")
    shape = "layers hidden heads ffn vocab_size max_position".split()
    base = source and dataclasses.replace(Config(), **{k: getattr(source, k) for k in shape + ["init_std"]})
    cfg = build_config(args, saved and dataclasses.replace(saved, device="auto") or base, world)  # the device: here
    for name in shape + "max_len seed val_share short_seq_prob".split() * bool(saved):  # the shape, and the pairs
        if (saved or source) and getattr(cfg, name) != getattr(saved or source, name):
            die(f"{f'--resume: the checkpoint in {out}/' if saved else f'--init {args.init}'} has {name} "
                f"{getattr(saved or source, name)}, not {getattr(cfg, name)}; drop --{name}"
                + " (or --preset)" * (name in ("layers", "hidden")))
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)[0] if not (resume or init) else die(
            f"{'--resume goes on with the run' if resume else '--init brings its'} own tokenizer; drop --tokenizer")
        if args.vocab_size not in (None, tok.get_vocab_size()):
            die(f"--tokenizer {args.tokenizer} has {tok.get_vocab_size()} tokens, not --vocab_size; drop --vocab_size")
    if cfg.budget and (args.max_steps or args.epochs):  # (a CPU run's default --budget 15 gives way to either)
        flag = "--max_steps" if args.max_steps else "--epochs"
        die(f"{flag} and --budget {cfg.budget:g} (yours or the run's) both set the length: pass one, or --budget 0")
    if cfg.budget and world > 1:
        die("--budget runs in one process (the ranks' clocks would disagree); under torchrun, use --max_steps")
    torch.backends.cuda.matmul.allow_tf32 = True  # on CUDA, for what autocast leaves in fp32
    t0 = time.time()
    train_docs, val_docs, note = held_out(args.data, cfg)
    lock = writable(cfg.out) if rank == 0 else None  # (held to the end)
    if resume is None and not args.tokenizer and not init:  # rank 0 trains the tokenizer (not deterministic), sends it
        tok = [train_tokenizer((s for d in train_docs for s in d), cfg.vocab_size).to_str() if rank == 0 else None]
        if world > 1:
            dist.broadcast_object_list(tok, 0)
        tok = Tokenizer.from_str(tok[0])
    cfg = dataclasses.replace(cfg, vocab_size=tok.get_vocab_size())  # (a resumed run's: the same)
    # (rank 0 writes the cache, and only for a new run: a resume with other text must not leave one in the run's folder)
    corpus, cached, digest = cached_corpus(tok, train_docs + val_docs, cfg.out, save=rank == 0 and resume is None)
    if resume and resume.get("data_hash", digest) != digest:
        die(f"--resume: this text is not the run's ({' '.join(resume.get('data') or [cfg.dataset])}); pass the run's "
            "--data, unchanged")
    n = len(train_docs)
    val_pairs = make_pairs(corpus, range(n, n + len(val_docs)), cfg.max_len, cfg.seed + 1,
                           cfg.short_seq_prob)[:VAL_PAIRS]
    pairs0 = pairs_or_die(corpus, range(n), cfg, cfg.seed)  # A and IsNext's B: distinct tokens, in place
    cover = float(pairs0[:, 1].sum() + pairs0[:, 3][pairs0[:, 4] == 0].sum()) / int(corpus.sents[corpus.docs[n]])
    unk = (corpus.ids == UNK).sum().item() / len(corpus.ids)  # a hand-made --tokenizer's vocabulary may lack words
    if rank == 0:
        print(f"data: {time.time() - t0:.1f} s{' (corpus cached)' * cached} | "
              f"{n} documents{note} and {len(val_docs)} held out, {len(corpus.ids):,} tokens in all, an epoch's "
              f"pairs use {cover:.0%} of the training tokens, {len(val_pairs)} pairs held out | vocabulary "
              f"{tok.get_vocab_size()}\nconfig: {json.dumps(dataclasses.asdict(cfg))}")
        for why in [f"an epoch's pairs use only {cover:.0%} of the training tokens: a document of one sentence is only "
                    "a NotNext partner; give documents of several sentences"] * (cover < 0.5) + [
                    "no pairs are held out (that needs 8 documents or more, and --val_share > 0): nothing evaluates "
                    "this run"] * (not len(val_pairs)) + [f"{unk:.0%} of the tokens are [UNK]: --tokenizer lacks this "
                    "text's words; drop it (a new one is trained on the text)"] * (unk > 0.05 and bool(args.tokenizer)):
            print(f"warning: {why}", file=sys.stderr)
    train(cfg, tok, corpus, range(n), val_pairs if len(val_pairs) else None, resume, pairs0=pairs0, init=init,
          meta={"data": args.data and [os.path.abspath(p) for p in args.data], "data_hash": digest,
                "init": args.init or (resume or {}).get("init"),
                "vocab_order": (resume or init or {}).get("vocab_order")})

def cmd_demo(args):
    model, tok, cfg, state = load_model(args.ckpt, resolve_device(args.device))
    if "labels" in state:  # a classifier: each label's probability; regression: the predicted number
        if len(args.text) != len(state["columns"]) - 1:  # its text columns: one, or a pair
            die(f"this model reads {len(state['columns']) - 1} text(s) ({' + '.join(state['columns'][:-1])}), not "
                f"{len(args.text)}: put each text in quotes")
        rows, cut = encode_rows(tok, [(tuple(args.text), 0)], cfg.max_len)
        if cut:  # (as fine-tuning cut its rows)
            print(f"warning: the text is cut to the model's {cfg.max_len} tokens", file=sys.stderr)
        with torch.no_grad():
            out = model(*padded(rows, model.classifier.bias.device)[:2])[0].float()  # (labels,)
        if state.get("task") == "regression":
            return print(f"{state['labels'][0]} {out[0]:.3f}")
        return print("  ".join(f"{name} {p:.3f}" for name, p in zip(state["labels"], out.softmax(-1).tolist())))
    text = re.sub(r"\[mask\]", "[MASK]", " ".join(args.text), flags=re.IGNORECASE)  # [mask] is meant too
    if "[MASK]" not in text:
        die('the text has no [MASK]; try: python minibert.py demo "the [MASK] sat on the mat ."')
    if (n := len(tok.encode(text).ids)) > cfg.max_len:
        die(f"the text is {n} tokens, more than the model's {cfg.max_len}; shorten it around its [MASK]s")
    for i, g in enumerate(fill_mask(model, tok, text, args.top_k)):
        print(f"[MASK] {i + 1}: " + "  ".join(f"{w} {p:.3g}" for w, p in g))

def cmd_eval(args):
    model, tok, cfg, state = load_model(args.ckpt, device := resolve_device(args.device))
    if "labels" in state:  # a classifier: its scores on each labelled file, a line each
        cols, label = args.text_cols or state["columns"][:-1], args.label_col or state["columns"][-1]
        if not args.data or len(cols) != len(state["columns"]) - 1:
            die(f"{args.ckpt} is fine-tuned on the columns {', '.join(state['columns'])}: pass --data FILE ... with "
                "them (else --text_cols, as many, and --label_col)")
        for path in args.data:
            rows = read_labelled(path, cols, label, state["labels"], state.get("task", "classification"))[0]
            m = evaluate_classifier(model, encode_rows(tok, rows, cfg.max_len)[0], device)
            print(json.dumps({"data": path, "examples": len(rows), **m}) if args.json else
                  f"{path}: {len(rows)} examples | {scores(m)}")
        return
    if args.text_cols or args.label_col:
        die(f"--text_cols and --label_col are for a fine-tuned model; {args.ckpt} is pretrained: drop them")
    every = dataclasses.replace(cfg, val_share=0)  # --data: all of it (one document cut in parts, as train cuts it)
    docs = held_out(args.data, every)[0] if args.data else held_out(state.get("data"), cfg)[1]  # else train's held-out
    corpus = cached_corpus(tok, docs, args.ckpt, save="hf" not in state)[0]  # (not into a transformers folder)
    pairs = pairs_or_die(corpus, range(len(docs)), cfg, cfg.seed + 1)[: None if args.data else VAL_PAIRS]
    m = {**evaluate(model, corpus.ids.to(device), pairs.to(device), cfg), "pairs": len(pairs)}
    print(json.dumps(m) if args.json else f"{len(pairs)} pairs | mlm_loss {m['mlm_loss']:.4f} | "
          f"mlm_acc {m['mlm_acc']:.4f} | nsp_acc {m['nsp_acc']:.4f} | top_share {m['top_share']:.2f}")

FINETUNE = dict(epochs=3, batch_size=32, dropout=0.1, warmup=0.1, val_share=0.1, log_every=100, grad_accum=1,
                max_steps=0, budget=0, short_share=0, compile=False, init_std=0.02)  # --scratch: BERT's init

def cmd_finetune(args):
    state, tok, saved = load_source(args.ckpt)
    if "labels" in state:
        die(f"{args.ckpt} holds a fine-tuned classifier; pass a pretrained checkpoint (train's --out)")
    lr = next((v[3] for v in PRESETS.values() if v[:2] == (saved.layers, saved.hidden)), 1e-4)  # the preset's rate
    cfg = build_config(args, dataclasses.replace(saved, lr=lr, device="auto", out="finetuned", **FINETUNE))
    if os.path.exists(os.path.join(cfg.out, "model.pt")):
        die(f"{cfg.out}/ already holds a checkpoint; pick a new folder with --out")
    label = args.label_col or "label"
    rows, names, cols, skipped, task = read_labelled(args.data, args.text_cols, label, task=args.task)
    values = sorted({y for _, y in rows})  # label ids, or numbers
    if len(values) < 2:
        die(f"{args.data} has one label only ({names[values[0]] if task == 'classification' else values[0]}); "
            "fine-tuning needs two or more")
    rows, held = (rows, read_labelled(args.val, cols, label, names, task)[0]) if args.val else split_docs(rows, cfg)
    if not held:  # (split_docs: a seeded share of the rows, if there are 8 or more)
        die(f"--val_share is 0; pass --val FILE, or --val_share 0.1" if not cfg.val_share else
            f"{args.data} has {len(rows)} labelled rows, too few to hold some out (8 or more); pass --val FILE")
    (rows, cut), (held, cut_held) = encode_rows(tok, rows, cfg.max_len), encode_rows(tok, held, cfg.max_len)
    what = f"labels {', '.join(names)}"  # or, for regression, the range of the numbers
    what = f"regression: {label} {values[0]:g} to {values[-1]:g}" if task == "regression" else what
    print(f"data: {len(rows)} training and {len(held)} held-out examples | {what} | text {' + '.join(cols)} | "
          f"{cut + cut_held} cut to {cfg.max_len} tokens | {skipped} rows skipped (a field empty or missing, or a "
          f"header again)\n{'random initialisation (--scratch)' if args.scratch else f'from {args.ckpt}'} | config: "
          f"{json.dumps(dataclasses.asdict(cfg))}")
    torch.manual_seed(cfg.seed)
    model = Classifier(cfg, len(names))
    if not args.scratch:
        load_weights(model.bert, state, args.ckpt)
    lock = writable(cfg.out)  # (held to the end)
    finetune(cfg, model, tok, rows, held, {"labels": names, "columns": [*cols, label], "task": task,
                                           "vocab_order": state.get("vocab_order")})  # (export: the file's order)

def cmd_bench(args):
    r = bench(build_config(args), args.steps)
    print(f"{r['device']}: {r['ms_per_step']:.1f} ms/step | {r['tokens_per_s']:,.0f} tokens/s | MFU {r['mfu']:.1%} "
          f"({r['peak_note']}) | batch {r['batch_size']} x {r['max_len']} | warm-up {r['warmup_s']:.1f} s")

def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)  # log lines show up at once, also in a file
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl-C: temporary files are removed
    p = Parser(prog="minibert.py", description="BERT pretraining from scratch, in one file.", allow_abbrev=False)
    sub = p.add_subparsers(dest="cmd", parser_class=Parser)
    commands = {"train": (cmd_train, "pretrain (a hub dataset, or --data FILE)"),
                "bench": (cmd_bench, "time the training step on synthetic batches"),
                "demo": (cmd_demo, "fill in the [MASK]s of a sentence"),
                "eval": (cmd_eval, "MLM loss/accuracy and NSP accuracy on a text"),
                "export": (lambda a: export_hf(a.ckpt, a.to), "write a Hugging Face transformers folder"),
                "finetune": (cmd_finetune, "fine-tune a checkpoint to classify or score (regression) texts or pairs")}
    t, b, d, e, x, f = (sub.add_parser(name, allow_abbrev=False, help=h) for name, (_, h) in commands.items())
    for q in (t, b):
        add_config_flags(q)
    for q, default in ((t, "the hub dataset, --dataset"), (e, "the run's held-out documents")):
        q.add_argument("--data", nargs="+", action="extend", metavar="FILE",
                       help=f"text files or folders, repeatable. {DOCUMENTS} (default {default})")
    t.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out")
    t.add_argument("--tokenizer", metavar="FILE", help="the tokenizer of a checkpoint, a tokenizer.json or vocab.txt")
    t.add_argument("--init", metavar="DIR", help="start from a pretrained BERT's weights and tokenizer: a minibert "
                   "checkpoint, a transformers BERT folder, or a hub name (online)")
    b.add_argument("--steps", type=int, default=20, help="timed steps, after 5 warm-up steps (default 20)")
    d.add_argument("text", nargs="+", help="a text with [MASK]s; for a classifier, a text or two (a pair)")
    d.add_argument("--top_k", type=int, default=5, help="guesses per [MASK] (default 5)")
    x.add_argument("--to", required=True, metavar="DIR")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    add_config_flags(f, "lr epochs batch_size dropout warmup beta2 weight_decay grad_clip grad_accum val_share seed "
                     "log_every max_len device out", {**FINETUNE, "lr": "the preset's: " + ", ".join(
                         f"{k} {v[3]:g}" for k, v in PRESETS.items()), "out": "finetuned"})
    f.add_argument("--data", required=True, metavar="FILE", help="labelled texts: .tsv, .csv (a header row, as "
                   "GLUE's), .jsonl, .json or .parquet")
    f.add_argument("--val", metavar="FILE", help="held-out data, as --data (default: --val_share of --data's rows)")
    for q in (e, f):  # (eval: of a fine-tuned model, whose files may name their columns otherwise)
        q.add_argument("--text_cols", nargs="+", metavar="COL", help="the text column, or two (default: by name)")
        q.add_argument("--label_col", metavar="COL", help="the label column (default label; eval: the model's)")
    f.add_argument("--task", choices=["classification", "regression"], help="default: regression if the labels are "
                   "all numbers, not all integers (STS-B: one output, squared error), else classification")
    f.add_argument("--scratch", action="store_true", help="random weights: the baseline for what pretraining buys")
    for q in (d, e, x, f):
        q.add_argument("--ckpt", default="out", metavar="DIR", help="a checkpoint, a transformers BERT folder or hub "
                       "name (default out)")
    for q in (d, e):
        q.add_argument("--device", choices=DEVICES, default="auto")
    args = p.parse_args(argv)
    if args.cmd is None:
        p.exit(2, p.format_help())  # (on stderr)
    for name in ("top_k", "steps"):
        if getattr(args, name, 1) < 1:
            die(f"--{name} must be positive, not {getattr(args, name)}")
    if len(getattr(args, "text_cols", None) or ()) > 2:
        die(f"--text_cols takes a text column or two (a pair), not {len(args.text_cols)}")
    try:
        commands[args.cmd][0](args)
    except KeyboardInterrupt:
        p.exit(130, "\nminibert: interrupted\n")
    except RuntimeError as e:  # CUDA out of memory (a RuntimeError), or the CPU allocator
        if not isinstance(e, torch.cuda.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        die("out of memory; raise --grad_accum (the same batch in smaller pieces), or lower --batch_size or --max_len")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

if __name__ == "__main__":
    main()
