"""
minibert: BERT pretraining from scratch, in one file of plain PyTorch.

The recipe of Devlin et al. (2018): a WordPiece vocabulary, [CLS] A [SEP] B [SEP] sentence
pairs, token + position + segment embeddings, a post-LayerNorm Transformer encoder, and two
heads trained jointly with their losses summed: masked-language modelling (MLM) and
next-sentence prediction (NSP). The weights map one to one onto Hugging Face's
BertForPreTraining (see `export`).

    python minibert.py train --device cuda            # WikiText-2 from the Hugging Face hub
    python minibert.py train --data wiki.txt          # offline: any text file
    python minibert.py demo "the [MASK] sat on the mat ."

Left out on purpose: multi-GPU and multi-node training, gradient accumulation, a Trainer
class with callbacks, output objects, head pruning, cross-attention and key/value caches,
whole-word masking, and fine-tuning heads (export to transformers for those).

References: Devlin et al. 2018, "BERT" (arXiv:1810.04805); Turc et al. 2019, "Well-Read
Students Learn Better" (the size presets); google-research/bert create_pretraining_data.py.
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# ----------------------------------------------------------------------------- config


@dataclass
class Config:
    # model: the preset sets the first four (the defaults are "mini")
    layers: int = 4  # Transformer encoder layers
    hidden: int = 256  # hidden size H, in features
    heads: int = 4  # attention heads nh; head size hs = H / nh = 64
    ffn: int = 1024  # feed-forward inner size, in features (4 H)
    vocab_size: int = 16384  # WordPiece vocabulary V, in tokens (a small corpus may give fewer)
    max_position: int = 512  # learned position embeddings, in tokens
    dropout: float = 0.1  # on the embeddings, the attention probabilities and each residual branch
    # data
    max_len: int = 128  # tokens per training sequence, [CLS] and both [SEP] included
    short_seq_prob: float = 0.1  # share of pairs built to a random shorter length, as in the paper's code
    mask_prob: float = 0.15  # share of the real tokens of each sequence chosen for MLM
    val_share: float = 0.1  # share of the --data documents held out for evaluation, by document
    # training
    batch_size: int = 32  # sequences per step
    epochs: int = 3  # passes over the training pairs
    max_steps: int = 0  # if > 0: the run's length in steps, instead of epochs
    lr: float = 5e-4  # peak learning rate, per step
    warmup: float = 0.1  # share of the steps spent warming the learning rate up linearly from 0
    weight_decay: float = 0.01  # AdamW decay on weight matrices (not on biases and LayerNorm)
    grad_clip: float = 1.0  # maximum global gradient norm
    seed: int = 1337  # for pairs, data order, masks, dropout and initialisation
    log_every: int = 10  # steps between log lines
    save_every: int = 500  # steps between checkpoints (also at each epoch's end and at the end)
    device: str = "auto"  # auto, cuda or cpu
    compile: bool = False  # torch.compile the model (CUDA)
    out: str = "out"  # checkpoint folder


# after Turc et al. 2019: (layers, hidden); heads = hidden / 64, ffn = 4 hidden
PRESETS = {"tiny": (2, 128), "mini": (4, 256), "small": (4, 512), "medium": (8, 512), "base": (12, 768)}
SHAPE = ("layers", "hidden", "heads", "ffn", "vocab_size", "max_position")  # fields the weights depend on


def apply_preset(cfg, name):
    layers, hidden = PRESETS[name]
    return dataclasses.replace(cfg, layers=layers, hidden=hidden, heads=hidden // 64, ffn=4 * hidden)


def die(msg):
    """Bad input ends here: one line on stderr that says what to do, and exit status 1."""
    sys.exit(f"minibert: error: {msg}")


# ----------------------------------------------------------------------------- tokenizer

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # their ids are 0..4, in this order
PAD, UNK, CLS, SEP, MASK = range(len(SPECIALS))


def train_tokenizer(sentences, vocab_size):
    """BERT's uncased WordPiece: lower-case and strip accents, split on spaces and punctuation."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")  # "play ##ing" -> "playing"
    tok.train_from_iterator(sentences, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False))
    # encode(text) adds [CLS] ... [SEP] as BERT does; training builds its own pairs from ids
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)]
    )
    return tok


# ----------------------------------------------------------------------------- corpus
# A corpus is a list of documents, a document a list of sentences. WikiText-2 has 600 train
# articles (~2.1M words); with the default tokenizer they give ~19k pairs of <= 128 tokens.

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")  # ". The" ends a sentence
WIKI_DETOK = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), ("<unk>", "[UNK]")]


def is_title(s):  # " = Title = " starts an article; " = = Section = = " is a heading
    return s.startswith("= ") and s.endswith(" =") and not s.startswith("= =")


def parse_wikitext(lines):
    """WikiText layout -> documents. A file without title lines: blank lines separate documents."""
    lines = [line.strip() for line in lines]
    titled = any(is_title(s) for s in lines)
    docs, doc = [], []
    for s in lines + [""]:
        if (titled and is_title(s)) or (not titled and not s):
            docs.append(doc)
            doc = []
        elif s and not s.startswith("="):  # headings are not sentences
            for a, b in WIKI_DETOK:
                s = s.replace(a, b)
            doc.extend(SENTENCE_END.split(s))
    docs.append(doc)
    return [d for d in docs if d]


def read_cornell(folder):
    """Cornell Movie-Dialogs: each conversation is a document, each utterance a sentence."""
    def fields(name):
        with open(os.path.join(folder, name), encoding="iso-8859-1") as f:
            return [line.rstrip("\n").split(" +++$+++ ") for line in f]
    lines = {r[0]: r[4].strip() for r in fields("movie_lines.txt") if len(r) == 5}
    docs = []
    for r in fields("movie_conversations.txt"):
        ids = re.findall(r"L\d+", r[-1])
        docs.append([lines[i] for i in ids if lines.get(i)])
    return [d for d in docs if d]


