"""Tests for minibert.py: python -m pytest -q test_minibert.py. No network; under a minute on 2 CPU cores."""

import dataclasses
import gzip
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import sys
import time

import pytest
import torch

import minibert as mb
from minibert import CLS, MASK, PAD, SEP, Config

HERE = os.path.dirname(os.path.abspath(__file__))
# odd, distinct sizes so that a swapped dimension fails loudly (as Hugging Face's BERT tester does)
TINY = Config(layers=2, hidden=32, heads=2, ffn=37, vocab_size=99, max_position=40, max_len=24, dropout=0.0, device="cpu")
WORDS = ("cat dog bird fish king queen river city house garden mountain forest ship train road bridge "
         "red blue green small large old new quick slow bright dark sat ran flew swam built crossed saw "
         "found kept lost made took gave loved watched under over near beside behind through across").split()


def make_corpus(n_docs=12, seed=0):
    """A small corpus in WikiText layout: titles, section headings, paragraphs of sentences."""
    rng, lines = random.Random(seed), []
    for d in range(n_docs):
        lines += ["", f" = Article {d} = ", ""]
        for p in range(3):
            if p:
                lines += ["", f" = = Section {p} = = ", ""]
            sents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))).capitalize() + " ." for _ in range(rng.randint(3, 6))]
            lines.append(" " + " ".join(sents) + " ")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def docs():
    return mb.parse_wikitext(make_corpus().splitlines())


@pytest.fixture(scope="module")
def tok(docs):
    return mb.train_tokenizer((s for d in docs for s in d), 300)


def corpus_of(docs):
    """Documents of tokenized sentences (lists of ids) -> Corpus, the arrays encode_corpus makes."""
    sents = [s for d in docs for s in d]
    ids = torch.tensor([t for s in sents for t in s], dtype=torch.int32)
    off = torch.tensor([0] + [len(s) for s in sents]).cumsum(0)
    return mb.Corpus(ids, off, torch.tensor([0] + [len(d) for d in docs]).cumsum(0))


def synthetic_docs(n_docs=80, seed=0):
    """Documents of tokenized sentences whose ids are unique, so each token tells where it came from."""
    rng, docs, where, nxt = random.Random(seed), [], {}, 10
    for d in range(n_docs):
        doc, pos = [], 0
        for s in range(rng.randint(3, 15)):
            sent = list(range(nxt, nxt + rng.randint(2, 9)))
            for t in sent:
                where[t] = (d, s, pos)
                pos += 1
            nxt += len(sent)
            doc.append(sent)
        docs.append(doc)
    return docs, where


def batch_of(cfg, B=8, T=20, seed=0):
    """A masked batch of random pairs: (ids, seg, pos, labels, nsp), as the training loop makes one."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (B, T), generator=g)
    ids[:, 0], ids[:, T // 2], ids[:, -1] = CLS, SEP, SEP
    seg = (torch.arange(T) > T // 2).long().expand(B, T).contiguous()
    inputs, pos, labels = mb.mask_tokens(ids, cfg.vocab_size, g)
    return inputs, seg, pos, labels, torch.arange(B) % 2


def loss_of(model, batch):
    return mb.pretraining_loss(model, *batch, (batch[3] != -100).sum(), len(batch[0]))


# ---------------------------------------------------------------------------- corpus and pairs


def test_parse_wikitext_articles_headings_sentences():
    text = " = One = \n\n First sentence here . Second one ! \n\n = = Heading = = \n Third 1 @,@ 000 . \n = Two = \n Other text .\n"
    docs = mb.parse_wikitext(text.splitlines())
    assert docs == [["First sentence here .", "Second one !", "Third 1,000 ."], ["Other text ."]]
    plain = "Doc one . Still one .\n\nDoc two .\n"  # no titles: blank lines separate documents
    assert mb.parse_wikitext(plain.splitlines()) == [["Doc one .", "Still one ."], ["Doc two ."]]


def test_encode_corpus_arrays(tok):
    docs = [["The cat sat .", "", "A dog ran ."], ["  "], ["Red ship ."]]  # an empty sentence, an empty document
    c = mb.encode_corpus(tok, docs)
    assert c.ids.dtype == torch.int32 and c.docs.tolist() == [0, 2, 2, 3] and len(c.sents) == 4
    for s, text in enumerate(["The cat sat .", "A dog ran .", "Red ship ."]):
        assert c.ids[c.sents[s] : c.sents[s + 1]].tolist() == tok.encode(text, add_special_tokens=False).ids


def test_pairs_balance_and_rules():
    docs, where = synthetic_docs()
    corpus = corpus_of(docs)
    pairs = mb.make_pairs(corpus, range(len(docs)), max_len=32, seed=0)
    labels = pairs[:, 4].tolist()
    assert len(pairs) > 100
    assert abs(labels.count(0) - labels.count(1)) <= 1  # 50/50, exactly up to one pair
    for a0, la, b0, lb, label in pairs.tolist():
        a, b = corpus.ids[a0 : a0 + la].tolist(), corpus.ids[b0 : b0 + lb].tolist()
        assert a and b and len(a) + len(b) + 3 <= 32
        (da, _, pa), (db, _, pb) = where[a[0]], where[b[0]]
        assert [where[t][2] for t in a] == list(range(pa, pa + len(a)))  # A is one contiguous run
        assert [where[t][2] for t in b] == list(range(pb, pb + len(b)))  # and so is B
        assert all(where[t][0] == da for t in a) and all(where[t][0] == db for t in b)
        if label == 0:  # IsNext: B follows A in the same document; only truncation may cut between
            assert db == da and 0 <= pb - (pa + len(a)) < 9
        else:  # NotNext: B from another document, never the same one
            assert db != da
    some = mb.make_pairs(corpus, range(40, 80), max_len=32, seed=0)  # a subset of the documents pairs within it
    assert all(where[t][0] >= 40 for t in corpus.ids[some[:, 0]].tolist() + corpus.ids[some[:, 2]].tolist())


def test_collate_segments_and_padding():
    ids = torch.arange(100, 120, dtype=torch.int32)
    pairs = torch.tensor([[0, 3, 3, 2, 0], [10, 1, 15, 1, 1]])  # A = 100 101 102, B = 103 104; A = 110, B = 115
    x, seg, nsp = mb.collate(ids, pairs, 8)
    assert x.tolist() == [[CLS, 100, 101, 102, SEP, 103, 104, SEP], [CLS, 110, SEP, 115, SEP, PAD, PAD, PAD]]
    assert seg.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0, 0]]
    assert nsp.tolist() == [0, 1]


# ---------------------------------------------------------------------------- masking


def test_masking_ratios():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 125, (400,), generator=g)
    pairs = torch.stack([torch.zeros_like(lengths), lengths // 2, torch.zeros_like(lengths), lengths - lengths // 2, 0 * lengths], 1)
    ids, _, _ = mb.collate(torch.randint(5, 1000, (200,), dtype=torch.int32, generator=g), pairs, 128)
    V = 1000
    inputs, pos, labels = mb.mask_tokens(ids, V, g)
    assert pos.shape == labels.shape == (400, 19)  # ceil(125 x 15 %) slots, whatever the row
    chosen = torch.zeros_like(ids, dtype=torch.bool).scatter(1, pos, labels != -100)  # (B, T)
    real = (ids != PAD) & (ids != CLS) & (ids != SEP)
    assert not (chosen & ~real).any()  # [CLS], [SEP], [PAD] are never chosen
    assert (labels[labels != -100] == ids.gather(1, pos)[labels != -100]).all()
    assert torch.equal(chosen.sum(1), (real.sum(1) * 0.15).round().long())  # exactly round(15 %) per row
    n = chosen.sum().item()
    masked = (inputs == MASK) & chosen
    kept = (inputs == ids) & chosen
    swapped = chosen & ~masked & ~kept
    # 80/10/10 over ~9,000 chosen positions: 4 standard deviations is ~0.017 for the 80 % share
    assert abs(masked.sum().item() / n - 0.8) < 0.02
    assert abs(kept.sum().item() / n - 0.1) < 0.015  # (a random token equal to the original counts as kept: 1/V)
    assert abs(swapped.sum().item() / n - 0.1) < 0.015
    assert (inputs[swapped] >= len(mb.SPECIALS)).all() and (inputs[swapped] < V).all()  # never special
    assert (inputs[~chosen] == ids[~chosen]).all()
    _, _, labels2 = mb.mask_tokens(ids, V, g)  # dynamic: a fresh draw every call
    assert not torch.equal(labels, labels2)


# ---------------------------------------------------------------------------- model


def test_shapes():
    torch.manual_seed(0)
    model = mb.BERT(TINY)
    B, T = 13, 7
    ids = torch.randint(5, 99, (B, T))
    seg = torch.zeros_like(ids)
    mlm, nsp = model(ids, seg)
    assert mlm.shape == (B, T, 99) and nsp.shape == (B, 2)
    pos = torch.tensor([[2, 5]] * B)
    at, nsp2 = model(ids, seg, pos)
    assert at.shape == (B, 2, 99) and torch.allclose(at, mlm[:, [2, 5]], atol=1e-5) and torch.allclose(nsp, nsp2, atol=1e-6)


def test_training_loss_equals_the_full_computation():
    """Training runs the last layer and the MLM head at [CLS] and the prediction slots only; the
    losses and every gradient must equal those of the plain full forward."""
    torch.manual_seed(0)
    model = mb.BERT(TINY)
    ids, seg, pos, labels, nsp = batch = batch_of(TINY, B=6, T=20)
    ids[0, 15:] = PAD  # some padding
    labels[0, pos[0] >= 15] = -100
    loss, stats = loss_of(model, batch)
    fast = torch.autograd.grad(loss, list(model.parameters()))
    logits, nsp_logits = model(ids, seg)
    full_labels = torch.full_like(ids, -100).scatter(1, pos, labels)  # (B, T)
    ref_mlm = torch.nn.functional.cross_entropy(logits.flatten(0, 1), full_labels.flatten())
    ref_nsp = torch.nn.functional.cross_entropy(nsp_logits, nsp)
    assert torch.allclose(stats[1], ref_mlm, atol=1e-5) and torch.allclose(stats[2], ref_nsp, atol=1e-6)
    pred = logits.argmax(-1).gather(1, pos)  # (B, P) the plain prediction at each slot
    labels[:, ::2] = torch.where(labels[:, ::2] == -100, -100, pred[:, ::2])  # half the slots right: 0 < acc < 1
    acc = loss_of(model, (ids, seg, pos, labels, nsp))[1][3]
    assert 0 < acc < 1 and torch.allclose(acc, (pred == labels).sum() / (labels != -100).sum())
    slow = torch.autograd.grad(ref_mlm + ref_nsp, list(model.parameters()))
    for (name, _), f, s in zip(model.named_parameters(), fast, slow):
        assert torch.allclose(f, s, atol=1e-6), name


def test_cross_entropy_sum_matches_torch():
    torch.manual_seed(0)
    logits, target = torch.randn(11, 99, requires_grad=True), torch.randint(0, 99, (11,))
    target[[2, 7]] = -100  # ignored, as unused prediction slots are
    ref = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
    (g_ref,) = torch.autograd.grad(3 * ref, logits)
    ours = mb.CrossEntropySum.apply(logits, target)
    (g,) = torch.autograd.grad(3 * ours, logits)
    assert torch.allclose(ours, ref, atol=1e-5) and torch.allclose(g, g_ref, atol=1e-6)


def test_cpu_dropout_masks_and_explicit_attention(monkeypatch):
    """The CPU's cheap dropout keeps 1 - p of the elements, scaled by 1 / (1 - p), and passes the gradient through the
    same mask; the explicit attention it uses on the CPU equals F.scaled_dot_product_attention without dropout."""
    torch.manual_seed(0)
    x = torch.ones(1000, 1000, requires_grad=True)
    y = mb.dropout(x, 0.1, True)
    y.sum().backward()
    assert abs((y != 0).float().mean().item() - 0.9) < 0.002 and torch.allclose(y[y != 0], torch.tensor(1 / 0.9))
    assert torch.equal(x.grad, y.detach())  # d(sum y)/dx = mask / (1 - p), which is y at x = 1
    model = mb.BERT(dataclasses.replace(TINY, dropout=0.1))
    ids, seg, pos, _, _ = batch_of(TINY)
    ids[0, 12:] = PAD
    ref = model.eval()(ids, seg, pos)
    monkeypatch.setattr(mb, "dropout", lambda x, p, training: x)
    out = model.train()(ids, seg, pos)  # training mode on the CPU: the explicit path, here without dropout
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ref, out))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_training_steps_reuse_freed_memory():
    """After reuse_freed_memory (train and bench call it on the CPU), a step whose MLM logits are over glibc's 32 MB
    takes almost no new pages from the kernel once the heap has settled (without it: ~20,000 page faults a step)."""
    import resource
    mb.reuse_freed_memory()
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, vocab_size=16384)  # (128 x 6 slots) x 16384 floats: 50 MB of logits
    model = mb.BERT(cfg)
    opt, batch, faults = mb.make_optimizer(model, cfg), batch_of(cfg, B=128, T=40), []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        mb.train_step(model, opt, mb.pretraining_loss, batch, 1e-3, cfg)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert min(faults[-2:]) < 1000, faults


def test_training_step_traces_as_one_graph():
    """The CI stand-in for "no host syncs, static shapes": forward and both losses trace as one graph
    (fullgraph raises on any graph break), and the backward runs through it."""
    torch.manual_seed(0)
    model = mb.BERT(dataclasses.replace(TINY, dropout=0.1))
    batch = batch_of(TINY)
    step = torch.compile(mb.pretraining_loss, fullgraph=True, backend="eager")
    loss, stats = step(model, *batch, (batch[3] != -100).sum(), len(batch[0]))
    loss.backward()
    assert stats.shape == (5,) and all(p.grad is not None for p in model.parameters())


def test_padding_does_not_change_real_outputs():
    torch.manual_seed(0)
    model = mb.BERT(dataclasses.replace(TINY, dropout=0.1)).eval()
    ids = torch.arange(10, 40, dtype=torch.int32)
    x1, s1, _ = mb.collate(ids, torch.tensor([[0, 3, 5, 2, 0]]), 8)  # exactly full
    x2, s2, _ = mb.collate(ids, torch.tensor([[0, 3, 5, 2, 0], [0, 10, 12, 3, 1]]), 20)
    mlm1, nsp1 = model(x1, s1)
    mlm2, nsp2 = model(x2, s2)
    assert torch.allclose(mlm1[0], mlm2[0, :8], atol=1e-5) and torch.allclose(nsp1[0], nsp2[0], atol=1e-5)


def write_checkpoint(folder, model, cfg, tok):
    """A checkpoint as train writes one (weights, config, tokenizer), without training."""
    state = {"model": model.state_dict(), "config": dataclasses.asdict(cfg), "step": 0, "tokenizer": tok.to_str()}
    mb.save_checkpoint(str(folder / "model.pt"), state)


def test_tied_decoder_survives_save_and_load(tmp_path, tok):
    cfg = dataclasses.replace(TINY, vocab_size=tok.get_vocab_size())
    torch.manual_seed(0)
    model = mb.BERT(cfg)
    assert model.decoder.weight is model.tok_emb.weight
    with torch.no_grad():
        model.tok_emb.weight[7] += 1.0  # a change to the embedding is a change to the decoder
    assert torch.equal(model.decoder.weight[7], model.tok_emb.weight[7])
    write_checkpoint(tmp_path, model, cfg, tok)
    loaded = mb.load_model(str(tmp_path), "cpu")[0]
    assert loaded.decoder.weight is loaded.tok_emb.weight
    ids = torch.tensor([[CLS, 10, MASK, 12, SEP]])
    assert torch.equal(model.eval()(ids, torch.zeros_like(ids))[0], loaded(ids, torch.zeros_like(ids))[0])


@pytest.mark.parametrize("std", [0.02, 0.06])
def test_initial_loss_is_chance(std):
    """Weights drawn with std init_std (BERT's 0.02; a CPU run's 0.06), the classifier's head too, give near-uniform
    predictions: MLM ~ ln V, NSP ~ ln 2."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, vocab_size=997, init_std=std)
    model, head = mb.BERT(cfg), mb.Classifier(cfg, 2).classifier.weight
    assert abs(model.layers[0].fc1.weight.std() - std) < 0.1 * std and abs(head.std() - std) < 0.3 * std
    _, stats = loss_of(model, batch_of(cfg, B=32))
    assert abs(stats[1].item() - math.log(997)) < 0.1
    assert abs(stats[2].item() - math.log(2)) < 0.05