def read_corpus(paths):
    """--data FILE [FILE ...] -> documents. A folder must be the Cornell corpus."""
    docs = []
    for path in paths:
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "movie_lines.txt")):
                die(f"--data {path} is a folder; pass a text file (or the Cornell Movie-Dialogs folder)")
            docs += read_cornell(path)
            continue
        try:
            with open(path, encoding="utf-8") as f:
                docs += parse_wikitext(f.read().splitlines())
        except FileNotFoundError:
            die(f"--data {path} does not exist; pass a UTF-8 text file")
        except UnicodeDecodeError:
            die(f"--data {path} is not UTF-8 text; convert it first (iconv -t utf-8)")
        except OSError as e:
            die(f"cannot read --data {path}: {e.strerror}")
    if not docs:
        die(f"--data {' '.join(paths)} holds no text; pass a file with sentences in it")
    return docs


def load_wikitext(split_names=("train", "validation")):
    """WikiText-2 (raw) from the Hugging Face hub, or a one-line error that points to --data."""
    try:
        import datasets
        import huggingface_hub
        datasets.logging.set_verbosity_error()  # no retry-by-retry log when the hub is unreachable
        huggingface_hub.logging.set_verbosity_error()
        ds = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1")
    except Exception as e:  # no network, no hub, no datasets: all end the same way
        die(f"cannot load WikiText-2 from the Hugging Face hub ({type(e).__name__}); offline, pass --data FILE")
    return [parse_wikitext(ds[s]["text"]) for s in split_names]


def encode_docs(tok, docs):
    """Tokenize every sentence once, in one parallel batch; drop empty sentences and documents."""
    flat = [s for d in docs for s in d]
    ids = [e.ids for e in tok.encode_batch_fast(flat, add_special_tokens=False)]
    out, i = [], 0
    for d in docs:
        sents = [s for s in ids[i : i + len(d)] if s]
        i += len(d)
        if sents:
            out.append(sents)
    return out


def make_pairs(docs, max_len, seed, short_seq_prob=0.1):
    """(A, B, label) pairs from documents of tokenized sentences, as google-research/bert does.

    Sentences are gathered until they fill the sequence; A is a random-length prefix of that
    chunk. Label 0 (IsNext): B is the rest of the chunk. Label 1 (NotNext): B is a run of
    sentences from another document, and the unused rest of the chunk goes back to the pool.
    Unlike the paper's code, a chunk always holds at least two sentences and the labels come
    from a shuffled deck, so the classes are balanced to within one pair.
    """
    if len(docs) < 2:  # NotNext needs another document
        return []
    rng = random.Random(seed)
    max_tokens = max_len - 3  # room for [CLS], [SEP], [SEP]
    pairs, deck = [], []
    for d, doc in enumerate(docs):
        target = rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens
        chunk, n, i = [], 0, 0
        while i < len(doc):
            chunk.append(doc[i])
            n += len(doc[i])
            if (n >= target and len(chunk) >= 2) or i == len(doc) - 1:
                if len(chunk) >= 2:  # a last lone sentence is only used as a NotNext B
                    cut = rng.randint(1, len(chunk) - 1)
                    a = [t for s in chunk[:cut] for t in s]
                    deck = deck or rng.sample([0, 1], 2)
                    label = deck.pop()
                    if label == 0:
                        b = [t for s in chunk[cut:] for t in s]
                    else:
                        b = random_segment(docs, d, max(1, target - len(a)), rng)
                        i -= len(chunk) - cut  # put the unused sentences back
                    truncate_pair(a, b, max_tokens, rng)
                    pairs.append((a, b, label))
                chunk, n = [], 0
                target = rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens
            i += 1
    return pairs


def random_segment(docs, d, target, rng):
    """Consecutive sentences from a random document other than d, at least target tokens long."""
    other = rng.randrange(len(docs) - 1)
    doc = docs[other + (other >= d)]  # skip d itself
    seg = []
    for s in doc[rng.randrange(len(doc)) :]:
        seg += s
        if len(seg) >= target:
            break
    return seg


def truncate_pair(a, b, max_tokens, rng):
    """Trim the longer of A and B one token at a time, at a random end, until they fit."""
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        del longer[0 if rng.random() < 0.5 else -1]


def collate(pairs, pad_to=1):
    """Pairs -> padded tensors. Padded to the longest sequence (rounded up to pad_to)."""
    T = max(len(a) + len(b) + 3 for a, b, _ in pairs)
    T = -(-T // pad_to) * pad_to
    ids = torch.full((len(pairs), T), PAD, dtype=torch.long)  # (B, T)
    seg = torch.zeros_like(ids)  # (B, T) 0 for [CLS] A [SEP], 1 for B [SEP]
    for i, (a, b, _) in enumerate(pairs):
        n = len(a) + len(b) + 3
        ids[i, :n] = torch.tensor([CLS, *a, SEP, *b, SEP])
        seg[i, len(a) + 2 : n] = 1
    nsp = torch.tensor([label for _, _, label in pairs])  # (B,) 0 = IsNext, 1 = NotNext
    return ids, seg, nsp


# ----------------------------------------------------------------------------- masking


def mask_tokens(ids, vocab_size, gen, mask_prob=0.15):
    """BERT's MLM corruption for a whole batch, drawn fresh every time it is called.

    Exactly round(15 %) of each sequence's real tokens are chosen ([CLS], [SEP] and [PAD]
    never are). Of those, 80 % become [MASK], 10 % a random token and 10 % stay: the model
    must keep a good representation of every token, since it can't tell which were changed,
    and [MASK] never appears at fine-tuning time. Labels are -100 (ignored) elsewhere.
    """
    B, T = ids.shape  # batch, sequence length
    real = (ids != PAD) & (ids != CLS) & (ids != SEP)  # (B, T)
    n_real = real.sum(1)  # (B,)
    k = (n_real * mask_prob).round().clamp(min=1).minimum(n_real)  # (B,) tokens to choose per row
    score = torch.rand(B, T, generator=gen).masked_fill(~real, 2.0)  # specials sort last
    chosen = score.argsort(1).argsort(1) < k[:, None]  # (B, T) the k lowest scores of each row
    labels = ids.masked_fill(~chosen, -100)
    r = torch.rand(B, T, generator=gen)
    inputs = ids.masked_fill(chosen & (r < 0.8), MASK)
    rand = chosen & (r >= 0.8) & (r < 0.9)
    random_ids = torch.randint(len(SPECIALS), vocab_size, (B, T), generator=gen)  # never special
    inputs = torch.where(rand, random_ids, inputs)
    return inputs, labels


def make_batch(pairs, vocab_size, gen, mask_prob=0.15, pad_to=1):
    ids, seg, nsp = collate(pairs, pad_to)
    inputs, labels = mask_tokens(ids, vocab_size, gen, mask_prob)
    return inputs, seg, labels, nsp


# ----------------------------------------------------------------------------- model


def dropout(x, p, training):
    """F.dropout, with a cheaper mask on the CPU. torch's CPU bernoulli_ draws one random number at a
    time (~8 ns each); here each 64-bit draw is cut into four 16-bit ones, each kept when >= a
    threshold: P(keep) = 1 - p to within 2^-16, 2.5x faster, and seeded by torch's generator as usual."""
    if not training or p == 0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1).view(torch.int16)
    keep = bits[:n].view(x.shape) >= round(p * 65536) - 32768
    return torch.where(keep, x * (1 / (1 - p)), 0.0)


class Embeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.pos = nn.Embedding(cfg.max_position, cfg.hidden)  # learned, not sinusoidal
        self.seg = nn.Embedding(2, cfg.hidden)  # sentence A or B
        self.ln = nn.LayerNorm(cfg.hidden, eps=1e-12)
        self.p = cfg.dropout

    def forward(self, ids, seg):
        T = ids.size(1)
        x = self.tok(ids) + self.pos.weight[:T] + self.seg(seg)  # (B, T, H)
        return dropout(self.ln(x), self.p, self.training)


class SelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.nh, self.p = cfg.heads, cfg.dropout
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)  # query, key, value in one matmul
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x, mask, xq=None):
        """xq: the positions that ask (default: all of x); keys and values come from all of x."""
        B, T, H = x.shape  # batch, sequence length, hidden size
        if xq is None:
            xq = x
            q, k, v = self.qkv(x).split(H, dim=2)  # 3 x (B, T, H)
        else:  # the same weights, the query rows apart
            q = F.linear(xq, self.qkv.weight[:H], self.qkv.bias[:H])  # (B, Tq, H)
            k, v = F.linear(x, self.qkv.weight[H:], self.qkv.bias[H:]).split(H, dim=2)  # 2 x (B, T, H)
        Tq, hs = xq.size(1), H // self.nh  # query positions, head size
        q = q.view(B, Tq, self.nh, hs).transpose(1, 2)  # (B, nh, Tq, hs)
        k, v = (t.view(B, T, self.nh, hs).transpose(1, 2) for t in (k, v))  # (B, nh, T, hs)
        p = self.p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, nh, Tq, hs)
        return self.proj(y.transpose(1, 2).reshape(B, Tq, H))  # (B, Tq, H)


class Layer(nn.Module):
    """Post-LayerNorm, as in the paper: each sublayer's output is added, then normalised."""

    def __init__(self, cfg):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.ln1 = nn.LayerNorm(cfg.hidden, eps=1e-12)
        self.fc1 = nn.Linear(cfg.hidden, cfg.ffn)
        self.fc2 = nn.Linear(cfg.ffn, cfg.hidden)
        self.ln2 = nn.LayerNorm(cfg.hidden, eps=1e-12)
        self.p = cfg.dropout

    def forward(self, x, mask, idx=None):
        """idx (B, Tq): compute the output at these positions only (default: all)."""
        xq = None if idx is None else x.gather(1, idx[:, :, None].expand(-1, -1, x.size(2)))  # (B, Tq, H)
        x = self.ln1((x if xq is None else xq) + dropout(self.attn(x, mask, xq), self.p, self.training))  # (B, Tq, H)
        h = self.fc2(F.gelu(self.fc1(x)))  # (B, T, H); exact erf GELU, as in the paper's code
        return self.ln2(x + dropout(h, self.p, self.training))  # (B, T, H)


class DecoderCrossEntropy(torch.autograd.Function):
    """The MLM decoder and its mean cross-entropy in one step: (h, W, b, target) -> (loss, predictions).

    Two savings over F.cross_entropy(F.linear(h, W, b), target), both about the (M, V) logits:
    the gradient w.r.t. the logits is simply softmax - onehot, computed in place in one pass (no
    zero-filled (M, V) gradient to scatter into); and the rows go in chunks of 256, so that no
    tensor exceeds the 32 MB beyond which glibc hands out fresh, page-faulting memory every call.
    """

    @staticmethod
    def forward(ctx, h, W, b, target, chunk=256):
        loss, preds, logps = 0.0, [], []
        for i in range(0, len(h), chunk):
            logits = F.linear(h[i : i + chunk], W, b)  # (chunk, V)
            preds.append(logits.argmax(-1))
            logps.append(logits.float().log_softmax(-1))  # (chunk, V)
            loss = loss - logps[-1].gather(1, target[i : i + chunk, None]).sum()
        ctx.chunk = chunk
        ctx.save_for_backward(h, W, target, *logps)
        preds = torch.cat(preds)
        ctx.mark_non_differentiable(preds)
        return loss / len(h), preds

    @staticmethod
    def backward(ctx, grad_loss, _):
        h, W, target, *logps = ctx.saved_tensors
        s = grad_loss / len(h)  # the mean's 1/M, applied to the small operands
        dh, dW, db = torch.empty(h.shape, dtype=torch.float32, device=h.device), None, 0
        for i, logp in zip(range(0, len(h), ctx.chunk), logps):
            d = logp.exp_()  # (chunk, V) softmax, in place: the saved log-probabilities are used up,
            # so this graph can be backpropagated once only (no retain_graph)
            d[torch.arange(len(d)), target[i : i + len(d)]] -= 1  # minus the one-hot target
            hs = h[i : i + len(d)].float() * s  # (chunk, H)
            dh[i : i + len(d)] = d @ W.float() * s
            dW = d.t() @ hs if dW is None else dW.addmm_(d.t(), hs)  # (V, H), accumulated in the matmul
            db = db + d.sum(0) * s
        return dh, dW, db, None, None