def overfit(device):
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, device=device)
    model = mb.BERT(cfg).to(device)
    opt = mb.make_optimizer(model, cfg)
    batch = [t.to(device) for t in batch_of(cfg)]
    first, _ = mb.train_step(model, opt, mb.pretraining_loss, batch, 3e-3, cfg)
    for _ in range(150):
        last, _ = mb.train_step(model, opt, mb.pretraining_loss, batch, 3e-3, cfg)
    return first.tolist(), last.tolist()


def test_overfit_one_batch_cpu():
    first, last = overfit("cpu")
    assert first[0] > 5.0  # ln 99 + ln 2
    assert last[0] < 0.05 and last[3] == 1.0 and last[4] == 1.0  # loss ~0, every mask and label right


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_overfit_one_batch_cuda():
    first, last = overfit("cuda")
    assert first[0] > 5.0 and last[0] < 0.1  # bf16 autocast: a little looser


def test_gradient_accumulation_is_exact():
    """4 micro-batches of 4 sequences make the same update as one batch of 16 (dropout off)."""
    batch = batch_of(TINY, B=16)
    weights = []
    for accum in (1, 4):
        torch.manual_seed(0)
        cfg = dataclasses.replace(TINY, grad_accum=accum)
        model = mb.BERT(cfg)
        opt = mb.make_optimizer(model, cfg)
        for _ in range(3):
            stats, skipped = mb.train_step(model, opt, mb.pretraining_loss, batch, 1e-3, cfg)
        weights.append((stats, [p.detach().clone() for p in model.parameters()]))
    (s1, w1), (s4, w4) = weights
    assert torch.allclose(s1, s4, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(w1, w4))


def test_non_finite_step_changes_nothing():
    """A non-finite loss skips the step on the device: weights and AdamW moments stay as they were."""
    torch.manual_seed(0)
    model = mb.BERT(TINY)
    opt = mb.make_optimizer(model, TINY)
    batch = batch_of(TINY)
    mb.train_step(model, opt, mb.pretraining_loss, batch, 1e-3, TINY)
    with torch.no_grad():
        model.tok_emb.weight[batch[0][0, 1]] = float("nan")
    before = [t.clone() for t in [*model.state_dict().values(), *(s["exp_avg"] for s in opt.state.values())]]
    _, skipped = mb.train_step(model, opt, mb.pretraining_loss, batch, 1e-3, TINY)
    after = [*model.state_dict().values(), *(s["exp_avg"] for s in opt.state.values())]
    assert skipped.item() == 1.0
    assert all(torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) for a, b in zip(before, after))


def test_lr_schedule_weight_decay_groups_and_presets():
    cfg = Config(lr=1.0, warmup=0.1)
    lrs = [mb.lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and max(lrs) == pytest.approx(1.0)
    assert lrs[99] < 0.02 and all(x >= y for x, y in zip(lrs[9:], lrs[10:]))
    model = mb.BERT(TINY)
    groups = mb.make_optimizer(model, TINY).param_groups
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.parameters() if p.dim() >= 2}
    assert groups[1]["weight_decay"] == 0.0 and model.emb_ln.weight in groups[1]["params"]
    assert mb.apply_preset(Config(), "base").lr == 1e-4 and mb.apply_preset(Config(), "mini") == Config()


def test_sections_copy_paste_alone():
    """The tokenizer, corpus and pairs, masking and model sections work with nothing but the imports and
    the config section above them: copied into another file, they run, text to logits."""
    src = open(os.path.join(HERE, "minibert.py")).read()
    parts = re.split(r"^# -{20,} (.+)$", src, flags=re.M)  # [head, name, body, name, body, ...]
    sections = dict(zip(parts[1::2], parts[2::2]))
    ns = {}
    exec(parts[0] + "".join(sections[k] for k in ("config", "tokenizer", "corpus and pairs", "masking", "model")), ns)
    docs = mb.parse_wikitext(make_corpus().splitlines())
    tok = ns["train_tokenizer"]((s for d in docs for s in d), 99)
    corpus = ns["encode_corpus"](tok, docs)
    x, seg, nsp = ns["collate"](corpus.ids, ns["make_pairs"](corpus, range(len(docs)), 24, seed=0)[:3], 24)
    inputs, pos, labels = ns["mask_tokens"](x, 99, torch.Generator().manual_seed(0))
    cfg = ns["Config"](layers=1, hidden=32, heads=2, ffn=37, vocab_size=99, max_len=24)
    mlm, nsp_logits = ns["BERT"](cfg)(inputs, seg, pos)
    assert mlm.shape == (3, pos.size(1), 99) and nsp_logits.shape == (3, 2)
    hidden, pooled = ns["BERT"](cfg).encode(inputs, seg)  # a head of your own on the encoder, or the classifier
    assert hidden.shape == (3, 24, 32) and pooled.shape == (3, 32) and ns["Classifier"](cfg, 4)(inputs, seg).shape == (3, 4)


# ---------------------------------------------------------------------------- checkpoints, resume, the cache


def test_resume_is_exact(tmp_path, tok, docs, capsys):
    """N steps straight == k steps, a stop (as Ctrl-C), a resume and N - k more: same weights. And a run
    that moves from a GPU to the CPU (or back) goes on, with new masks: the two generators differ."""
    cfg = dataclasses.replace(TINY, vocab_size=tok.get_vocab_size(), max_len=32, dropout=0.1, batch_size=8,
                              max_steps=16, log_every=4)
    corpus = mb.encode_corpus(tok, docs)
    train_docs, val = range(len(docs)), mb.make_pairs(corpus, range(len(docs)), cfg.max_len, 99)[:8]
    assert math.ceil(len(mb.make_pairs(corpus, train_docs, cfg.max_len, cfg.seed)) / 8) < 11  # stop, resume in epoch 2+
    a, b, c = (str(tmp_path / name) for name in "abc")
    straight = mb.train(dataclasses.replace(cfg, out=a), tok, corpus, train_docs, val)
    with pytest.raises(SystemExit) as stop:
        mb.train(dataclasses.replace(cfg, out=b), tok, corpus, train_docs, val, stop_at=11)
    assert stop.value.code == 130
    shutil.copytree(b, c)
    state = mb.load_checkpoint(b)[0]
    assert state["step"] == 11
    resumed = mb.train(dataclasses.replace(cfg, out=b), tok, corpus, train_docs, val, resume=state)
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    log = [json.loads(line) for line in open(os.path.join(b, "metrics.jsonl"))]
    ref = [json.loads(line) for line in open(os.path.join(a, "metrics.jsonl"))]
    assert [r["loss"] for r in ref if "loss" in r][-1] == [r["loss"] for r in log if "loss" in r][-1]
    state = mb.load_checkpoint(c)[0]
    state["rng"]["mask"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state (seed, offset)
    capsys.readouterr()
    moved = mb.train(dataclasses.replace(cfg, out=c), tok, corpus, train_docs, val, resume=state)
    assert "moved between the CPU and a GPU" in capsys.readouterr().out
    assert mb.load_checkpoint(c)[0]["step"] == 16 and all(p.isfinite().all() for p in moved.parameters())
    assert not torch.equal(moved.tok_emb.weight, straight.tok_emb.weight)  # other masks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_train_resume_and_evaluate_on_cuda(tmp_path, tok, docs):
    """The loop on a GPU (batches and masks made there, bf16, evaluations, checkpoints): 16 steps straight
    ~= 11, a stop, a resume and 5 more. A GPU's sums need not be bit-exact from run to run (attention's backward
    adds atomically), and Adam can turn a tiny difference into a whole step, so the tolerance is the worst case:
    twice the learning rates of steps 11-15 summed (2 x 1e-3). test_resume_is_exact checks exactness on the
    CPU; this one, that the loop runs on a GPU and resumes to the same place. The step-11 run goes on on the CPU."""
    cfg = dataclasses.replace(TINY, vocab_size=tok.get_vocab_size(), max_len=32, batch_size=8, max_steps=16,
                              log_every=4, device="cuda")
    corpus = mb.encode_corpus(tok, docs)
    train_docs, val = range(len(docs)), mb.make_pairs(corpus, range(len(docs)), cfg.max_len, 99)[:8]
    a, b, c = (str(tmp_path / name) for name in "abc")
    straight = mb.train(dataclasses.replace(cfg, out=a), tok, corpus, train_docs, val)
    with pytest.raises(SystemExit):
        mb.train(dataclasses.replace(cfg, out=b), tok, corpus, train_docs, val, stop_at=11)
    shutil.copytree(b, c)
    resumed = mb.train(dataclasses.replace(cfg, out=b), tok, corpus, train_docs, val, resume=mb.load_checkpoint(b)[0])
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert p.is_cuda and torch.allclose(p, q, atol=2e-3), name
    moved = mb.train(dataclasses.replace(cfg, out=c, device="cpu"), tok, corpus, train_docs, val,
                     resume=mb.load_checkpoint(c)[0])
    assert mb.load_checkpoint(c)[0]["step"] == 16 and all(p.isfinite().all() for p in moved.parameters())


def test_interrupted_write_keeps_previous_checkpoint(tmp_path):
    path = str(tmp_path / "model.pt")
    mb.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    with pytest.raises(Exception):  # dies half-way through pickling, as a kill mid-write would
        mb.save_checkpoint(path, {"step": 2, "w": torch.zeros(1000), "bad": lambda: 0})

    class CtrlC:  # a second Ctrl-C, arriving while the checkpoint is written
        def __reduce__(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mb.save_checkpoint(path, {"step": 3, "w": torch.zeros(1000), "x": CtrlC()})
    assert os.listdir(tmp_path) == ["model.pt"]  # no model.pt.tmp left behind
    state = torch.load(path, weights_only=True)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))


def test_nonfinite_losses_stop_and_keep_last_checkpoint(tmp_path, tok, docs):
    cfg = dataclasses.replace(TINY, vocab_size=tok.get_vocab_size(), max_len=32, batch_size=8, max_steps=2,
                              out=str(tmp_path))
    corpus = mb.encode_corpus(tok, docs)
    mb.train(cfg, tok, corpus, range(len(docs)), None)
    before = (tmp_path / "model.pt").read_bytes()
    state = mb.load_checkpoint(str(tmp_path))[0]
    state["model"]["emb_ln.weight"][0] = float("nan")
    with pytest.raises(SystemExit) as err:
        mb.train(dataclasses.replace(cfg, max_steps=10), tok, corpus, range(len(docs)), None, resume=state)
    assert "non-finite" in str(err.value.code) and "the last checkpoint (step 2)" in str(err.value.code)
    assert (tmp_path / "model.pt").read_bytes() == before