class BERT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.emb = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.layers))
        self.pool = nn.Linear(cfg.hidden, cfg.hidden)  # tanh "pooler" on [CLS]
        self.nsp = nn.Linear(cfg.hidden, 2)  # IsNext / NotNext
        self.mlm_dense = nn.Linear(cfg.hidden, cfg.hidden)
        self.mlm_ln = nn.LayerNorm(cfg.hidden, eps=1e-12)
        self.decoder = nn.Linear(cfg.hidden, cfg.vocab_size)  # with its own bias, but ...
        self.apply(self._init)
        self.decoder.weight = self.emb.tok.weight  # ... its weight *is* the input embedding (tied)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)

    def encode(self, ids, seg, idx=None):
        """-> hidden states (B, T, H); or (B, Tq, H) at positions idx, which the last layer alone
        computes: its outputs elsewhere are never read, but its keys and values need every token."""
        mask = (ids != PAD)[:, None, None, :]  # (B, 1, 1, T) keys a query may attend to
        x = self.emb(ids, seg)  # (B, T, H)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, idx if i == len(self.layers) - 1 else None)
        return x

    def mlm_transform(self, x):
        return self.mlm_ln(F.gelu(self.mlm_dense(x)))  # (..., H)

    def forward(self, ids, seg, mlm_labels=None, nsp_labels=None):
        """Without labels: MLM logits (B, T, V) and NSP logits (B, 2), for the demo and export.
        With labels: the MLM predictions (M,) at the M masked positions (row-major order), NSP
        logits, and the two losses. Training runs the MLM head at the masked positions only: the
        V-wide decoder is the largest matmul of a small BERT, and 85 % of its output is unused.
        Losses and gradients are exactly those of the full computation (the tests check both).
        """
        if mlm_labels is None:
            x = self.encode(ids, seg)  # (B, T, H)
            nsp_logits = self.nsp(torch.tanh(self.pool(x[:, 0])))  # (B, 2)
            return self.decoder(self.mlm_transform(x)), nsp_logits, None, None  # (B, T, V)
        # Training reads the last layer at [CLS] and the ~15 % masked positions only, so it runs
        # there only: idx lists [CLS] first, then each row's masked positions in order, padded.
        chosen = mlm_labels != -100  # (B, T)
        Tq = 1 + int(chosen.sum(1).max())  # query positions of the last layer
        key = chosen.float() + 2 * (torch.arange(ids.size(1), device=ids.device) == 0)  # [CLS] 2, masked 1
        idx = key.argsort(dim=1, descending=True, stable=True)[:, :Tq]  # (B, Tq)
        x = self.encode(ids, seg, idx)  # (B, Tq, H)
        nsp_logits = self.nsp(torch.tanh(self.pool(x[:, 0])))  # (B, 2)
        sel = chosen.gather(1, idx)  # (B, Tq) which of the slots are masked positions
        h = self.mlm_transform(x[sel])  # (M, H), in the row-major order of labels[labels != -100]
        mlm_loss, mlm_pred = DecoderCrossEntropy.apply(h, self.decoder.weight, self.decoder.bias, mlm_labels[chosen])
        nsp_loss = F.cross_entropy(nsp_logits.float(), nsp_labels)
        return mlm_pred, nsp_logits, mlm_loss, nsp_loss


# ----------------------------------------------------------------------------- training


def lr_at(step, total, cfg):
    """Linear warm-up over the first `warmup` share of the steps, then linear decay to 0."""
    warm = max(1, int(cfg.warmup * total))
    return cfg.lr * min((step + 1) / warm, max(0.0, (total - step) / max(1, total - warm)))


def make_optimizer(model, cfg, device):
    decay = [p for p in model.parameters() if p.dim() >= 2]  # weight matrices and embeddings
    other = [p for p in model.parameters() if p.dim() < 2]  # biases and LayerNorm gains
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-6, fused=True)


def compile_layers(model, cfg):
    """--compile: torch.compile each encoder layer, in place (the state dict keeps its names). The
    data-dependent gathers around them stay eager; the last layer's varying shapes compile once, dynamic."""
    if cfg.compile:
        for layer in model.layers:
            layer.compile()


def autocast(device):  # bf16 on CUDA; the CPU stays in fp32 (its bf16 matmuls are far slower)
    if device.type != "cuda":
        return nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = True  # for what autocast leaves in fp32
    return torch.autocast("cuda", dtype=torch.bfloat16)


def to_device(batch, device):
    pin = device.type == "cuda"
    return [t.pin_memory().to(device, non_blocking=True) if pin else t for t in batch]


@torch.no_grad()
def evaluate(model, pairs, cfg, device, batch_size=64):
    """MLM loss and accuracy, NSP accuracy over pairs; a fixed seed masks the same every time."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    mlm_loss = mlm_hits = n_mlm = nsp_hits = 0
    for i in range(0, len(pairs), batch_size):
        ids, seg, labels, nsp = to_device(make_batch(pairs[i : i + batch_size], cfg.vocab_size, gen, cfg.mask_prob), device)
        with autocast(device):
            mlm_pred, nsp_logits, loss, _ = model(ids, seg, labels, nsp)
        target = labels[labels != -100]
        mlm_loss += loss.item() * len(target)
        mlm_hits += (mlm_pred == target).sum().item()
        n_mlm += len(target)
        nsp_hits += (nsp_logits.argmax(-1) == nsp).sum().item()
    model.train(was_training)
    return {"mlm_loss": mlm_loss / max(1, n_mlm), "mlm_acc": mlm_hits / max(1, n_mlm), "nsp_acc": nsp_hits / max(1, len(pairs))}


def save_checkpoint(path, state):
    """Atomic: write a temporary file, then rename it over the old one. A kill at any instant
    leaves either the old checkpoint or the new one, never half of one."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(folder):
    """-> (state, tokenizer, config), or a one-line error that says what is wrong."""
    path, tok_path = os.path.join(folder, "model.pt"), os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        die(f"no checkpoint at {path}; train one first: python minibert.py train --data FILE --out {folder}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        cfg = Config(**state["config"])
        state["model"], state["step"]
    except Exception as e:  # truncated, foreign or from another program
        die(f"{path} is not a minibert checkpoint ({type(e).__name__}); retrain, or point --ckpt at another folder")
    try:
        with open(tok_path, encoding="utf-8") as f:
            tok_json = f.read()
        tok = Tokenizer.from_str(tok_json)
    except Exception as e:
        die(f"{tok_path} is missing or damaged ({type(e).__name__}); it is written beside model.pt by train")
    if hashlib.sha256(tok_json.encode()).hexdigest() != state.get("tokenizer_sha256"):
        die(f"{tok_path} is not the tokenizer model.pt was trained with; restore it or retrain")
    return state, tok, cfg


def load_model(folder, device):
    state, tok, cfg = load_checkpoint(folder)
    model = BERT(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        die(f"{folder}/model.pt does not match its config ({str(e).splitlines()[0]}); retrain")
    return model.to(device).eval(), tok, cfg


class StopRequest:
    """Ctrl-C or SIGTERM sets a flag; the loop saves and exits between steps, never mid-update."""

    def __enter__(self):
        self.stop = False
        self.old = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)

    def handle(self, sig, frame):
        if self.stop:  # a second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.stop = True
        print("\nstopping after this step (Ctrl-C again to abort without saving)", file=sys.stderr)


def train(cfg, tok, train_docs, val_pairs, resume=None, stop_at=None):
    """The loop, over tokenized documents. resume: a checkpoint state to continue from. stop_at:
    end this session after that step exactly as Ctrl-C does (the resume test uses it)."""
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = BERT(cfg).to(device)
    optimizer = make_optimizer(model, cfg, device)
    compile_layers(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # masks
    step, bad_steps = 0, 0
    tok_json = tok.to_str()
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        step = resume["step"]
        rng = resume["rng"]
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        gen.set_state(rng["mask"])
        if device.type == "cuda" and rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"])
    B, N = cfg.batch_size, len(make_pairs(train_docs, cfg.max_len, cfg.seed, cfg.short_seq_prob))
    steps_per_epoch = math.ceil(N / B)
    total = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch
    ckpt_path = os.path.join(cfg.out, "model.pt")
    log_path = os.path.join(cfg.out, "metrics.jsonl")
    pad_to = 8 if device.type == "cuda" else 1  # tensor cores like multiples of 8

    def checkpoint():
        state = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": dataclasses.asdict(cfg),
            "step": step, "epoch": step // steps_per_epoch, "n_train_pairs": N,
            "tokenizer_sha256": hashlib.sha256(tok_json.encode()).hexdigest(),
            "rng": {"python": random.getstate(), "torch": torch.get_rng_state(), "mask": gen.get_state(),
                    "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None},
        }
        save_checkpoint(ckpt_path, state)

    def epoch_pairs(epoch):
        """New pairs (new A/B cuts, new NotNext partners) in a new order every epoch, as the paper's
        code makes 10 differently paired copies of the data: with fixed pairs, a small corpus lets
        NSP memorise them. A function of (seed, epoch) alone, so a resumed run sees the same; cut or
        topped up to N pairs, so every epoch has the same number of steps."""
        pairs = make_pairs(train_docs, cfg.max_len, cfg.seed + epoch, cfg.short_seq_prob)
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.seed + 1000 + epoch)).tolist()
        return [pairs[j] for j in (order * (1 + N // len(order)))[:N]]

    def log(record):
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def run_eval(tag):
        m = evaluate(model, val_pairs, cfg, device)
        print(f"eval ({tag}) step {step}: mlm_loss {m['mlm_loss']:.4f} | mlm_acc {m['mlm_acc']:.4f} | nsp_acc {m['nsp_acc']:.4f}")
        log({"eval": tag, "step": step, **m})

    if resume is None:  # the tokenizer and config go beside the weights, for demo, eval and export
        os.makedirs(cfg.out, exist_ok=True)
        for name, text in (("tokenizer.json", tok_json), ("config.json", json.dumps(dataclasses.asdict(cfg), indent=2))):
            with open(os.path.join(cfg.out, name + ".tmp"), "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(os.path.join(cfg.out, name + ".tmp"), os.path.join(cfg.out, name))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters | {N} training pairs per epoch, {steps_per_epoch} steps per epoch, {total} steps")
    with StopRequest() as stopper:
        model.train()
        sums, n_ok, n_tok, t_data, t0 = torch.zeros(5), 0, 0, 0.0, time.time()
        pairs, pairs_epoch = None, -1
        while step < total:
            t = time.time()
            epoch, i = divmod(step, steps_per_epoch)
            if epoch != pairs_epoch:
                pairs, pairs_epoch = epoch_pairs(epoch), epoch
            batch = make_batch(pairs[i * B : (i + 1) * B], cfg.vocab_size, gen, cfg.mask_prob, pad_to)
            ids, seg, labels, nsp = to_device(batch, device)
            t_data += time.time() - t
            lr = lr_at(step, total, cfg)
            stats = train_step(model, optimizer, (ids, seg, labels, nsp), lr, cfg.grad_clip)
            step += 1
            if stats is None:  # a non-finite loss: the step was skipped, the weights are as they were
                bad_steps += 1
                print(f"warning: non-finite loss at step {step}; step skipped", file=sys.stderr)
                if bad_steps >= 3:
                    die(f"{bad_steps} non-finite losses in a row; lower --lr. The last good checkpoint is in {cfg.out}/")
            else:
                bad_steps, n_ok, sums = 0, n_ok + 1, sums + stats
                n_tok += int((ids != PAD).sum())
            last_step = step == total
            if step % cfg.log_every == 0 or last_step:
                if sys.stderr.isatty():
                    print("\r" + " " * 40 + "\r", end="", file=sys.stderr)  # clear the progress bar
                dt = time.time() - t0
                m = (sums / max(1, n_ok)).tolist()
                print(f"step {step}/{total} | loss {m[0]:.4f} | mlm {m[1]:.4f} | nsp {m[2]:.4f} | mlm_acc {m[3]:.3f} | "
                      f"nsp_acc {m[4]:.3f} | lr {lr:.2e} | {n_tok / dt:,.0f} tok/s | data {100 * t_data / dt:.1f}%")
                log(dict(step=step, loss=m[0], mlm_loss=m[1], nsp_loss=m[2], mlm_acc=m[3], nsp_acc=m[4], lr=lr,
                         tok_per_s=n_tok / dt, data_share=t_data / dt))
                sums, n_ok, n_tok, t_data, t0 = torch.zeros(5), 0, 0, 0.0, time.time()
            elif sys.stderr.isatty():  # a progress bar between log lines
                bar = "#" * (20 * (step % cfg.log_every) // cfg.log_every)
                print(f"\r[{bar:<20}] {step}/{total}", end="", file=sys.stderr, flush=True)
            epoch_end, t_pause = step % steps_per_epoch == 0, time.time()
            if (epoch_end or last_step) and val_pairs:
                run_eval("end" if last_step else f"epoch {step // steps_per_epoch}")
            stop = stopper.stop or step == stop_at
            if epoch_end or last_step or step % cfg.save_every == 0 or stop:
                checkpoint()
            t0 += time.time() - t_pause  # evaluation and saving don't count against tokens/s
            if stop and not last_step:
                print(f"stopped at step {step}; checkpoint saved in {cfg.out}/, continue with --resume", file=sys.stderr)
                sys.exit(130)
    print(f"done: checkpoint in {cfg.out}/; try: python minibert.py demo \"the [MASK] sat on the mat .\" --ckpt {cfg.out}")
    return model


def train_step(model, optimizer, batch, lr, grad_clip):
    """Forward, both losses, backward, clip, AdamW. -> (loss, mlm loss, nsp loss, mlm acc, nsp acc)
    on the CPU, or None when the loss was not finite (then nothing is updated)."""
    ids, seg, labels, nsp = batch
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(ids.device):
        mlm_pred, nsp_logits, mlm_loss, nsp_loss = model(ids, seg, labels, nsp)
    loss = mlm_loss + nsp_loss  # the paper's objective: the two losses summed
    mlm_acc = (mlm_pred == labels[labels != -100]).float().mean()
    nsp_acc = (nsp_logits.argmax(-1) == nsp).float().mean()
    stats = torch.stack([loss.detach(), mlm_loss.detach(), nsp_loss.detach(), mlm_acc, nsp_acc]).float().cpu()
    if not stats[0].isfinite():
        optimizer.zero_grad(set_to_none=True)
        return None
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stats


# ----------------------------------------------------------------------------- demo


@torch.no_grad()
def fill_mask(model, tok, text, max_len, top_k=5):
    """-> for each [MASK] in text, the top_k (word, probability) guesses."""
    ids = tok.encode(text).ids  # [CLS] ... [SEP]
    if len(ids) > max_len:  # keep a window of the text that holds the masks
        body = ids[1:-1]
        first = body.index(MASK)
        start = max(0, min(first, len(body) - (max_len - 2)))
        ids = [CLS] + body[start : start + max_len - 2] + [SEP]
        print(f"warning: the text is longer than {max_len} tokens; using tokens {start}..{start + max_len - 2}", file=sys.stderr)
    x = torch.tensor([ids], device=next(model.parameters()).device)  # (1, T)
    logits, _, _, _ = model(x, torch.zeros_like(x))  # (1, T, V)
    probs = logits[0, x[0] == MASK].float().softmax(-1)  # (masks, V)
    top = probs.topk(top_k, dim=-1)
    return [[(tok.id_to_token(i), p) for p, i in zip(ps.tolist(), ix.tolist())] for ps, ix in zip(top.values, top.indices)]


# ----------------------------------------------------------------------------- bench


def train_flops(cfg, B, T, M):
    """Useful FLOPs of one training step (2 per multiply-add; backward = 2 x forward): what the
    losses need, so the last layer and the MLM head count at [CLS] and the M masked positions."""
    H, F_, V = cfg.hidden, cfg.ffn, cfg.vocab_size
    layer = 2 * (4 * H * H + 2 * H * F_) + 4 * T * H  # per position: qkv, proj, ffn; q.k and att.v
    last = B * T * 2 * (2 * H * H) + (M + B) * (2 * (2 * H * H + 2 * H * F_) + 4 * T * H)  # k, v everywhere
    heads = M * 2 * (H * H + H * V) + B * 2 * (H * H + 2 * H)  # MLM at the masks; pooler and NSP
    return 3 * ((cfg.layers - 1) * B * T * layer + last + heads)


def cpu_matmul_peak(n=1024, reps=20):
    """The fp32 matmul FLOP/s this CPU reaches right now, at the thread count torch uses."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def bench(cfg, steps=20, warmup=5):
    """Time the full training step on a synthetic batch of full-length sequences."""
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = BERT(cfg).to(device).train()
    optimizer = make_optimizer(model, cfg, device)
    compile_layers(model, cfg)
    B, T, V = cfg.batch_size, cfg.max_len, cfg.vocab_size
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(len(SPECIALS), V, (B, T), generator=gen)
    ids[:, 0], ids[:, T // 2], ids[:, -1] = CLS, SEP, SEP
    seg = (torch.arange(T) > T // 2).long().expand(B, T).contiguous()
    nsp = torch.randint(0, 2, (B,), generator=gen)
    inputs, labels = mask_tokens(ids, V, gen, cfg.mask_prob)
    batch = to_device((inputs, seg, labels, nsp), device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        train_step(model, optimizer, batch, cfg.lr, cfg.grad_clip)
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, batch, cfg.lr, cfg.grad_clip)
    sync()
    dt = (time.perf_counter() - t) / steps
    flops = train_flops(cfg, B, T, int((labels != -100).sum()))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), 989e12)
        peak_note = f"{name}, assumed bf16 dense peak {peak / 1e12:.0f} TFLOP/s"
    else:
        peak = cpu_matmul_peak()
        peak_note = f"CPU, {torch.get_num_threads()} threads, measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s"
    return {"device": str(device), "peak_note": peak_note, "batch_size": B, "max_len": T, "ms_per_step": 1e3 * dt,
            "tokens_per_s": B * T / dt, "tflops_per_step": flops / 1e12, "mfu": flops / dt / peak}


# ----------------------------------------------------------------------------- export

HF_NAMES = [  # minibert module -> Hugging Face BertForPreTraining module ({i}: layer index)
    ("emb.tok", "bert.embeddings.word_embeddings"), ("emb.pos", "bert.embeddings.position_embeddings"),
    ("emb.seg", "bert.embeddings.token_type_embeddings"), ("emb.ln", "bert.embeddings.LayerNorm"),
    ("layers.{i}.attn.proj", "bert.encoder.layer.{i}.attention.output.dense"),
    ("layers.{i}.ln1", "bert.encoder.layer.{i}.attention.output.LayerNorm"),
    ("layers.{i}.fc1", "bert.encoder.layer.{i}.intermediate.dense"),
    ("layers.{i}.fc2", "bert.encoder.layer.{i}.output.dense"),
    ("layers.{i}.ln2", "bert.encoder.layer.{i}.output.LayerNorm"),
    ("pool", "bert.pooler.dense"), ("nsp", "cls.seq_relationship"),
    ("mlm_dense", "cls.predictions.transform.dense"), ("mlm_ln", "cls.predictions.transform.LayerNorm"),
]


def hf_state_dict(sd, cfg):
    """Rename (and split the fused qkv of) a minibert state dict to Hugging Face's names."""
    out = {}
    for i in range(cfg.layers):
        for kind in ("weight", "bias"):
            q, k, v = sd[f"layers.{i}.attn.qkv.{kind}"].chunk(3)
            for name, t in (("query", q), ("key", k), ("value", v)):
                out[f"bert.encoder.layer.{i}.attention.self.{name}.{kind}"] = t
    for ours, theirs in HF_NAMES:
        for i in range(cfg.layers) if "{i}" in ours else [None]:
            for kind in ("weight", "bias"):
                key = ours.format(i=i) + "." + kind
                if key in sd:
                    out[theirs.format(i=i) + "." + kind] = sd[key]
    out["cls.predictions.bias"] = sd["decoder.bias"]  # the decoder weight is tied to the embedding
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def export_hf(folder, to):
    """A folder that transformers' BertForPreTraining.from_pretrained and AutoTokenizer load."""
    state, tok, cfg = load_checkpoint(folder)
    try:
        os.makedirs(to, exist_ok=True)
    except OSError as e:
        die(f"cannot create --to {to}: {e.strerror}")
    sd = hf_state_dict(state["model"], cfg)
    config = {
        "architectures": ["BertForPreTraining"], "model_type": "bert", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.ffn, "hidden_act": "gelu", "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.dropout, "max_position_embeddings": cfg.max_position,
        "type_vocab_size": 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": PAD,
        "tie_word_embeddings": True,
    }
    special = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_position,
                  "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
                  "do_lower_case": True, **special}
    files = {"config.json": config, "tokenizer_config.json": tok_config, "special_tokens_map.json": special}
    for name, obj in files.items():
        with open(os.path.join(to, name), "w") as f:
            json.dump(obj, f, indent=2)
    tok.save(os.path.join(to, "tokenizer.json"))
    with open(os.path.join(to, "vocab.txt"), "w", encoding="utf-8") as f:  # for the slow BertTokenizer
        f.write("\n".join(tok.id_to_token(i) for i in range(tok.get_vocab_size())) + "\n")
    try:
        from safetensors.torch import save_file
        save_file(sd, os.path.join(to, "model.safetensors"), metadata={"format": "pt"})
    except ImportError:
        torch.save(sd, os.path.join(to, "pytorch_model.bin"))
    print(f"exported {folder} to {to}/; load it with transformers.BertForPreTraining.from_pretrained({to!r})")


# ----------------------------------------------------------------------------- command line


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"minibert: error: {message} (see: python {self.prog} --help)\n")


def add_config_flags(p):
    """Every Config field becomes a flag of the same name and type, so the two never drift."""
    for f in dataclasses.fields(Config):
        if f.type is bool:
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None)
        elif f.name == "device":
            p.add_argument("--device", choices=["auto", "cuda", "cpu"], default=None, help="default auto")
        else:
            p.add_argument(f"--{f.name}", type=f.type, default=None, metavar=f.type.__name__.upper(), help=f"default {f.default}")
    p.add_argument("--preset", choices=list(PRESETS), help="model size; explicit --layers etc. override it (default mini)")


def build_config(args, base=None):
    """Defaults (or base), then the preset, then each flag given on the command line."""
    cfg = base or Config()
    if getattr(args, "preset", None):
        cfg = apply_preset(cfg, args.preset)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name, None) is not None}
    return dataclasses.replace(cfg, **given), given