def test_corpus_cache_reused_stale_and_damaged(tmp_path, tok, docs, capsys):
    corpus, cached, digest = mb.cached_corpus(tok, docs, str(tmp_path))
    (path,) = tmp_path.glob("corpus-*.pt")
    assert not cached
    again, cached, same = mb.cached_corpus(tok, docs, str(tmp_path))
    assert cached and all(torch.equal(x, y) for x, y in zip(corpus, again)) and same == digest
    _, cached, changed = mb.cached_corpus(tok, docs[:-1], str(tmp_path))
    assert changed != digest  # the text's hash, which a checkpoint keeps for --resume  # other text: another key, never this cache
    assert not cached and len(list(tmp_path.glob("corpus-*.pt"))) == 2
    other = mb.train_tokenizer((s for d in docs[:3] for s in d), 100)
    _, cached, _ = mb.cached_corpus(other, docs, str(tmp_path))  # another tokenizer: another key
    assert not cached and len(list(tmp_path.glob("corpus-*.pt"))) == 3
    for damage in (b"garbage", path.read_bytes()[:-100]):
        path.write_bytes(damage)
        rebuilt, cached, _ = mb.cached_corpus(tok, docs, str(tmp_path))
        assert not cached and "damaged" in capsys.readouterr().err
        assert all(torch.equal(x, y) for x, y in zip(corpus, rebuilt))
        assert mb.cached_corpus(tok, docs, str(tmp_path))[1]  # and written again, whole


def test_collapse_warning():
    """The detector, on evaluations as a run prints them: the plateau (flat, many "the") passes; a
    collapse to one token after doing better, or a held-out loss rising well above its best, warns."""
    ev = lambda loss, acc, top: {"mlm_loss": loss, "mlm_acc": acc, "nsp_acc": 0.5, "top_share": top}
    start = [ev(7.8, 0.06, 1.0)]  # epoch 1: "the" everywhere, but it never did better
    assert mb.health_warning(start, ev(7.0, 0.06, 0.97)) is None
    assert mb.health_warning(start, ev(7.5, 0.04, 0.98)) is None  # on the plateau, "," in place of "the"
    plateau = start + [ev(6.6, 0.15, 0.45), ev(6.5, 0.16, 0.40)]
    assert mb.health_warning(plateau, ev(6.5, 0.155, 0.42)) is None
    assert "collapsed" in mb.health_warning(plateau, ev(6.9, 0.06, 0.99))
    assert "diverging" in mb.health_warning(plateau, ev(7.2, 0.14, 0.5))


def test_collapse_is_detected_in_a_provoked_run(tmp_path, capsys):
    """A tiny model on a small text sits on the plateau (one token predicted nearly everywhere, flat
    accuracy): no warning. Resumed at a learning rate 300 times too high, it is wrecked: a warning."""
    rng, lines = random.Random(0), []
    for d in range(40):
        lines += [f" = Doc {d} = ", " ".join(f"{w.capitalize()} {v} {o} ." for w, v, o in (rng.choice(RULES) for _ in range(8)))]
    docs = mb.parse_wikitext(lines)
    tok = mb.train_tokenizer((s for d in docs for s in d), 120)
    corpus = mb.encode_corpus(tok, docs)
    cfg = dataclasses.replace(TINY, vocab_size=tok.get_vocab_size(), max_len=24, batch_size=16, max_steps=60,
                              lr=3e-3, log_every=1000, out=str(tmp_path))  # 1e-2 diverged on another CPU
    train_docs, val = range(30), mb.make_pairs(corpus, range(30, 40), 24, 1)
    mb.train(cfg, tok, corpus, train_docs, val)
    assert "warning" not in capsys.readouterr().err
    state = mb.load_checkpoint(str(tmp_path))[0]
    assert len(state["history"]) >= 10 and max(h["top_share"] for h in state["history"]) > 0.9  # the plateau
    mb.train(dataclasses.replace(cfg, max_steps=80, lr=1.0, warmup=0.0), tok, corpus, train_docs, val, resume=state)
    err = capsys.readouterr().err
    assert "warning: the model collapsed" in err or "warning: the held-out MLM loss rose" in err, err


RULES = [("cat", "chases", "mouse"), ("dog", "guards", "house"), ("bird", "sings", "song"), ("king", "rules", "land"),
         ("ship", "crosses", "sea"), ("child", "reads", "book"), ("baker", "bakes", "bread"), ("farmer", "plows", "field")]


# ---------------------------------------------------------------------------- other corpora and formats


def test_cornell_corpus(tmp_path):
    sep = " +++$+++ "
    lines = [f"L{i}{sep}u0{sep}m0{sep}ANNA{sep}Utterance number {i} caf\xe9 ." for i in range(1, 13)]
    (tmp_path / "movie_lines.txt").write_bytes("\n".join(lines).encode("iso-8859-1"))
    convs = [f"u0{sep}u1{sep}m0{sep}['L1', 'L2', 'L3']", f"u0{sep}u1{sep}m0{sep}['L4', 'L5', 'L6', 'L7']",
             f"u0{sep}u1{sep}m0{sep}['L8', 'L9', 'L10', 'L11', 'L12']"]
    (tmp_path / "movie_conversations.txt").write_text("\n".join(convs), encoding="iso-8859-1")
    docs = mb.read_corpus([str(tmp_path)])
    assert len(docs) == 3 and docs[1] == [f"Utterance number {i} caf\xe9 ." for i in range(4, 8)]
    tok = mb.train_tokenizer((s for d in docs for s in d), 100)
    corpus = mb.encode_corpus(tok, docs)
    pairs = mb.make_pairs(corpus, range(3), max_len=48, seed=0)  # long enough: no truncation
    assert len(pairs)
    for a0, la, b0, lb, label in pairs.tolist():  # a true pair is consecutive utterances of one conversation
        na, nb = (list(map(int, re.findall(r"\d+", tok.decode(corpus.ids[s : s + n].tolist())))) for s, n in ((a0, la), (b0, lb)))
        assert na == list(range(na[0], na[0] + len(na))) and nb == list(range(nb[0], nb[0] + len(nb)))
        conv = lambda n: 0 if n <= 3 else 1 if n <= 7 else 2
        assert (nb[0] == na[-1] + 1) if label == 0 else (conv(nb[0]) != conv(na[0]))