def check_config(cfg):
    positive = ["layers", "hidden", "heads", "ffn", "vocab_size", "max_position", "max_len", "batch_size",
                "epochs", "lr", "log_every", "save_every"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            die(f"--{name} must be positive, not {getattr(cfg, name)}")
    if cfg.hidden % cfg.heads:
        die(f"--hidden {cfg.hidden} is not divisible by --heads {cfg.heads}")
    if not cfg.max_len <= cfg.max_position or cfg.max_len < 8:
        die(f"--max_len must be between 8 and --max_position ({cfg.max_position}), not {cfg.max_len}")
    for name in ("dropout", "short_seq_prob", "warmup", "val_share"):
        if not 0 <= getattr(cfg, name) < 1:
            die(f"--{name} must be in [0, 1), not {getattr(cfg, name)}")
    for name in ("max_steps", "weight_decay", "grad_clip"):
        if getattr(cfg, name) < 0:
            die(f"--{name} must not be negative, not {getattr(cfg, name)}")
    if not 0 < cfg.mask_prob < 1:
        die(f"--mask_prob must be in (0, 1), not {cfg.mask_prob}")
    if cfg.vocab_size <= len(SPECIALS):
        die(f"--vocab_size must exceed the {len(SPECIALS)} special tokens")


def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        die("--device cuda, but torch sees no CUDA GPU; use --device cpu (or install a CUDA build of torch)")
    return name


def split_docs(docs, share, seed):
    """Hold out a share of the documents, whole, for evaluation (none if there are too few)."""
    docs = docs[:]
    random.Random(seed).shuffle(docs)
    n_val = max(2, round(share * len(docs))) if share > 0 and len(docs) >= 8 else 0  # NotNext needs two
    return docs[n_val:], docs[:n_val]


def pairs_or_die(docs, cfg, seed):
    pairs = make_pairs(docs, cfg.max_len, seed, cfg.short_seq_prob)
    if not pairs:
        die("too little text to build a single sentence pair: give at least two documents of two sentences or more")
    return pairs


def prepare_output(folder):
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, ".write_test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        die(f"cannot write to --out {folder} ({e.strerror}); pick another folder with --out")


def cmd_train(args):
    cfg, given = build_config(args)
    resume = None
    if args.resume:
        resume, tok, saved = load_checkpoint(cfg.out)
        for name in SHAPE:
            if name in given and given[name] != getattr(saved, name):
                die(f"--resume: the checkpoint in {cfg.out}/ has {name} {getattr(saved, name)}, not {given[name]}; drop --{name}")
        if args.preset and apply_preset(saved, args.preset) != saved:
            die(f"--resume: the checkpoint in {cfg.out}/ is not the {args.preset} preset; drop --preset")
        cfg = dataclasses.replace(saved, **{k: v for k, v in given.items() if k not in SHAPE})
    elif os.path.exists(os.path.join(cfg.out, "model.pt")):
        die(f"{cfg.out}/ already holds a checkpoint; continue it with --resume, or pick a new folder with --out")
    cfg = dataclasses.replace(cfg, device=resolve_device(cfg.device))
    check_config(cfg)
    t0 = time.time()
    if args.data:
        train_docs, val_docs = split_docs(read_corpus(args.data), cfg.val_share, cfg.seed)
    else:
        train_docs, val_docs = load_wikitext()
    prepare_output(cfg.out)
    if resume is None:
        tok = train_tokenizer((s for d in train_docs for s in d), cfg.vocab_size)
        cfg = dataclasses.replace(cfg, vocab_size=tok.get_vocab_size())
    t_tok = time.time() - t0
    train_docs = encode_docs(tok, train_docs)
    train_pairs = pairs_or_die(train_docs, cfg, cfg.seed)  # the first epoch's
    val_pairs = make_pairs(encode_docs(tok, val_docs), cfg.max_len, cfg.seed + 1, cfg.short_seq_prob)
    if resume is not None and resume["n_train_pairs"] != len(train_pairs):
        die(f"--resume: this data gives {len(train_pairs)} training pairs, the checkpoint's run had {resume['n_train_pairs']}; pass the same --data")
    print(f"data: {time.time() - t0:.1f} s (reading and tokenizer {t_tok:.1f} s) | {len(train_docs)} documents, "
          f"{len(train_pairs)} pairs for training, {len(val_pairs)} held out | vocabulary {tok.get_vocab_size()}")
    print("config:", json.dumps(dataclasses.asdict(cfg)))
    if resume is not None:
        print(f"resuming from step {resume['step']}")
    train(cfg, tok, train_docs, val_pairs, resume)


def cmd_demo(args):
    args.text = re.sub(r"\[mask\]", "[MASK]", args.text, flags=re.IGNORECASE)  # [mask] is meant too
    if "[MASK]" not in args.text:
        die('the text has no [MASK]; try: python minibert.py demo "the [MASK] sat on the mat ."')
    model, tok, cfg = load_model(args.ckpt, resolve_device(args.device))
    for i, guesses in enumerate(fill_mask(model, tok, args.text, cfg.max_len, args.top_k)):
        print(f"[MASK] {i + 1}: " + "  ".join(f"{w} {p:.3g}" for w, p in guesses))


def cmd_eval(args):
    device = resolve_device(args.device)
    model, tok, cfg = load_model(args.ckpt, device)
    docs = read_corpus(args.data) if args.data else load_wikitext(("validation",))[0]
    pairs = pairs_or_die(encode_docs(tok, docs), cfg, cfg.seed + 1)
    m = evaluate(model, pairs, dataclasses.replace(cfg, device=device), torch.device(device))
    m["pairs"] = len(pairs)
    if args.json:
        print(json.dumps(m))
    else:
        print(f"{len(pairs)} pairs | mlm_loss {m['mlm_loss']:.4f} | mlm_acc {m['mlm_acc']:.4f} | nsp_acc {m['nsp_acc']:.4f}")


def cmd_bench(args):
    cfg, _ = build_config(args)
    cfg = dataclasses.replace(cfg, device=resolve_device(cfg.device))
    check_config(cfg)
    r = bench(cfg, args.steps)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['device']}: {r['ms_per_step']:.1f} ms/step | {r['tokens_per_s']:,.0f} tokens/s | "
              f"MFU {100 * r['mfu']:.1f}% ({r['peak_note']}) | batch {r['batch_size']} x {r['max_len']}")