def test_gzip_and_parquet_files(tmp_path):
    text = make_corpus(n_docs=3)
    with gzip.open(tmp_path / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow
    pq.write_table(pyarrow.table({"text": text.splitlines()}), str(tmp_path / "c.parquet"))  # as the hub stores WikiText
    plain = mb.parse_wikitext(text.splitlines())
    assert mb.read_corpus([str(tmp_path / "c.txt.gz")]) == plain == mb.read_corpus([str(tmp_path / "c.parquet")])


def test_every_shape_of_text_gives_the_same_documents(tmp_path):
    """A document per line, per blank-line block, per row of .jsonl/.json/.csv/.tsv/.parquet, per file of a folder;
    compressed; UTF-16 or with a UTF-8 BOM: the same documents, sentence for sentence."""
    articles = mb.parse_wikitext(make_corpus(n_docs=6).splitlines())
    texts = [" ".join(d) for d in articles]
    files = {"lines.txt": "\n".join(texts), "blocks.txt": "\n\n".join("\n".join(d) for d in articles),
             "rows.jsonl": "\n".join(json.dumps({"id": i, "text": t}) for i, t in enumerate(texts)),
             "rows.json": json.dumps([{"text": t} for t in texts]), "rows.tsv": "text\n" + "\n".join(texts),
             "rows.csv": "n,text\n" + "\n".join(f'{i},"{t}"' for i, t in enumerate(texts))}
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    import bz2, lzma
    for ext, pack in ((".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress)):
        (tmp_path / ("lines.txt" + ext)).write_bytes(pack(files["lines.txt"].encode()))
        (tmp_path / ("rows.jsonl" + ext)).write_bytes(pack(files["rows.jsonl"].encode()))
    (tmp_path / "utf16.txt").write_text(files["lines.txt"], encoding="utf-16")  # with its byte-order mark
    (tmp_path / "folder").mkdir()
    for i, d in enumerate(articles):  # a file per document: its sentences in paragraphs
        (tmp_path / "folder" / f"{i:02}.txt").write_text("\n\n".join(d) + "\n")
    (tmp_path / "folder" / "notes.pt").write_bytes(b"\0\1")  # not text: ignored
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow
    pq.write_table(pyarrow.table({"text": texts, "n": list(range(len(texts)))}), str(tmp_path / "rows.parquet"))
    for name in [*files, "lines.txt.gz", "lines.txt.bz2", "lines.txt.xz", "rows.jsonl.gz", "rows.jsonl.xz",
                 "utf16.txt", "folder", "rows.parquet"]:
        assert mb.read_corpus([str(tmp_path / name)]) == articles, name
    (tmp_path / "bom.txt").write_text("\ufeff" + make_corpus(n_docs=6), encoding="utf-8")  # the BOM hid a title
    assert mb.read_corpus([str(tmp_path / "bom.txt")]) == articles


def coverage(corpus, pairs):
    """The share of the corpus's tokens in a pair's A or B (the data line's figure counts those of A and IsNext's B)."""
    held = torch.zeros(len(corpus.ids), dtype=torch.bool)
    for start, length in pairs[:, :4].reshape(-1, 2).tolist():
        held[start : start + length] = True
    return held.float().mean().item()


def test_sentences_split_in_any_script_and_long_ones_are_cut(tok):
    """Capitals of any script end a sentence before them (and 。 ends one); a sentence that pairing cannot use whole
    (lower-cased or unpunctuated text) is cut into pieces at token level, so that an epoch's pairs hold ~all tokens."""
    assert mb.SENTENCE_END.split("Der Hund schläft . Ärger kommt . Это кот. Ёж спит! «Да». 猫です。犬です") == [
        "Der Hund schläft .", "Ärger kommt .", "Это кот.", "Ёж спит! «Да». 猫です。", "犬です"]
    docs = [[" ".join(d).lower()] for d in mb.parse_wikitext(make_corpus().splitlines())]  # an article per line
    corpus = mb.encode_corpus(tok, docs)
    assert all(len(d) == 1 for d in docs) and (corpus.sents.diff() > 40).all()  # one long sentence each
    S, D = mb.cut_long(corpus, 14)
    lens = torch.tensor(S).diff()
    assert lens.max() <= 14 and S[-1] == len(corpus.ids) and D[-1] == len(S) - 1 and len(D) == len(docs) + 1
    pairs = mb.make_pairs(corpus, range(len(docs)), 32, seed=0)
    assert (pairs[:, 1] + pairs[:, 3] <= 29).all() and coverage(corpus, pairs) > 0.9


def test_one_document_is_cut_so_that_notnext_has_partners(tmp_path):
    (tmp_path / "one.txt").write_text(" ".join(w for _ in range(400) for w in WORDS[:12]) + "\n")  # one line, no "."
    train_docs, val_docs, note = mb.held_out([str(tmp_path / "one.txt")], TINY)
    assert len(train_docs) == 18 and len(val_docs) == 2 and "one document" in note
    assert sum(len(s.split()) for d in train_docs + val_docs for s in d) == 4800  # every word, once
    (tmp_path / "short.txt").write_text(" ".join(WORDS[:10] * 50) + "\n")  # 500 words: parts of 100, each pairs
    train_docs, val_docs, _ = mb.held_out([str(tmp_path / "short.txt")], TINY)
    assert [len(d[0].split()) for d in train_docs] == [100] * 5 and not val_docs  # too few to hold some out


def test_full_disk_keeps_the_last_checkpoint_and_says_which(tmp_path, tok, docs, monkeypatch):
    """A save that runs out of space: one line naming the step kept; metrics.jsonl has no evaluation that no
    checkpoint holds; no temporary file is left. The corpus cache is best effort, whatever fails."""
    cfg = dataclasses.replace(TINY, vocab_size=tok.get_vocab_size(), max_len=32, batch_size=8, max_steps=4,
                              save_every=2, out=str(tmp_path))
    corpus, n = mb.encode_corpus(tok, docs), len(docs) - 2
    val = mb.make_pairs(corpus, range(n, len(docs)), cfg.max_len, 1)
    real_save, calls = torch.save, []

    def save(obj, f):  # the second checkpoint: the disk fills up half-way, as torch reports it
        calls.append(1)
        if len(calls) == 2:
            f.write(b"x" * 100)
            try:
                raise OSError(28, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos 64 vs 0")
        real_save(obj, f)
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SystemExit) as err:
        mb.train(cfg, tok, corpus, range(n), val)
    assert "No space left on device" in err.value.code and "the last checkpoint (step 2)" in err.value.code
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "model.pt"]  # no temporary file
    assert [r["eval"] for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if "eval" in r] == [2]
    assert mb.load_checkpoint(str(tmp_path))[0]["step"] == 2
    monkeypatch.setattr(mb, "save_checkpoint", lambda *a: (_ for _ in ()).throw(RuntimeError("full")))
    assert mb.cached_corpus(tok, docs, str(tmp_path))[0].ids.equal(corpus.ids)  # no cache, no error


def test_nan_evaluation_warns_and_is_not_saved(tmp_path, tok, docs, monkeypatch, capsys):
    cfg = dataclasses.replace(TINY, vocab_size=tok.get_vocab_size(), max_len=32, batch_size=8, max_steps=4,
                              save_every=2, out=str(tmp_path))
    corpus, n = mb.encode_corpus(tok, docs), len(docs) - 2
    real = mb.evaluate
    monkeypatch.setattr(mb, "evaluate", lambda *a: {**real(*a), "mlm_loss": math.nan})
    mb.train(cfg, tok, corpus, range(n), mb.make_pairs(corpus, range(n, len(docs)), cfg.max_len, 1))
    assert "held-out MLM loss is nan" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "model.pt")  # every evaluation was NaN: nothing saved


# ---------------------------------------------------------------------------- the command line, as subprocesses


def run(*args, cwd=None, env=None):  # in an empty folder: a user's out/ in the project changes nothing
    return subprocess.run([sys.executable, os.path.join(HERE, "minibert.py"), *args], capture_output=True, text=True,
                          cwd=cwd or tempfile.mkdtemp(), env=env, timeout=120)


FORK_SERVER = r"""
import json, os, runpy, sys, traceback
import torch, torch._dynamo, tokenizers  # imported once here; each forked case starts with them loaded (a BERT's
# first normal_ imports torch._dynamo: ~1.5 s of CPU per case that builds one)
script, cases = sys.argv[1], json.load(sys.stdin)
children = {}
for name, args in cases.items():
    env = args.pop() if args and isinstance(args[-1], dict) else {}  # a case may end with its environment
    pid = os.fork()
    if pid == 0:  # the child is `python minibert.py *args`, down to how Python itself exits
        os.environ.update(env)
        out, err = (os.open(os.path.join(os.environ["CASE_DIR"], name + s), os.O_WRONLY | os.O_CREAT) for s in (".out", ".err"))
        os.dup2(out, 1), os.dup2(err, 2)
        sys.argv = [script, *args]
        code = 0
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    children[pid] = name
codes = {children[pid]: os.waitstatus_to_exitcode(status) for pid, status in (os.wait() for _ in cases)}
print(json.dumps(codes))
"""


def run_many(cases, env):
    """Run `python minibert.py ARGS` for every case at once. Each case is its own process, forked from one
    server that imported torch already (it ran no torch op, so the fork is safe): ~2 s of imports once,
    not once per case."""
    case_dir = env["CASE_DIR"] = os.path.join(os.path.dirname(cases["demo"][-1]), "cases")
    os.makedirs(case_dir, exist_ok=True)
    server = subprocess.run([sys.executable, "-c", FORK_SERVER, os.path.join(HERE, "minibert.py")], input=json.dumps(cases),
                            capture_output=True, text=True, env=env, timeout=300, cwd=case_dir)  # (default --out: here)
    assert server.returncode == 0, server.stderr
    codes = json.loads(server.stdout)
    read = lambda k, ext: open(os.path.join(case_dir, k + ext), encoding="utf-8").read()
    return {k: (codes[k], read(k, ".out"), read(k, ".err")) for k in cases}


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Train a tiny checkpoint through the CLI, then run every other command at once (each process
    pays ~2 s to import torch; in parallel they fit the test budget)."""
    d = tmp_path_factory.mktemp("cli")
    cpu = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")  # the CPU, one thread each (~50 at once); no ~50 CUDA
    # contexts at once on a small GPU (CUDA is tested in-process, below and in test_overfit_one_batch_cuda)
    corpus = d / "corpus.txt"
    corpus.write_text(make_corpus())
    ckpt = str(d / "ckpt")
    trained = run("train", "--data", str(corpus), "--preset", "tiny", "--vocab_size", "300", "--max_len", "48",
                  "--batch_size", "8", "--max_steps", "6", "--log_every", "2", "--out", ckpt, env=cpu)
    assert trained.returncode == 0, trained.stderr
    (d / "empty.txt").write_text("")
    rows = ["sentence\tlabel", *(f"{t[0]}\t{'pos' if y else 'neg'}" for t, y in labelled(60)), "\tpos", "the cat " * 40 + "\tneg"]
    (d / "task.tsv").write_text("\n".join(rows) + "\n")  # with an empty text, and one longer than max_len
    ft = str(d / "ft")
    tuned = run("finetune", "--ckpt", ckpt, "--data", str(d / "task.tsv"), "--out", ft, "--epochs", "2", "--batch_size", "8",
                "--log_every", "4", env=cpu)
    assert tuned.returncode == 0, tuned.stderr
    (d / "stars.tsv").write_text("sentence\tstars\nthe cat sat\t1\n")
    (d / "body.csv").write_text("body,label\nthe cat sat,1\n")
    (d / "one_class.csv").write_text("text,label\nthe cat sat,1\nthe dog ran,1\n")
    (d / "maybe.tsv").write_text("sentence\tlabel\nthe cat sat\tmaybe\n")
    (d / "latin1.tsv").write_bytes("sentence\tlabel\ncaf\xe9\t1\n".encode("iso-8859-1"))
    (d / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\n")
    (d / "bpe.json").write_text('{"model": {"type": "BPE", "merges": []}}')
    (d / "latin1.txt").write_bytes("caf\xe9 au lait . Encore .\n".encode("iso-8859-1"))
    (d / "one.txt").write_text("Just one sentence here .\n")
    (d / "rand.gz").write_bytes(b"not gzip")
    (d / "other.txt").write_text(make_corpus(seed=1))
    bad = d / "bad"
    bad.mkdir()
    (bad / "model.pt").write_bytes(b"not a checkpoint")
    (bad / "tokenizer.json").write_text("{}")
    trunc = d / "trunc"
    trunc.mkdir()
    (trunc / "model.pt").write_bytes(open(os.path.join(ckpt, "model.pt"), "rb").read()[:5000])
    old = d / "old"  # a checkpoint of an earlier version: another name for a weight
    old.mkdir()
    state = torch.load(os.path.join(ckpt, "model.pt"), weights_only=True)
    state["model"]["emb.tok.weight"] = state["model"].pop("tok_emb.weight")
    torch.save(state, old / "model.pt")
    gpu = d / "gpu"  # a run trained on a GPU, resumed on this CPU without --device
    gpu.mkdir()
    state["model"]["tok_emb.weight"] = state["model"].pop("emb.tok.weight")
    state["config"]["device"], state["rng"]["mask"] = "cuda", torch.zeros(16, dtype=torch.uint8)
    torch.save(state, gpu / "model.pt")
    shutil.copytree(ckpt, d / "exported")  # export into a checkpoint's own folder must not damage it
    for name in ("finished", "other_data", "edited", "busy"):  # resumes of their own: one run per folder at a time
        shutil.copytree(ckpt, d / name)
    (d / "edited.txt").write_text(make_corpus().replace("cat", "dog"))  # the text edited after the run began
    state = torch.load(d / "edited" / "model.pt", weights_only=True)
    state["data"] = [str(d / "edited.txt")]  # (the run's text, as --resume without --data finds it)
    torch.save(state, d / "edited" / "model.pt")
    lock = open(d / "busy" / "lock", "w")  # another run, alive, holds the folder
    import fcntl
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lock.write(str(os.getpid())), lock.flush()
    articles = mb.parse_wikitext(make_corpus().splitlines())
    (d / "lower.txt").write_text("\n\n".join(" ".join(a).lower().replace(" .", "") for a in articles) + "\n")
    (d / "short_docs.txt").write_text("\n\n".join(["\n".join(articles[0][:2]), *(a[0] for a in articles[1:7])]))
    # (7 documents, 6 of one sentence)
    (d / "utf16le.txt").write_bytes("The cat sat .\n".encode("utf-16-le"))  # no byte-order mark
    (d / "texts.zip").write_bytes(b"PK\x03\x04" + b"\0" * 30)
    (d / "damaged.txt.xz").write_bytes(b"\xfd7zXZ\0" + b"x" * 40)
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow
    pq.write_table(pyarrow.table({"content": ["The cat sat ."]}), str(d / "content.parquet"))
    half_cornell = d / "cornell"  # movie_lines.txt without movie_conversations.txt
    half_cornell.mkdir()
    (half_cornell / "movie_lines.txt").write_text("L1 +++$+++ u0 +++$+++ m0 +++$+++ A +++$+++ Hi .\n")
    # issue 28: tables of every shape; a regression checkpoint; a full disk; a budgeted run
    rng = random.Random(0)  # STS-B's shape: scores 0.0-5.0, "bright" high, "dark" low
    (d / "scores.tsv").write_text("sentence\tlabel\n" + "".join(f"{t[0]}\t{(4.0 if y else 1.0) + rng.choice([-0.4, 0, 0.6]):.1f}\n"
                                                             for t, y in labelled(48)))
    ints = [f"{t[0]}\t{y}{'.0' * (i % 2)}" for i, (t, y) in enumerate(labelled(40))]  # "1.0" is the class "1"
    (d / "ints.tsv").write_text("\n".join(["sentence\tlabel", *ints[:20], "sentence\tlabel", *ints[20:]]) + "\n")  # two files, cat
    (d / "more.tsv").write_text("sentence\tlabel\n" + "".join(f"{t[0]}\t{'pos' if y else 'neg'}\n" for t, y in labelled(7, 1)))
    (d / "reviews.tsv").write_text("review\tstars\n" + "".join(f"{t[0]}\t{'pos' if y else 'neg'}\n" for t, y in labelled(9)))
    (d / "header_only.tsv").write_text("sentence\tlabel\n")
    (d / "no_rows.tsv").write_text("sentence\tlabel\n\tpos\n")
    (d / "damaged.jsonl").write_text('{"text": "a", "label": 1}\n\n{"text": "b, "label": 0}\n')  # line 3
    (d / "hand_vocab.txt").write_text("\n".join([*mb.SPECIALS, "the", "cat", "."]) + "\n")
    (d / "one_line.txt").write_text(" ".join(" ".join(a) for a in articles) + "\n")  # one document: cut, as train cuts it
    (d / "exported_before").mkdir()
    (d / "exported_before" / "config.json").write_text("mine")
    for name in ("full", "full_ft"):  # metrics.jsonl on a full disk
        (d / name).mkdir()
        os.symlink("/dev/full", d / name / "metrics.jsonl")
    shutil.copytree(ckpt, d / "budgeted")  # a --budget run, finished
    state = torch.load(d / "budgeted" / "model.pt", weights_only=True)
    state["config"]["budget"] = 0.001
    torch.save(state, d / "budgeted" / "model.pt")
    (d / "reg").mkdir()  # a regression model (untrained: demo, eval and export read it)
    cfg = mb.Config(**state["config"])
    reg = mb.Classifier(cfg, 1)
    torch.save({"model": reg.state_dict(), "config": state["config"], "tokenizer": state["tokenizer"], "labels": ["label"],
                "columns": ["sentence", "label"], "task": "regression"}, d / "reg" / "model.pt")
    c, task = str(corpus), str(d / "task.tsv")
    cases = {
        "ft_regression": ["finetune", "--ckpt", ckpt, "--data", str(d / "scores.tsv"), "--out", str(d / "f_reg"), "--epochs", "1",
                          "--batch_size", "8"],
        "ft_int_labels": ["finetune", "--ckpt", ckpt, "--data", str(d / "ints.tsv"), "--out", str(d / "f_int"), "--epochs", "1",
                          "--batch_size", "8"],
        "reg_demo": ["demo", "a bright day", "--ckpt", str(d / "reg")],
        "reg_eval": ["eval", "--data", str(d / "scores.tsv"), "--ckpt", str(d / "reg")],
        "reg_export": ["export", "--ckpt", str(d / "reg"), "--to", str(d / "reg_hf")],
        "ft_eval_two": ["eval", "--data", task, str(d / "more.tsv"), "--ckpt", ft, "--json"],
        "ft_eval_other_cols": ["eval", "--data", str(d / "reviews.tsv"), "--ckpt", ft, "--text_cols", "review", "--label_col",
                               "stars"],
        "ft_demo_long": ["demo", "a bright day " * 30, "--ckpt", ft],
        "ft_demo_pair": ["demo", "a bright day", "the dark night", "--ckpt", ft],
        "ft_three_text_cols": ["finetune", "--ckpt", ckpt, "--data", task, "--text_cols", "a", "b", "c", "--out", str(d / "f10")],
        "ft_header_only": ["finetune", "--ckpt", ckpt, "--data", str(d / "header_only.tsv"), "--out", str(d / "f11")],
        "ft_damaged_jsonl": ["finetune", "--ckpt", ckpt, "--data", str(d / "damaged.jsonl"), "--out", str(d / "f12")],
        "ft_val_share_zero": ["finetune", "--ckpt", ckpt, "--data", task, "--val_share", "0", "--out", str(d / "f13")],
        "ft_val_no_rows": ["finetune", "--ckpt", ckpt, "--data", task, "--val", str(d / "no_rows.tsv"), "--out", str(d / "f14")],
        "ft_full_disk": ["finetune", "--ckpt", ckpt, "--data", task, "--out", str(d / "full_ft"), "--epochs", "1"],
        "full_disk_log": ["train", "--data", c, "--preset", "tiny", "--vocab_size", "300", "--max_len", "48", "--max_steps", "2",
                          "--log_every", "1", "--out", str(d / "full")],
        "budget_and_max_steps": ["train", "--data", c, "--budget", "1", "--max_steps", "10", "--out", str(d / "o20")],
        "resume_budget_max_steps": ["train", "--resume", "--out", str(d / "budgeted"), "--max_steps", "400"],
        "resume_budget_finished": ["train", "--resume", "--out", str(d / "budgeted")],
        "tok_hand_vocab": ["train", "--data", c, "--tokenizer", str(d / "hand_vocab.txt"), "--preset", "tiny", "--max_len", "48",
                           "--max_steps", "1", "--out", str(d / "o21")],
        "tok_vocab_size": ["train", "--data", c, "--tokenizer", ckpt, "--vocab_size", "30000", "--out", str(d / "o22")],
        "init_std_huge": ["train", "--data", c, "--init_std", "1000", "--out", str(d / "o23")],
        "resume_finetuned": ["train", "--data", c, "--resume", "--out", ft],
        "eval_one_line": ["eval", "--data", str(d / "one_line.txt"), "--ckpt", ckpt, "--json"],
        "eval_pretrained_cols": ["eval", "--data", c, "--ckpt", ckpt, "--label_col", "stars"],
        "export_over_files": ["export", "--ckpt", ckpt, "--to", str(d / "exported_before")],
        "ft_demo": ["demo", "a bright day", "--ckpt", ft],
        "ft_eval": ["eval", "--data", task, "--ckpt", ft, "--json"],
        "ft_export": ["export", "--ckpt", ft, "--to", str(d / "ft_hf")],
        "ft_demo_three": ["demo", "a", "b", "c", "--ckpt", ft],
        "ft_eval_no_data": ["eval", "--ckpt", ft],
        "ft_no_label": ["finetune", "--ckpt", ckpt, "--data", str(d / "stars.tsv"), "--out", str(d / "f1")],
        "ft_no_text": ["finetune", "--ckpt", ckpt, "--data", str(d / "body.csv"), "--out", str(d / "f2")],
        "ft_one_class": ["finetune", "--ckpt", ckpt, "--data", str(d / "one_class.csv"), "--out", str(d / "f3")],
        "ft_unseen_label": ["finetune", "--ckpt", ckpt, "--data", task, "--val", str(d / "maybe.tsv"), "--out", str(d / "f4")],
        "ft_not_utf8": ["finetune", "--ckpt", ckpt, "--data", str(d / "latin1.tsv"), "--out", str(d / "f5")],
        "ft_empty_file": ["finetune", "--ckpt", ckpt, "--data", str(d / "empty.txt"), "--out", str(d / "f6")],
        "ft_missing_file": ["finetune", "--ckpt", ckpt, "--data", str(d / "nope.tsv"), "--out", str(d / "f7")],
        "ft_ckpt_classifier": ["finetune", "--ckpt", ft, "--data", task, "--out", str(d / "f8")],
        "ft_ckpt_foreign": ["finetune", "--ckpt", str(bad), "--data", task, "--out", str(d / "f9")],
        "ft_existing_out": ["finetune", "--ckpt", ckpt, "--data", task, "--out", ft],
        "tok_missing": ["train", "--data", c, "--tokenizer", str(d / "nowhere.txt"), "--out", str(d / "t1")],
        "tok_no_specials": ["train", "--data", c, "--tokenizer", str(d / "vocab.txt"), "--out", str(d / "t2")],
        "tok_not_json": ["train", "--data", c, "--tokenizer", str(d / "bpe.json"), "--out", str(d / "t3")],
        "tok_resume": ["train", "--data", c, "--resume", "--out", ckpt, "--tokenizer", ckpt],
        "budget_inf": ["train", "--data", c, "--budget", "inf"],
        "demo": ["demo", "the [MASK] sat on the [MASK] .", "--ckpt", ckpt],
        "demo_odd": ["demo", "caf\xe9  \U0001F600 [MASK][MASK]   " + "x" * 300 + " [MASK]", "--ckpt", ckpt, "--top_k", "3"],
        "demo_long": ["demo", "the [MASK] sat . " + "the cat sat . " * 40 + "the [MASK] sat .", "--ckpt", ckpt],
        "demo_top_k_huge": ["demo", "[MASK] is a city .", "--ckpt", ckpt, "--top_k", "50000"],
        "demo_ckpt_file": ["demo", "the [MASK] sat .", "--ckpt", os.path.join(ckpt, "model.pt")],
        "data_not_gzip": ["train", "--data", str(d / "rand.gz"), "--out", str(d / "o12")],
        "eval": ["eval", "--data", c, "--ckpt", ckpt, "--json"],
        "eval_again": ["eval", "--data", c, "--ckpt", ckpt, "--json"],
        "resume_finished": ["train", "--out", str(d / "finished"), "--resume"],  # the run's --data, from its checkpoint
        "eval_twice": ["eval", "--data", c, "--data", str(d / "other.txt"), "--ckpt", ckpt, "--json"],
        "no_command": [],
        "train_help": ["train", "--help"],
        "no_mask": ["demo", "the cat sat", "--ckpt", ckpt],
        "empty_text": ["demo", "", "--ckpt", ckpt],
        "no_ckpt": ["demo", "the [MASK] sat", "--ckpt", str(d / "nowhere")],
        "foreign_ckpt": ["demo", "the [MASK] sat", "--ckpt", str(bad)],
        "truncated_ckpt": ["eval", "--data", c, "--ckpt", str(trunc)],
        "old_version_ckpt": ["train", "--data", c, "--resume", "--out", str(old)],
        "old_version_demo": ["demo", "the [MASK] sat", "--ckpt", str(old)],
        "old_version_export": ["export", "--ckpt", str(old), "--to", str(d / "hf_old")],
        "resume_from_gpu": ["train", "--data", c, "--resume", "--out", str(gpu), "--max_steps", "8"],
        "data_missing": ["train", "--data", str(d / "nope.txt"), "--out", str(d / "o1")],
        "data_empty": ["train", "--data", str(d / "empty.txt"), "--out", str(d / "o2")],
        "data_folder": ["train", "--data", str(bad), "--out", str(d / "o3")],
        "data_latin1": ["train", "--data", str(d / "latin1.txt"), "--out", str(d / "o4")],
        "data_too_little": ["train", "--data", str(d / "one.txt"), "--out", str(d / "o5")],
        "cornell_half": ["train", "--data", str(half_cornell), "--out", str(d / "o10")],
        "unknown_flag": ["train", "--data", c, "--bogus", "1"],
        "abbreviated_flag": ["train", "--data", c, "--max_step", "5"],
        "negative_max_steps": ["train", "--data", c, "--max_steps", "-5"],
        "bad_type": ["train", "--data", c, "--batch_size", "many"],
        "zero_batch": ["train", "--data", c, "--batch_size", "0"],
        "batch_not_multiple": ["train", "--data", c, "--batch_size", "6", "--grad_accum", "4"],
        "negative_epochs": ["train", "--data", c, "--epochs", "-1"],
        "zero_lr": ["train", "--data", c, "--lr", "0"],
        "bad_preset": ["train", "--data", c, "--preset", "huge"],
        "unwritable_out": ["train", "--data", c, "--out", str(corpus / "sub")],
        "existing_out": ["train", "--data", c, "--out", ckpt],
        "resume_other_shape": ["train", "--data", c, "--out", ckpt, "--resume", "--hidden", "64"],
        "no_hub": ["train", "--out", str(d / "o7")],
        "top_k_zero": ["demo", "the [MASK] sat", "--ckpt", ckpt, "--top_k", "0"],
        "heads_mismatch": ["train", "--data", c, "--hidden", "100", "--heads", "3"],
        "max_len_too_long": ["train", "--data", c, "--max_len", "1000"],
        "max_len_too_short_to_halve": ["train", "--data", c, "--max_len", "12"],  # a CPU run: --short_share 0.9
        "dropout_range": ["train", "--data", c, "--dropout", "1.5"],
        "resume_nothing": ["train", "--data", c, "--resume", "--out", str(d / "o8")],
        "resume_other_data": ["train", "--data", str(d / "other.txt"), "--resume", "--out", str(d / "other_data")],
        "resume_edited": ["train", "--resume", "--out", str(d / "edited"), "--max_steps", "8"],
        "resume_max_len": ["train", "--data", c, "--resume", "--out", ckpt, "--max_len", "64"],
        "resume_seed": ["train", "--data", c, "--resume", "--out", ckpt, "--seed", "1"],
        "out_in_use": ["train", "--resume", "--out", str(d / "busy"), "--max_steps", "8"],
        "eval_held_out": ["eval", "--ckpt", ckpt, "--json"],
        "lr_inf": ["train", "--data", c, "--lr", "inf"],
        "weight_decay_inf": ["train", "--data", c, "--weight_decay", "inf"],
        "data_utf16_no_bom": ["train", "--data", str(d / "utf16le.txt"), "--out", str(d / "o13")],
        "data_zip": ["train", "--data", str(d / "texts.zip"), "--out", str(d / "o14")],
        "data_damaged_xz": ["train", "--data", str(d / "damaged.txt.xz"), "--out", str(d / "o15")],
        "data_no_text_column": ["train", "--data", str(d / "body.csv"), "--out", str(d / "o16")],
        "parquet_no_text_column": ["train", "--data", str(d / "content.parquet"), "--out", str(d / "o17")],
        "eval_tsv_on_pretrained": ["eval", "--data", task, "--ckpt", ckpt],
        "train_lower": ["train", "--data", str(d / "lower.txt"), "--preset", "tiny", "--vocab_size", "300", "--max_len",
                        "48", "--max_steps", "1", "--out", str(d / "o18")],
        "train_short_docs": ["train", "--data", str(d / "short_docs.txt"), "--preset", "tiny", "--vocab_size", "300",
                             "--max_len", "48", "--max_steps", "1", "--out", str(d / "o19")],
        "export_no_ckpt": ["export", "--ckpt", str(d / "nowhere"), "--to", str(d / "hf")],
        "export_unwritable": ["export", "--ckpt", ckpt, "--to", str(corpus / "hf")],
        "export_into_ckpt": ["export", "--ckpt", str(d / "exported"), "--to", str(d / "exported")],
        "eval_too_little": ["eval", "--data", str(d / "one.txt"), "--ckpt", ckpt],
        "demo_only_mask": ["demo", "[MASK]", "--ckpt", ckpt],
        "demo_lower_mask": ["demo", "the [mask] sat", "--ckpt", ckpt],
        "bench_out_of_memory": ["bench", "--device", "cpu", "--preset", "tiny", "--batch_size", "1000000000", "--max_len", "16"],
        "lr_diverges": ["train", "--data", c, "--preset", "tiny", "--vocab_size", "300", "--max_len", "48", "--lr", "1e6",
                        "--max_steps", "12", "--out", str(d / "o11")],
    }
    # DistributedDataParallel, gloo, two ranks on the CPU (as torchrun starts them), against one process; both go
    # on from the checkpoint above (one tokenizer), with dropout off, 4 more steps
    port = str(socket.create_server(("127.0.0.1", 0)).getsockname()[1])
    for name, world in (("ddp_one", 1), ("ddp_two", 2)):
        shutil.copytree(ckpt, d / name)
        for rank in range(world):
            env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
            cases[f"{name}{rank}"] = ["train", "--data", c, "--resume", "--out", str(d / name), "--dropout", "0", "--max_steps",
                                      "10", "--grad_accum", "2", "--device", "cpu", *([env] if world == 2 else [])]
    cases["no_cuda"] = ["train", "--data", c, "--device", "cuda", "--out", str(d / "o6")]
    env = dict(cpu, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")  # hub: fails at once;
    # one thread per case: ~50 cases run at once on the cores, and torch's thread pools would fight
    results = run_many(cases, env)
    lock.close()
    p = run(*cases["unknown_flag"], env=env)  # and once as a plain `python minibert.py ...`, to be sure
    assert (p.returncode, p.stdout, p.stderr) == results["unknown_flag"]
    return {"trained": trained, "ckpt": ckpt, "out": d, "tuned": tuned, **results}


def test_cli_train_writes_checkpoint_and_log(cli):
    out = cli["trained"].stdout
    assert "step 6/6" in out and "data:" in out and "config:" in out
    assert {f for f in os.listdir(cli["ckpt"]) if not f.startswith("corpus-")} == {"model.pt", "metrics.jsonl", "lock"}
    log = [json.loads(line) for line in open(os.path.join(cli["ckpt"], "metrics.jsonl"))]
    assert [r["step"] for r in log if "loss" in r] == [2, 4, 6] and all(math.isfinite(r["loss"]) for r in log if "loss" in r)
    assert any(r.get("eval") == 6 for r in log)


def test_cli_demo_fills_every_mask(cli):
    code, out, err = cli["demo"]
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[MASK] 1:") and lines[1].startswith("[MASK] 2:")
    probs = [float(x) for x in lines[0].split()[3::2]]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


def test_cli_demo_odd_input_works(cli):
    code, out, err = cli["demo_odd"]  # unicode, emoji, spaces, masks in a row, a very long word
    assert code == 0, err
    assert len(out.strip().splitlines()) == 3


def test_cli_demo_long_text_is_one_line(cli):
    code, out, err = cli["demo_long"]  # longer than max_len
    assert code == 1 and not out and "tokens, more than the model's" in err and len(err.strip().splitlines()) == 1, err


def test_cli_demo_top_k_beyond_the_vocabulary(cli):
    code, out, err = cli["demo_top_k_huge"]
    vocab = mb.load_checkpoint(cli["ckpt"])[2].vocab_size
    assert code == 0, err
    assert len(out.split()) == 2 + 2 * vocab  # every token, once


def test_cli_ckpt_may_name_the_model_file(cli):
    code, out, err = cli["demo_ckpt_file"]  # --ckpt DIR/model.pt, not DIR
    assert code == 0 and out.startswith("[MASK] 1: "), err


def test_cli_demo_single_and_lower_case_mask(cli):
    for case in ("demo_only_mask", "demo_lower_mask"):
        code, out, err = cli[case]
        assert code == 0 and out.startswith("[MASK] 1:") and len(out.strip().splitlines()) == 1, err


def test_cli_eval_repeats(cli):
    (code, out, err), (code2, out2, _) = cli["eval"], cli["eval_again"]
    assert code == 0 and code2 == 0, err
    m = json.loads(out)
    assert set(m) >= {"mlm_loss", "mlm_acc", "nsp_acc"} and 0 <= m["mlm_acc"] <= 1 and m["mlm_loss"] > 0
    assert out == out2  # a fixed seed: the same numbers every time


def test_cli_resume_of_a_finished_run_says_so_and_uses_the_cache(cli):
    code, out, err = cli["resume_finished"]
    assert code == 0, err
    assert "corpus cached" in out and "had finished (6 steps" in out and "--max_steps" in out


def test_cli_own_text_is_used_whole_and_says_so(cli):
    """Lower-cased text, an article per line: its long 'sentences' are cut, so an epoch's pairs hold ~all its tokens.
    Documents of one sentence, and too few documents to hold some out: each a warning that says why."""
    code, out, err = cli["train_lower"]
    assert code == 0 and "warning" not in err, err
    assert int(re.search(r"an epoch's pairs use (\d+)% of the training tokens", out)[1]) >= 90
    code, out, err = cli["train_short_docs"]
    assert code == 0, err
    assert "use only" in err and "a document of one sentence is only a NotNext partner" in err
    assert "no pairs are held out" in err and "0 pairs held out" in out


def test_cli_resume_and_eval_find_the_runs_text(cli):
    """--resume without --data goes on with the run's files; eval without --data scores the run's held-out documents."""
    held = int(re.search(r"(\d+) pairs held out", cli["trained"].stdout)[1])
    code, out, err = cli["eval_held_out"]
    assert code == 0, err
    assert json.loads(out)["pairs"] == held > 0
    end = [r for r in map(json.loads, open(os.path.join(cli["ckpt"], "metrics.jsonl"))) if "eval" in r][-1]
    assert abs(json.loads(out)["mlm_loss"] - end["mlm_loss"]) < 1e-5  # the pairs and masks train's evaluation had
    assert "had finished" in cli["resume_finished"][1]


def test_eval_of_the_run_cuts_its_pairs_as_train_does(cli, monkeypatch, capsys):
    monkeypatch.setattr(mb, "VAL_PAIRS", 3)  # (4,096: more than this corpus has)
    try:
        mb.main(["eval", "--ckpt", cli["ckpt"], "--json"])
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert json.loads(capsys.readouterr().out)["pairs"] == 3


def test_cli_data_given_twice_reads_both(cli):
    (code, out, err), one = cli["eval_twice"], json.loads(cli["eval"][1])
    assert code == 0, err
    assert json.loads(out)["pairs"] > 1.5 * one["pairs"]  # the second file's pairs too


def test_cli_two_processes_match_one(cli):
    """torchrun's two ranks, each with half of every batch (in 2 micro-batches), end where one process with
    the same global batch ends; fp32 sums in another order, so to a tolerance."""
    for case in ("ddp_one0", "ddp_two0", "ddp_two1"):
        assert cli[case][0] == 0, cli[case][2]
    assert "step 10/10" in cli["ddp_two0"][1] and cli["ddp_two1"][1] == ""  # rank 0 alone prints
    one = mb.load_checkpoint(str(cli["out"] / "ddp_one"))[0]
    two = mb.load_checkpoint(str(cli["out"] / "ddp_two"))[0]
    assert one["step"] == two["step"] == 10
    for k, v in one["model"].items():
        assert torch.allclose(v, two["model"][k], atol=1e-5), k


def test_cli_resume_on_the_cpu_of_a_gpu_run(cli):
    code, out, err = cli["resume_from_gpu"]
    assert code == 0, err
    assert "moved between the CPU and a GPU" in out and "step 8/8" in out and '"device": "cpu"' in out
    assert "8 steps, from 6" in out  # where it goes on from


def test_cli_help(cli):
    code, out, err = cli["no_command"]
    assert code == 2 and "train" in err and "demo" in err and "Traceback" not in err
    code, out, err = cli["train_help"]
    assert code == 0 and "sequences per optimizer step" in out and "lr 0.0001" in out  # Config comments; preset lrs


def test_cli_export_into_the_checkpoint_folder_damages_nothing(cli):
    """The checkpoint is model.pt alone (weights, config, tokenizer, ...): Hugging Face's files beside it
    change nothing for demo, eval or --resume."""
    assert cli["export_into_ckpt"][0] == 0, cli["export_into_ckpt"][2]
    folder = str(cli["out"] / "exported")
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= set(os.listdir(folder))
    state, tok, cfg = mb.load_checkpoint(folder)
    ref, ref_tok, _ = mb.load_checkpoint(cli["ckpt"])
    assert tok.to_str() == ref_tok.to_str() and all(torch.equal(v, ref["model"][k]) for k, v in state["model"].items())


def test_cli_non_finite_message_tells_the_truth(cli):
    code, _, err = cli["lr_diverges"]
    assert code == 1 and "non-finite" in err
    ckpt = os.path.join(cli["out"], "o11", "model.pt")
    if "no checkpoint was written" in err:
        assert not os.path.exists(ckpt)
    else:
        step = int(re.search(r"the last checkpoint \(step (\d+)\)", err).group(1))
        assert torch.load(ckpt, weights_only=True)["step"] == step


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupt_while_loading_data_exits_130(monkeypatch, capsys, sig, tmp_path):
    """Ctrl-C or SIGTERM outside the loop: KeyboardInterrupt, so a file being written (the corpus cache) is removed
    (test_interrupted_write_keeps_previous_checkpoint), and exit status 130."""
    monkeypatch.chdir(tmp_path)  # (the default --out, out/, is made here, not in the project)
    # the signal, then a wait in which Python runs its handler (without it, the handler may run only after the
    # lambda has returned None and held_out has failed on it: a flaky TypeError)
    monkeypatch.setattr(mb, "read_corpus", lambda paths: [os.kill(os.getpid(), getattr(signal, sig)), time.sleep(10)])
    try:
        with pytest.raises(SystemExit) as e:
            mb.main(["train", "--data", "x.txt"])
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert e.value.code == 130 and "interrupted" in capsys.readouterr().err


def test_cli_finetune_then_demo_eval_export(cli):
    """finetune says what it did with the rows (one empty, skipped; one cut to max_len) and keeps the best epoch;
    demo prints each label's probability, eval the accuracy; export names the labels for transformers."""
    out = cli["tuned"].stdout
    assert "60 rows" not in out and "1 rows skipped" in out and "1 cut to 48 tokens" in out and "labels neg, pos" in out
    assert "eval (epoch 2" in out and "done: the best epoch" in out
    code, out, _ = cli["ft_demo"]
    probs = dict(zip(out.split()[::2], map(float, out.split()[1::2])))
    assert code == 0 and set(probs) == {"neg", "pos"} and abs(sum(probs.values()) - 1) < 2e-3
    code, out, _ = cli["ft_eval"]
    m = json.loads(out)
    assert code == 0 and m["examples"] == 61 and 0 <= m["acc"] <= 1  # 60 rows and the long one (the empty is skipped)
    config = json.load(open(os.path.join(cli["out"], "ft_hf", "config.json")))
    assert config["architectures"] == ["BertForSequenceClassification"] and config["id2label"] == {"0": "neg", "1": "pos"}


def test_cli_regression_finetune_eval_demo_export(cli):
    """STS-B's shape (scores, not all integers): one output, squared error; eval prints MSE and Pearson's and
    Spearman's correlation, demo the number, export transformers' regression config (num_labels 1)."""
    code, out, err = cli["ft_regression"]
    assert code == 0, err
    assert "| regression: label 0.6 to 4.6 |" in out and re.search(r"step 6: mse [\d.]+ \| pearson -?[\d.]+ \| spearman", out), out
    state = mb.load_checkpoint(str(cli["out"] / "f_reg"))[0]
    assert state["task"] == "regression" and state["labels"] == ["label"] and len(state["model"]["classifier.bias"]) == 1
    code, out, err = cli["reg_demo"]
    assert code == 0 and re.fullmatch(r"label -?\d+\.\d{3}\n", out), err
    code, out, err = cli["reg_eval"]
    assert code == 0 and re.fullmatch(r".*scores.tsv: 48 examples \| mse [\d.]+ \| pearson -?[\d.]+ \| spearman -?[\d.]+\n", out), err
    config = json.load(open(cli["out"] / "reg_hf" / "config.json"))
    assert config["problem_type"] == "regression" and config["id2label"] == {"0": "label"}


def test_cli_tables_as_users_have_them(cli):
    """Integer labels written "1.0" are the class "1"; a header repeated mid-file (files joined with cat) is skipped;
    eval scores every --data file, a line each, and takes the columns' names; a long text in demo is cut, and says so."""
    code, out, err = cli["ft_int_labels"]
    assert code == 0 and "labels 0, 1 |" in out and "| 1 rows skipped" in out, err
    code, out, err = cli["ft_eval_two"]
    lines = [json.loads(s) for s in out.splitlines()]
    assert code == 0 and [(os.path.basename(m["data"]), m["examples"]) for m in lines] == [("task.tsv", 61), ("more.tsv", 7)]
    code, out, err = cli["ft_eval_other_cols"]
    assert code == 0 and re.fullmatch(r".*reviews.tsv: 9 examples \| loss [\d.]+ \| acc [\d.]+\n", out), err
    code, out, err = cli["ft_demo_long"]
    assert code == 0 and out.startswith("neg ") and "warning: the text is cut to the model's 48 tokens" in err


def test_cli_runs_say_what_they_do(cli):
    """A hand-made --tokenizer that lacks the text's words warns; a finished --budget run says to give more --budget;
    eval, as train, cuts one document in parts; nothing is overwritten by export or lost to a full disk."""
    code, out, err = cli["tok_hand_vocab"]
    assert code == 0 and "of the tokens are [UNK]: --tokenizer lacks this text's words" in err, err
    code, out, err = cli["resume_budget_finished"]
    assert code == 0 and "had finished" in out and "--resume with more --budget\n" in out, err
    code, out, err = cli["eval_one_line"]
    assert code == 0 and json.loads(out)["pairs"] > 0, err
    assert open(cli["out"] / "exported_before" / "config.json").read() == "mine"
    assert not os.path.exists(cli["out"] / "full" / "model.pt")  # as its one line says: no checkpoint was written


BAD = {  # case -> what the one-line message must mention
    "ft_demo_three": "reads 1 text(s) (sentence), not 3: put each text in quotes",
    "ft_demo_pair": "reads 1 text(s) (sentence), not 2", "ft_three_text_cols": "--text_cols takes a text column or two (a pair), not 3",
    "ft_header_only": "holds no rows; pass a table: a header row, then a row per example",
    "ft_damaged_jsonl": "Expecting ',' delimiter: line 3 column", "ft_val_share_zero": "--val_share is 0; pass --val FILE",
    "ft_val_no_rows": "no_rows.tsv has no labelled rows", "ft_full_disk": "metrics.jsonl (No space left on device); no checkpoint",
    "full_disk_log": "metrics.jsonl (No space left on device); no checkpoint was written",
    "budget_and_max_steps": "--max_steps and --budget 1 (yours or the run's) both set the length",
    "resume_budget_max_steps": "--max_steps and --budget 0.001 (yours or the run's) both set the length: pass one, or --budget 0",
    "tok_vocab_size": "tokens, not --vocab_size; drop --vocab_size", "init_std_huge": "--init_std must be in (0, 1), not 1000",
    "resume_finetuned": "holds a fine-tuned model, which cannot go on", "export_over_files": "already holds config.json; export overwrites nothing",
    "eval_pretrained_cols": "are for a fine-tuned model", "ft_eval_no_data": "pass --data FILE", "ft_no_label": "needs a 'label' column",
    "ft_no_text": "two text columns", "ft_one_class": "one label only", "ft_unseen_label": "maybe, which the model was not",
    "ft_not_utf8": "not UTF-8 text: byte 0xe9 at offset 18 (line 2", "ft_empty_file": "is not a table", "ft_missing_file": "No such file",
    "ft_ckpt_classifier": "holds a fine-tuned classifier", "ft_ckpt_foreign": "not a minibert checkpoint",
    "ft_existing_out": "already holds a checkpoint", "tok_missing": "cannot read --tokenizer", "tok_no_specials": "has no [MASK]",
    "tok_not_json": "cannot read --tokenizer", "tok_resume": "drop --tokenizer", "budget_inf": "--budget must be finite",
    "no_mask": "no [MASK]", "empty_text": "no [MASK]", "no_ckpt": "train one first", "foreign_ckpt": "not a minibert checkpoint",
    "truncated_ckpt": "not a minibert checkpoint", "old_version_ckpt": "another version of minibert",
    "old_version_demo": "another version of minibert", "old_version_export": "another version of minibert", "data_missing": "(No such file or directory)",
    "data_empty": "holds no text", "data_folder": "is a folder without .txt or .md files", "data_latin1": "is not UTF-8 text: byte 0xe9 at offset 3 (line 1",
    "data_too_little": "too little text", "data_not_gzip": "too little text", "cornell_half": "is a folder without movie_conversations.txt",
    "unknown_flag": "unrecognized arguments: --bogus 1 (see: python minibert.py --help)", "bad_type": "invalid int value",
    "zero_batch": "--batch_size must be positive", "batch_not_multiple": "must be a multiple of",
    "negative_epochs": "--epochs must be positive", "zero_lr": "--lr must be positive",
    "abbreviated_flag": "unrecognized arguments: --max_step", "negative_max_steps": "--max_steps must be finite, not negative",
    "bad_preset": "invalid choice", "unwritable_out": "cannot write", "existing_out": "--resume",
    "resume_other_shape": "hidden 128, not 64", "no_hub": "--data FILE", "top_k_zero": "--top_k",
    "heads_mismatch": "not divisible", "max_len_too_long": "--max_len must be between",
    "max_len_too_short_to_halve": "between 16 (--short_share halves it)", "dropout_range": "--dropout must be in",
    "resume_nothing": "train one first", "resume_other_data": "this text is not the run's", "resume_edited": "edited.txt); pass the run's --data, unchanged",
    "resume_max_len": "has max_len 48, not 64; drop --max_len", "resume_seed": "has seed 1337, not 1; drop --seed",
    "out_in_use": f"is in use by another run (process {os.getpid()})", "lr_inf": "--lr must be positive and finite",
    "weight_decay_inf": "--weight_decay must be finite", "data_utf16_no_bom": "UTF-16 without a byte-order mark (iconv",
    "data_zip": "is not text: a zip or 7z archive (unpack it)", "data_damaged_xz": "cannot read", "eval_tsv_on_pretrained": "(its columns: sentence, label)",
    "data_no_text_column": "has no 'text' column (its columns: body, label)", "parquet_no_text_column": "(its columns: content)", "export_no_ckpt": "train one first",
    "export_unwritable": "cannot create --to", "eval_too_little": "too little text",
    "bench_out_of_memory": "out of memory", "lr_diverges": "lower --lr", "no_cuda": "--device cpu",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_cli_bad_input_is_one_clean_line(cli, case):
    code, out, err = cli[case]
    assert code != 0
    assert "Traceback" not in err and len([s for s in err.strip().splitlines() if not s.startswith("warning:")]) == 1, err
    assert BAD[case] in err


# ---------------------------------------------------------------------------- fine-tuning


def labelled(n, seed=0, pairs=False):
    """A synthetic task: label 1 if the text holds "bright", 0 if it holds "dark" (pairs: in the second text)."""
    rng, plain, rows = random.Random(seed), [w for w in WORDS if w not in ("bright", "dark")], []
    for _ in range(n):
        words, y = [rng.choice(plain) for _ in range(rng.randint(3, 9))], rng.randint(0, 1)
        words.insert(rng.randint(0, len(words)), ("dark", "bright")[y])
        rows.append(((" ".join(rng.choice(plain) for _ in range(2)), " ".join(words)) if pairs else (" ".join(words),), y))
    return rows


def test_finetune_learns_a_pair_task_and_keeps_the_best_epoch(tmp_path, tok):
    """From random weights, 60 steps of 16 pairs take a classifier from chance to >= 0.95 held-out accuracy on a
    task that needs the second text; the checkpoint holds the best epoch and the label names."""
    cfg = dataclasses.replace(TINY, vocab_size=tok.get_vocab_size(), dropout=0.1, lr=3e-3, epochs=3, batch_size=16,
                              log_every=10, out=str(tmp_path))
    rows, val = (mb.encode_rows(tok, labelled(n, seed, True), cfg.max_len)[0] for n, seed in ((320, 0), (100, 1)))
    torch.manual_seed(0)
    model = mb.Classifier(cfg, 2)
    assert abs(mb.evaluate_classifier(model, val, "cpu")["acc"] - 0.5) < 0.15  # chance before
    mb.finetune(cfg, model, tok, rows, val, {"labels": ["dark", "bright"], "columns": ["a", "b", "label"]})
    state = mb.load_checkpoint(str(tmp_path))[0]
    log = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert state["labels"] == ["dark", "bright"] and state["eval"]["acc"] == max(r["acc"] for r in log) >= 0.95
    loaded = mb.load_model(str(tmp_path), "cpu")[0]
    assert isinstance(loaded, mb.Classifier) and mb.evaluate_classifier(loaded, val, "cpu")["acc"] >= 0.95


def test_regression_learns_and_ranks_share_ties(tmp_path, tok):
    """A number per text (STS-B's shape): from random weights, one output and squared error reach a held-out Pearson
    correlation >= 0.95 in 40 steps; Spearman's ranks give tied values their mean rank, as scipy's spearmanr."""
    assert mb.ranks(torch.tensor([3.0, 1.0, 2.0, 2.0, 5.0])).tolist() == [3.0, 0.0, 1.5, 1.5, 4.0]
    cfg = dataclasses.replace(TINY, vocab_size=tok.get_vocab_size(), lr=1e-2, epochs=4, batch_size=16, out=str(tmp_path))
    rows, val = ([(t, 2.0 * y - 1) for t, y in labelled(n, seed)] for n, seed in ((160, 0), (40, 1)))
    rows, val = (mb.encode_rows(tok, r, cfg.max_len)[0] for r in (rows, val))
    torch.manual_seed(0)
    mb.finetune(cfg, mb.Classifier(cfg, 1), tok, rows, val, {"labels": ["score"], "columns": ["a", "score"], "task": "regression"})
    m = mb.load_checkpoint(str(tmp_path))[0]["eval"]
    assert m["pearson"] >= 0.95 and m["spearman"] >= 0.8 and m["mse"] < 0.1, m  # (predicting the mean: 1.0)


def test_encode_rows_pairs_segments_and_cuts(tok):
    """A pair is [CLS] a [SEP] b [SEP] with segment ids 0 then 1, as pretraining's pairs; a text longer than
    max_len is cut to it, and counted."""
    ((pair, _), (one, _)), cut = mb.encode_rows(tok, [(("the cat sat", "on the old mat ."), 1), (("the dog ran",), 0)], 48)
    a, b = (tok.encode(t, add_special_tokens=False).ids for t in ("the cat sat", "on the old mat ."))
    assert pair[0] == [CLS, *a, SEP, *b, SEP] and pair[1] == [0] * (len(a) + 2) + [1] * (len(b) + 1) and cut == 0
    assert one[0][0] == CLS and one[0][-1] == SEP and set(one[1]) == {0}
    ((long_pair, _), _), cut = mb.encode_rows(tok, [(("the cat sat " * 9, "on the mat ."), 0), (("the dog ran",), 0)], 12)
    assert cut == 1 and len(long_pair[0]) == 12 and long_pair[0].count(SEP) == 2 and long_pair[1][-1] == 1
    ids, seg, y = mb.padded([(pair, 1), (one, 0)], "cpu")
    assert ids.shape == seg.shape == (2, 16) and (ids[1, len(one[0]) :] == PAD).all() and y.tolist() == [1, 0]


def test_finetune_starts_from_the_checkpoint_and_scratch_does_not(tmp_path, tok, monkeypatch):
    """The pretrained weights, or --scratch's new ones drawn as BERT's (std 0.02, whatever init_std pretrained)."""
    cfg = dataclasses.replace(TINY, vocab_size=tok.get_vocab_size(), hidden=64, ffn=256, init_std=0.06)
    torch.manual_seed(1)
    write_checkpoint(tmp_path, mb.BERT(cfg), cfg, tok)
    (tmp_path / "t.csv").write_text("text,label\n" + "".join(f"{t[0]},{'pos' if y else 'neg'}\n" for t, y in labelled(20)))
    models = []
    monkeypatch.setattr(mb, "finetune", lambda cfg, model, *a: models.append(model))
    for extra in ([], ["--scratch"]):
        mb.main(["finetune", "--ckpt", str(tmp_path), "--data", str(tmp_path / "t.csv"), "--out", str(tmp_path / "ft"),
                 "--device", "cpu", *extra])
    pretrained = mb.load_checkpoint(str(tmp_path))[0]["model"]
    for name, p in models[0].bert.state_dict().items():
        assert torch.equal(p, pretrained[name]), name
    assert not torch.equal(models[1].bert.tok_emb.weight, pretrained["tok_emb.weight"])
    assert torch.equal(models[0].classifier.weight, models[1].classifier.weight)  # the same new layer (seed)
    assert abs(models[1].bert.layers[0].fc1.weight.std() - 0.02) < 0.002


# ---------------------------------------------------------------------------- a time budget, a given tokenizer


def test_budget_schedule_follows_the_clock_and_resumes(tmp_path, tok, docs, monkeypatch):
    """A fake clock: each step takes 2 s, each evaluation 100 s. A 30-second budget is 15 steps, each at the
    learning rate of the time trained so far, the first half of the time on half-length sequences (short_share);
    evaluations don't count. Stopped at step 5 and resumed, the run
    goes on from 10 s of training to the same end."""
    clock = [1000.0]
    monkeypatch.setattr(mb, "time", type("FakeTime", (), {"time": staticmethod(lambda: clock[0])}))
    lrs, lens, step, evaluate = [], [], mb.train_step, mb.evaluate

    def slow_step(model, opt, loss_fn, batch, lr, cfg, *a):
        clock[0] += 2.0
        lrs.append(lr), lens.append(batch[0].size(1))
        return step(model, opt, loss_fn, batch, lr, cfg, *a)

    def slow_evaluate(*a):
        clock[0] += 100.0
        return evaluate(*a)
    monkeypatch.setattr(mb, "train_step", slow_step)
    monkeypatch.setattr(mb, "evaluate", slow_evaluate)
    cfg = dataclasses.replace(TINY, vocab_size=tok.get_vocab_size(), max_len=32, batch_size=8, budget=0.5, log_every=4,
                              short_share=0.5, out=str(tmp_path / "a"))
    corpus = mb.encode_corpus(tok, docs)
    val = mb.make_pairs(corpus, range(len(docs)), cfg.max_len, 99)[:8]
    mb.train(cfg, tok, corpus, range(len(docs)), val)
    assert lrs == [mb.lr_at(2.0 * i, 30.0, cfg) for i in range(15)] and lrs[-1] < 0.1 * cfg.lr
    assert lens == [16] * 8 + [32] * 7  # short_share 0.5: half-length sequences while under 15 s trained
    assert mb.load_checkpoint(cfg.out)[0]["trained_s"] == 30.0 and max(lrs) == cfg.lr
    lrs.clear()
    b = dataclasses.replace(cfg, out=str(tmp_path / "b"))
    with pytest.raises(SystemExit):
        mb.train(b, tok, corpus, range(len(docs)), val, stop_at=5)
    state = mb.load_checkpoint(b.out)[0]
    assert state["step"] == 5 and state["trained_s"] == 10.0
    mb.train(b, tok, corpus, range(len(docs)), val, resume=state)
    assert lrs == [mb.lr_at(2.0 * i, 30.0, cfg) for i in range(15)]


def test_short_share_trains_half_length_first_and_resumes_exactly(tmp_path, tok, docs, monkeypatch):
    """short_share 0.5 of 12 steps: steps 1-6 on 2 x 8 sequences of 16 tokens, 7-12 on 8 of 32 (the paper's 128 then
    512, one step lower); stopped in the short phase and resumed, the same weights as straight through."""
    shapes, step = [], mb.train_step
    monkeypatch.setattr(mb, "train_step", lambda m, o, f, batch, *a: shapes.append(batch[0].shape) or step(m, o, f, batch, *a))
    cfg = dataclasses.replace(TINY, vocab_size=tok.get_vocab_size(), max_len=32, batch_size=8, max_steps=12,
                              short_share=0.5, log_every=4)
    corpus = mb.encode_corpus(tok, docs)
    val = mb.make_pairs(corpus, range(len(docs)), cfg.max_len, 99)[:8]
    straight = mb.train(dataclasses.replace(cfg, out=str(tmp_path / "a")), tok, corpus, range(len(docs)), val)
    assert shapes == [(16, 16)] * 6 + [(8, 32)] * 6  # (sequences, tokens) at each step
    b = dataclasses.replace(cfg, out=str(tmp_path / "b"))
    with pytest.raises(SystemExit):
        mb.train(b, tok, corpus, range(len(docs)), val, stop_at=4)
    resumed = mb.train(b, tok, corpus, range(len(docs)), val, resume=mb.load_checkpoint(b.out)[0])
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name


def test_cpu_default_recipe(tmp_path, monkeypatch, capsys):
    """A new run on a CPU is tiny unless a size is given, CPU_RECIPE's minutes long unless a length is given, and
    64 tokens by 64 sequences (unless --max_len is given), the first 90 % at 32 by 128, without dropout, initial
    weights of std 0.06 (each unless given)."""
    (tmp_path / "c.txt").write_text(make_corpus())
    runs = []
    monkeypatch.setattr(mb, "train", lambda cfg, *a, **k: runs.append(cfg))
    monkeypatch.setattr(mb, "train_tokenizer", lambda s, v, small=mb.train_tokenizer: small(s, 120))
    for i, extra in enumerate(([], ["--epochs", "2"], ["--preset", "mini"], ["--preset", "mini", "--max_steps", "9"],
                               ["--max_len", "128", "--dropout", "0.1"])):
        mb.main(["train", "--data", str(tmp_path / "c.txt"), "--device", "cpu", "--out", str(tmp_path / str(i)), *extra])
    budget = mb.CPU_RECIPE["budget"][0]
    assert (runs[0].hidden, runs[0].budget, runs[0].lr) == (128, budget, mb.PRESETS["tiny"][2])
    assert (runs[0].max_len, runs[0].batch_size, runs[0].dropout, runs[0].short_share, runs[0].init_std) == \
        (64, 64, 0.0, 0.9, 0.06)
    assert f"recipe: on a CPU, --preset tiny --budget {budget} --max_len 64 --batch_size 64 --dropout 0.0 " \
        "--short_share 0.9 --init_std 0.06 (" in capsys.readouterr().out
    assert (runs[1].hidden, runs[1].budget, runs[1].epochs) == (128, 0, 2)  # a length alone: still tiny
    assert (runs[4].max_len, runs[4].batch_size, runs[4].dropout, runs[4].budget) == (128, 32, 0.1, budget)
    assert (runs[2].hidden, runs[2].budget) == (256, budget) and (runs[3].hidden, runs[3].budget) == (256, 0)


def test_tokenizer_from_each_source_is_the_same(tmp_path, tok):
    """--tokenizer: a checkpoint folder, its model.pt, the tokenizer.json and the vocab.txt that export writes
    all give the tokenizer the checkpoint was trained with; a vocab.txt in another order (bert-base-uncased's:
    [PAD] 0, [UNK] 100, ...) gets its specials moved to the ids 0..4 that minibert expects."""
    cfg = dataclasses.replace(TINY, vocab_size=tok.get_vocab_size())
    write_checkpoint(tmp_path, mb.BERT(cfg), cfg, tok)
    mb.export_hf(str(tmp_path), str(tmp_path / "hf"))
    text = "The [MASK] sat on the mat , [UNK] ; café !"
    for src in ("", "model.pt", "hf/tokenizer.json", "hf/vocab.txt"):
        loaded, order = mb.load_tokenizer(str(tmp_path / src))
        assert loaded.encode(text).ids == tok.encode(text).ids and order is None, src
    vocab = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    (tmp_path / "bert.txt").write_text("\n".join(["[PAD]", "[unused0]", *vocab[5:50], "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    other, order = mb.load_tokenizer(str(tmp_path / "bert.txt"))
    assert [other.token_to_id(t) for t in mb.SPECIALS] == [0, 1, 2, 3, 4] and other.get_vocab_size() == 51
    assert order == [0, 47, 48, 49, 50, 1, *range(2, 47)]  # our id i is the file's order[i]
    assert other.encode("the [MASK]").ids[-2:] == [MASK, SEP] and other.encode("x").ids[0] == CLS


# ---------------------------------------------------------------------------- export to Hugging Face


def test_export_loads_into_transformers(tmp_path, tok):
    transformers = pytest.importorskip("transformers")
    cfg = dataclasses.replace(TINY, vocab_size=tok.get_vocab_size())
    torch.manual_seed(0)
    model = mb.BERT(cfg).eval()
    with torch.no_grad():  # non-trivial biases and LayerNorms, so that a mix-up can't hide behind zeros
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    write_checkpoint(tmp_path, model, cfg, tok)
    out = str(tmp_path / "hf")
    mb.export_hf(str(tmp_path), out)
    for cls in (transformers.BertForPreTraining, transformers.BertForMaskedLM):
        m, info = cls.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["mismatched_keys"], (cls.__name__, info)
    _, info = transformers.BertModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"], info
    hf = transformers.BertForPreTraining.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.model_max_length == cfg.max_len  # positions past it were never trained
    enc = hf_tok(["the cat sat", "the dog"], ["on the mat .", "ran under the old bridge ."], padding=True, return_tensors="pt")
    ours = [tok.encode(a, b) for a, b in (("the cat sat", "on the mat ."), ("the dog", "ran under the old bridge ."))]
    for row, e in zip(enc["input_ids"].tolist(), ours):
        assert row[: len(e.ids)] == e.ids and all(t == PAD for t in row[len(e.ids) :])  # the same ids
    ids, seg = enc["input_ids"], enc["token_type_ids"]
    with torch.no_grad():
        mlm, nsp = model(ids, seg)
        ref = hf(input_ids=ids, token_type_ids=seg, attention_mask=enc["attention_mask"])
    real = enc["attention_mask"].bool()
    assert (ref.prediction_logits[real] - mlm[real]).abs().max() < 1e-4
    assert (ref.seq_relationship_logits - nsp).abs().max() < 1e-4


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_export_of_a_classifier_gives_transformers_the_same_logits(tmp_path, tok, task):
    """A classifier, and a regression model (one output, STS-B): the same outputs, and for regression the same loss."""
    transformers = pytest.importorskip("transformers")
    cfg = dataclasses.replace(TINY, vocab_size=tok.get_vocab_size())
    labels = ["neg", "neutral", "pos"] if task == "classification" else ["score"]
    torch.manual_seed(0)
    model = mb.Classifier(cfg, len(labels)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(cfg), "tokenizer": tok.to_str(),
                "labels": labels, "columns": ["sentence", "label"], "task": task}, tmp_path / "model.pt")
    mb.export_hf(str(tmp_path), str(tmp_path / "hf"))
    hf, info = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert hf.config.id2label == dict(enumerate(labels)) and hf.num_labels == len(labels)
    assert hf.config.problem_type == ("regression" if task == "regression" else None)
    y = [0, 2] if task == "classification" else [3.8, 0.4]
    ids, seg, y = mb.padded(mb.encode_rows(tok, [(("the cat sat", "on the mat ."), y[0]), (("the dog",), y[1])], 24)[0], "cpu")
    with torch.no_grad():
        ref = hf.eval()(input_ids=ids, token_type_ids=seg, attention_mask=(ids != PAD).long(), labels=y)
        assert (ref.logits - model(ids, seg)).abs().max() < 1e-4
        assert abs(ref.loss - mb.classify_loss(model, ids, seg, y, len(y))[0]) < 1e-5  # cross-entropy, or squared error


# ---------------------------------------------------------------------------- import: --init, --ckpt of a transformers BERT


def bert_folder(folder, tok, cls_name="BertForPreTraining", **config):
    """A transformers BERT saved with save_pretrained, from a seeded random config, with a vocab.txt in BERT's own
    order (specials not at 0..4: [UNK] [CLS] [SEP] [MASK] after two [unused] rows, as bert-base-uncased's at 100)."""
    transformers = pytest.importorskip("transformers")
    words = [tok.id_to_token(i) for i in range(5, tok.get_vocab_size())]
    vocab = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    conf = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=37, max_position_embeddings=40, **config)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(conf).eval()
    with torch.no_grad():  # non-trivial biases and LayerNorms, so that a mix-up can't hide behind zeros
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return model, transformers.BertTokenizerFast(str(folder / "vocab.txt"))


def test_a_transformers_bert_gives_the_same_logits_and_exports_back_bit_for_bit(tmp_path, tok):
    """load_source of a BertForPreTraining folder: the same tokens (in minibert's order: the specials at 0..4) and the
    same MLM and NSP logits within 1e-4; a checkpoint of it exports back to the very tensors and vocab.txt."""
    hf, hf_tok = bert_folder(tmp_path / "hf", tok)
    state, ours_tok, cfg = mb.load_source(str(tmp_path / "hf"))
    order = torch.tensor(state["vocab_order"])  # our id i is the file's order[i]
    model = mb.BERT(cfg).eval()
    model.load_state_dict(state["model"])
    a, b = "the cat sat on the mat", "a bright [MASK] over the old bridge"
    ours = torch.tensor([ours_tok.encode(a, b).ids])
    enc = hf_tok(a, b, return_tensors="pt")
    assert torch.equal(order[ours], enc["input_ids"])  # the same tokens, each under its own id
    with torch.no_grad():
        mlm, nsp = model(ours, torch.tensor([ours_tok.encode(a, b).type_ids]))
        ref = hf(**enc)
    assert (ref.prediction_logits[..., order] - mlm).abs().max() < 1e-4  # our logit i is their logit order[i]
    assert (ref.seq_relationship_logits - nsp).abs().max() < 1e-4
    mb.save_checkpoint(str(tmp_path / "model.pt"), {"model": state["model"], "config": dataclasses.asdict(cfg),
                                                     "tokenizer": ours_tok.to_str(), "vocab_order": order.tolist()})
    mb.export_hf(str(tmp_path), str(tmp_path / "back"))
    from safetensors.torch import load_file
    back, original = load_file(str(tmp_path / "back" / "model.safetensors")), hf.state_dict()
    assert back and all(torch.equal(t, original[k]) for k, t in back.items())  # bit for bit, every tensor
    assert (tmp_path / "back" / "vocab.txt").read_text() == (tmp_path / "hf" / "vocab.txt").read_text()
    import transformers
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "back"))(a, b)["input_ids"] == enc["input_ids"][0].tolist()


def test_export_then_import_is_bit_identical(tmp_path, tok):
    cfg = dataclasses.replace(TINY, vocab_size=tok.get_vocab_size())
    torch.manual_seed(0)
    model = mb.BERT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    write_checkpoint(tmp_path, model, cfg, tok)
    mb.export_hf(str(tmp_path), str(tmp_path / "hf"))
    state, loaded_tok, loaded_cfg = mb.load_source(str(tmp_path / "hf"))
    assert state["vocab_order"] is None and loaded_tok.to_str() == mb.load_tokenizer(str(tmp_path / "hf" / "vocab.txt"))[0].to_str()
    assert [getattr(loaded_cfg, k) for k in "layers hidden heads ffn vocab_size max_position init_std".split()] == [
        getattr(cfg, k) for k in "layers hidden heads ffn vocab_size max_position init_std".split()]
    assert state["model"].keys() == model.state_dict().keys()
    assert all(torch.equal(state["model"][k], t) for k, t in model.state_dict().items())


@pytest.mark.parametrize("cls_name, lacks", [("BertModel", ["cls.predictions.transform.dense", "cls.seq_relationship"]),
                                             ("BertForMaskedLM", ["bert.pooler.dense", "cls.seq_relationship"])])
def test_a_bert_without_heads_loads_them_initialised(tmp_path, tok, capsys, cls_name, lacks):
    hf, hf_tok = bert_folder(tmp_path, tok, cls_name)
    state, ours_tok, cfg = mb.load_source(str(tmp_path))
    note = capsys.readouterr().out
    assert note.startswith("note: ") and all(name in note for name in lacks) and "cls.predictions " not in note, note
    model = mb.BERT(cfg).eval()
    model.load_state_dict(state["model"])
    order = torch.tensor(state["vocab_order"])
    ids = torch.tensor([ours_tok.encode("the cat sat").ids])
    with torch.no_grad():
        ref = (hf.bert if cls_name == "BertForMaskedLM" else hf)(input_ids=order[ids]).last_hidden_state
        assert (model.encode(ids, torch.zeros_like(ids))[0] - ref).abs().max() < 1e-4


def test_init_refuses_other_architectures_and_vocabularies_in_one_line(tmp_path, tok):
    bert_folder(tmp_path / "relu", tok, hidden_act="relu")
    with pytest.raises(SystemExit, match="another architecture .hidden_act relu"):
        mb.load_source(str(tmp_path / "relu"))
    bert_folder(tmp_path / "nomask", tok)
    vocab = (tmp_path / "nomask" / "vocab.txt").read_text().replace("[MASK]", "[unused2]")
    (tmp_path / "nomask" / "vocab.txt").write_text(vocab)
    with pytest.raises(SystemExit, match=r"has no \[MASK\]"):
        mb.load_source(str(tmp_path / "nomask"))
    with pytest.raises(SystemExit, match="offline, pass a folder"):
        mb.load_source("nobody-here/no-such-bert")  # a hub name, with no network (or no such model)
    bert_folder(tmp_path / "ok", tok)
    with pytest.raises(SystemExit, match="--init .* has layers 2, not 3; drop --layers"):
        mb.main(["train", "--init", str(tmp_path / "ok"), "--data", "x.txt", "--layers", "3", "--max_len", "24"])


def test_init_trains_on_new_text_and_every_command_takes_the_result(tmp_path, tok, capsys, monkeypatch):
    """train --init a transformers folder, a few steps on new text; then demo, eval, --resume, export; and finetune,
    demo and eval straight from the transformers folder."""
    hf, _ = bert_folder(tmp_path / "hf", tok, "BertForMaskedLM")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "new.txt").write_text(make_corpus(seed=3))
    (tmp_path / "task.tsv").write_text("sentence\tlabel\n" + "".join(f"{t[0]}\t{y}\n" for t, y in labelled(40)))
    small = ["--max_len", "24", "--batch_size", "4", "--device", "cpu", "--log_every", "1"]
    mb.main(["train", "--init", "hf", "--data", "new.txt", "--max_steps", "3", "--out", "run", *small])
    out = capsys.readouterr().out
    recipe = next(line for line in out.splitlines() if line.startswith("recipe:"))  # not tiny's from-scratch flags:
    assert "has no bert.pooler.dense, cls.seq_relationship:" in out and "--preset" not in recipe and "short" not in recipe
    state = mb.load_checkpoint("run")[0]
    assert state["step"] == 3 and state["init"] == "hf" and state["vocab_order"][:5] == [0, 3, 4, 5, 6]
    first = mb.load_source("hf")[0]["model"]
    assert not torch.equal(state["model"]["layers.0.qkv.weight"], first["layers.0.qkv.weight"])  # it trained
    mb.main(["train", "--resume", "--out", "run", "--max_steps", "5", *small])
    assert mb.load_checkpoint("run")[0]["step"] == 5
    for argv in (["demo", "the [MASK] sat", "--ckpt", "run"], ["eval", "--data", "new.txt", "--ckpt", "run"],
                 ["export", "--ckpt", "run", "--to", "run-hf"], ["demo", "the [MASK] sat", "--ckpt", "hf"],
                 ["finetune", "--ckpt", "hf", "--data", "task.tsv", "--out", "ft", "--epochs", "1", "--device", "cpu"],
                 ["eval", "--data", "task.tsv", "--ckpt", "ft"], ["export", "--ckpt", "ft", "--to", "ft-hf"]):
        mb.main(argv)
    out = capsys.readouterr().out
    assert out.count("[MASK] 1:") == 2 and "acc" in out and "mlm_loss" in out
    import transformers
    back = transformers.BertForPreTraining.from_pretrained("run-hf")  # the file's vocabulary order again
    assert (tmp_path / "run-hf" / "vocab.txt").read_text() == (tmp_path / "hf" / "vocab.txt").read_text()
    assert torch.equal(back.bert.embeddings.word_embeddings.weight[0], mb.load_checkpoint("run")[0]["model"]["tok_emb.weight"][0])
    assert transformers.BertForSequenceClassification.from_pretrained("ft-hf").config.num_labels == 2