def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)  # log lines show up at once, also in a file
    p = Parser(prog="minibert.py", description="BERT pretraining from scratch, in one file.", allow_abbrev=False)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    t = sub.add_parser("train", allow_abbrev=False, help="pretrain (WikiText-2 from the hub, or --data FILE)")
    add_config_flags(t)
    t.add_argument("--data", nargs="+", metavar="FILE", help="local text (WikiText layout) or the Cornell Movie-Dialogs folder")
    t.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out")
    d = sub.add_parser("demo", allow_abbrev=False, help="fill in the [MASK]s of a sentence")
    d.add_argument("text")
    d.add_argument("--top_k", type=int, default=5)
    e = sub.add_parser("eval", allow_abbrev=False, help="MLM loss/accuracy and NSP accuracy on a text")
    e.add_argument("--data", nargs="+", metavar="FILE", help="default: WikiText-2 validation from the hub")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    b = sub.add_parser("bench", allow_abbrev=False, help="time the training step on synthetic batches")
    add_config_flags(b)
    b.add_argument("--steps", type=int, default=20, help="timed steps, after 5 warm-up steps")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    x = sub.add_parser("export", allow_abbrev=False, help="write a Hugging Face transformers folder")
    x.add_argument("--to", required=True, metavar="DIR")
    for q in (d, e, x):
        q.add_argument("--ckpt", default="out", metavar="DIR", help="checkpoint folder (default out)")
    for q in (d, e):
        q.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    args = p.parse_args(argv)
    for name in ("top_k", "steps"):
        if getattr(args, name, 1) < 1:
            die(f"--{name} must be positive, not {getattr(args, name)}")
    try:
        {"train": cmd_train, "demo": cmd_demo, "eval": cmd_eval, "bench": cmd_bench, "export": lambda a: export_hf(a.ckpt, a.to)}[args.cmd](args)
    except KeyboardInterrupt:
        sys.exit("minibert: interrupted")
    except torch.OutOfMemoryError:
        die("out of memory; lower --batch_size or --max_len")


if __name__ == "__main__":
    main()
