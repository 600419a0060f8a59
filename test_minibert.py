"""Tests for minibert.py: python -m pytest -q. No network; under a minute on 2 CPU cores."""

import dataclasses
import json
import math
import os
import random
import re
import subprocess
import sys

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


# ---------------------------------------------------------------------------- corpus and pairs


def test_parse_wikitext_articles_headings_sentences():
    text = " = One = \n\n First sentence here . Second one ! \n\n = = Heading = = \n Third 1 @,@ 000 . \n = Two = \n Other text .\n"
    docs = mb.parse_wikitext(text.splitlines())
    assert docs == [["First sentence here .", "Second one !", "Third 1,000 ."], ["Other text ."]]
    plain = "Doc one . Still one .\n\nDoc two .\n"  # no titles: blank lines separate documents
    assert mb.parse_wikitext(plain.splitlines()) == [["Doc one .", "Still one ."], ["Doc two ."]]


def test_pairs_balance_and_rules():
    docs, where = synthetic_docs()
    pairs = mb.make_pairs(docs, max_len=32, seed=0)
    labels = [label for _, _, label in pairs]
    assert len(pairs) > 100
    assert abs(labels.count(0) - labels.count(1)) <= 1  # 50/50, exactly up to one pair
    for a, b, label in pairs:
        assert a and b and len(a) + len(b) + 3 <= 32
        (da, _, pa), (db, _, pb) = where[a[0]], where[b[0]]
        assert [where[t][2] for t in a] == list(range(pa, pa + len(a)))  # A is one contiguous run
        assert [where[t][2] for t in b] == list(range(pb, pb + len(b)))  # and so is B
        assert all(where[t][0] == da for t in a) and all(where[t][0] == db for t in b)
        if label == 0:  # IsNext: B follows A in the same document; only truncation may cut between
            assert db == da and 0 <= pb - (pa + len(a)) < 9
        else:  # NotNext: B from another document, never the same one
            assert db != da


def test_collate_segments_and_padding():
    pairs = [([5, 6, 7], [8, 9], 0), ([10], [11], 1)]
    ids, seg, nsp = mb.collate(pairs)
    assert ids.tolist() == [[CLS, 5, 6, 7, SEP, 8, 9, SEP], [CLS, 10, SEP, 11, SEP, PAD, PAD, PAD]]
    assert seg.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0, 0]]
    assert nsp.tolist() == [0, 1]
    assert mb.collate(pairs, pad_to=8)[0].shape == (2, 8) and mb.collate(pairs[1:], pad_to=8)[0].shape == (1, 8)


# ---------------------------------------------------------------------------- masking


def test_masking_ratios():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 128, (400,), generator=g)
    pairs = [(list(range(5, 5 + n // 2)), list(range(100, 100 + n - n // 2)), 0) for n in lengths.tolist()]
    ids, _, _ = mb.collate(pairs)
    V = 1000
    inputs, labels = mb.mask_tokens(ids, V, g)
    real = (ids != PAD) & (ids != CLS) & (ids != SEP)
    chosen = labels != -100
    assert not (chosen & ~real).any()  # [CLS], [SEP], [PAD] are never chosen
    assert (labels[chosen] == ids[chosen]).all()
    n = chosen.sum().item()
    assert abs(n / real.sum().item() - 0.15) < 0.005  # 15 % of the real tokens (rounded per row)
    masked = (inputs == MASK) & chosen
    kept = (inputs == ids) & chosen
    swapped = chosen & ~masked & ~kept
    # 80/10/10 over ~9,000 chosen positions: 4 standard deviations is ~0.017 for the 80 % share
    assert abs(masked.sum().item() / n - 0.8) < 0.02
    assert abs(kept.sum().item() / n - 0.1) < 0.015  # (a random token equal to the original counts as kept: 1/V)
    assert abs(swapped.sum().item() / n - 0.1) < 0.015
    assert (inputs[swapped] >= len(mb.SPECIALS)).all() and (inputs[swapped] < V).all()  # never special
    assert (inputs[~chosen] == ids[~chosen]).all()
    inputs2, labels2 = mb.mask_tokens(ids, V, g)  # dynamic: a fresh draw every call
    assert not torch.equal(labels, labels2)


# ---------------------------------------------------------------------------- model


def test_shapes():
    torch.manual_seed(0)
    model = mb.BERT(TINY)
    B, T = 13, 7
    ids = torch.randint(5, 99, (B, T))
    seg = torch.zeros_like(ids)
    mlm, nsp, l1, l2 = model(ids, seg)
    assert mlm.shape == (B, T, 99) and nsp.shape == (B, 2) and l1 is None and l2 is None
    assert model.encode(ids, seg).shape == (B, T, 32)
    labels = torch.full((B, T), -100)
    labels[:, 2] = ids[:, 2]
    labels[0, 5] = ids[0, 5]
    pred, nsp, l1, l2 = model(ids, seg, labels, torch.zeros(B, dtype=torch.long))
    assert pred.shape == (B + 1,) and l1.shape == () and l2.shape == ()  # MLM at the masks only
    full = model(ids, seg)[0]  # (B, T, V)
    assert pred[0] == full[0, 2].argmax() and pred[1] == full[0, 5].argmax() and pred[2] == full[1, 2].argmax()
    ref = torch.nn.functional.cross_entropy(full.reshape(-1, 99)[labels.view(-1) != -100], labels[labels != -100])
    assert torch.allclose(l1, ref, atol=1e-5)


def test_training_forward_equals_the_full_computation():
    """Training runs the last layer and the MLM head at [CLS] and the masked positions only; the
    losses and every gradient must equal those of the plain full forward."""
    torch.manual_seed(0)
    model = mb.BERT(TINY)
    ids, seg, labels, nsp = batch_of(TINY, B=6, T=20)
    ids[0, 15:] = PAD  # some padding, and rows with different numbers of masks
    labels[0, 15:] = -100
    _, _, mlm_loss, nsp_loss = model(ids, seg, labels, nsp)
    fast = torch.autograd.grad(mlm_loss + nsp_loss, list(model.parameters()))
    logits, nsp_logits, _, _ = model(ids, seg)
    ref_mlm = torch.nn.functional.cross_entropy(logits[labels != -100], labels[labels != -100])
    ref_nsp = torch.nn.functional.cross_entropy(nsp_logits, nsp)
    assert torch.allclose(mlm_loss, ref_mlm, atol=1e-5) and torch.allclose(nsp_loss, ref_nsp, atol=1e-6)
    slow = torch.autograd.grad(ref_mlm + ref_nsp, list(model.parameters()))
    for (name, _), f, s in zip(model.named_parameters(), fast, slow):
        assert torch.allclose(f, s, atol=1e-6), name


def test_padding_does_not_change_real_outputs():
    torch.manual_seed(0)
    model = mb.BERT(dataclasses.replace(TINY, dropout=0.1)).eval()
    short = ([5, 6, 7], [8, 9], 0)
    ids1, seg1, _ = mb.collate([short])
    ids2, seg2, _ = mb.collate([short, (list(range(10, 20)), [21, 22, 23], 1)])
    assert ids2.shape[1] > ids1.shape[1]
    mlm1, nsp1, _, _ = model(ids1, seg1)
    mlm2, nsp2, _, _ = model(ids2, seg2)
    T = ids1.shape[1]
    assert torch.allclose(mlm1[0], mlm2[0, :T], atol=1e-5)
    assert torch.allclose(nsp1[0], nsp2[0], atol=1e-5)


def write_checkpoint(folder, model, cfg, tok):
    """A checkpoint folder as train writes one (weights, config, tokenizer), without training."""
    tok_json = tok.to_str()
    (folder / "tokenizer.json").write_text(tok_json)
    state = {"model": model.state_dict(), "config": dataclasses.asdict(cfg), "step": 0,
             "tokenizer_sha256": mb.hashlib.sha256(tok_json.encode()).hexdigest()}
    mb.save_checkpoint(str(folder / "model.pt"), state)


def test_tied_decoder_survives_save_and_load(tmp_path, tok):
    cfg = dataclasses.replace(TINY, vocab_size=tok.get_vocab_size())
    torch.manual_seed(0)
    model = mb.BERT(cfg)
    assert model.decoder.weight is model.emb.tok.weight
    with torch.no_grad():
        model.emb.tok.weight[7] += 1.0  # a change to the embedding is a change to the decoder
    assert torch.equal(model.decoder.weight[7], model.emb.tok.weight[7])
    write_checkpoint(tmp_path, model, cfg, tok)
    loaded, _, _ = mb.load_model(str(tmp_path), "cpu")
    assert loaded.decoder.weight is loaded.emb.tok.weight
    ids = torch.tensor([[CLS, 10, MASK, 12, SEP]])
    assert torch.equal(model.eval()(ids, torch.zeros_like(ids))[0], loaded(ids, torch.zeros_like(ids))[0])


def batch_of(cfg, B=8, T=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    pairs = [([int(t) for t in torch.randint(5, cfg.vocab_size, (T // 2,), generator=g)],
              [int(t) for t in torch.randint(5, cfg.vocab_size, (T // 2 - 3,), generator=g)], i % 2) for i in range(B)]
    return mb.make_batch(pairs, cfg.vocab_size, g)


def test_initial_loss_is_chance():
    """Small init (std 0.02) gives near-uniform predictions: MLM ~ ln V, NSP ~ ln 2."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, vocab_size=997)
    model = mb.BERT(cfg)
    ids, seg, labels, nsp = batch_of(cfg, B=32)
    _, _, mlm_loss, nsp_loss = model(ids, seg, labels, nsp)
    assert abs(mlm_loss.item() - math.log(997)) < 0.1
    assert abs(nsp_loss.item() - math.log(2)) < 0.05


def overfit(device):
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, device=device)
    model = mb.BERT(cfg).to(device)
    opt = mb.make_optimizer(model, cfg, torch.device(device))
    batch = mb.to_device(batch_of(cfg), torch.device(device))
    first = mb.train_step(model, opt, batch, 3e-3, 1.0)
    for _ in range(150):
        last = mb.train_step(model, opt, batch, 3e-3, 1.0)
    return first, last


def test_overfit_one_batch_cpu():
    first, last = overfit("cpu")
    assert first[0] > 5.0  # ln 99 + ln 2
    assert last[0] < 0.05 and last[3] == 1.0 and last[4] == 1.0  # loss ~0, every mask and label right


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_overfit_one_batch_cuda():
    first, last = overfit("cuda")
    assert first[0] > 5.0 and last[0] < 0.1  # bf16 autocast: a little looser


def test_lr_schedule_and_weight_decay_groups():
    cfg = Config(lr=1.0, warmup=0.1)
    lrs = [mb.lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and max(lrs) == pytest.approx(1.0)
    assert lrs[99] < 0.02 and all(x >= y for x, y in zip(lrs[9:], lrs[10:]))
    model = mb.BERT(TINY)
    groups = mb.make_optimizer(model, TINY, torch.device("cpu")).param_groups
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.parameters() if p.dim() >= 2}
    assert groups[1]["weight_decay"] == 0.0 and model.emb.ln.weight in groups[1]["params"]


# ---------------------------------------------------------------------------- checkpoints and resume


def test_resume_is_exact(tmp_path, tok, docs):
    """N steps straight == k steps, a stop (as Ctrl-C), a resume and N - k more: same weights."""
    cfg = dataclasses.replace(TINY, vocab_size=tok.get_vocab_size(), max_len=32, dropout=0.1, batch_size=8,
                              max_steps=16, log_every=4)
    train_docs = mb.encode_docs(tok, docs)
    val = mb.make_pairs(train_docs, cfg.max_len, 99)[:8]
    assert math.ceil(len(mb.make_pairs(train_docs, cfg.max_len, cfg.seed)) / 8) < 11  # stop, resume in epoch 2+
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    straight = mb.train(dataclasses.replace(cfg, out=a), tok, train_docs, val)
    with pytest.raises(SystemExit) as stop:
        mb.train(dataclasses.replace(cfg, out=b), tok, train_docs, val, stop_at=11)
    assert stop.value.code == 130
    state, _, _ = mb.load_checkpoint(b)
    assert state["step"] == 11
    resumed = mb.train(dataclasses.replace(cfg, out=b), tok, train_docs, val, resume=state)
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    log = [json.loads(line) for line in open(os.path.join(b, "metrics.jsonl"))]
    ref = [json.loads(line) for line in open(os.path.join(a, "metrics.jsonl"))]
    assert [r["loss"] for r in ref if "loss" in r][-1] == [r["loss"] for r in log if "loss" in r][-1]


def test_interrupted_write_keeps_previous_checkpoint(tmp_path):
    path = str(tmp_path / "model.pt")
    mb.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    with pytest.raises(Exception):  # dies half-way through pickling, as a kill mid-write would
        mb.save_checkpoint(path, {"step": 2, "w": torch.zeros(1000), "bad": lambda: 0})
    state = torch.load(path, weights_only=True)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path, tok, docs):
    cfg = dataclasses.replace(TINY, vocab_size=tok.get_vocab_size(), max_len=32, batch_size=8, max_steps=2,
                              out=str(tmp_path))
    train_docs = mb.encode_docs(tok, docs)
    mb.train(cfg, tok, train_docs, [])
    before = (tmp_path / "model.pt").read_bytes()
    state, _, _ = mb.load_checkpoint(str(tmp_path))
    state["model"]["emb.ln.weight"][0] = float("nan")
    with pytest.raises(SystemExit) as err:
        mb.train(dataclasses.replace(cfg, max_steps=10), tok, train_docs, [], resume=state)
    assert "non-finite" in str(err.value.code)
    assert (tmp_path / "model.pt").read_bytes() == before


# ---------------------------------------------------------------------------- Cornell Movie-Dialogs


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
    pairs = mb.make_pairs(mb.encode_docs(tok, docs), max_len=48, seed=0)  # long enough: no truncation
    assert pairs
    for a, b, label in pairs:  # a true pair is consecutive utterances of one conversation
        na, nb = (list(map(int, re.findall(r"\d+", tok.decode(x)))) for x in (a, b))
        assert na == list(range(na[0], na[0] + len(na))) and nb == list(range(nb[0], nb[0] + len(nb)))
        conv = lambda n: 0 if n <= 3 else 1 if n <= 7 else 2
        assert (nb[0] == na[-1] + 1) if label == 0 else (conv(nb[0]) != conv(na[0]))


# ---------------------------------------------------------------------------- the command line, as subprocesses


def run(*args, cwd=HERE, env=None):
    return subprocess.run([sys.executable, os.path.join(HERE, "minibert.py"), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


FORK_SERVER = r"""
import json, os, runpy, sys, traceback
import torch, tokenizers  # imported once here; each forked case starts with them loaded
script, cases = sys.argv[1], json.load(sys.stdin)
children = {}
for name, args in cases.items():
    pid = os.fork()
    if pid == 0:  # the child is `python minibert.py *args`, down to how Python itself exits
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
                            capture_output=True, text=True, env=env, timeout=300)
    assert server.returncode == 0, server.stderr
    codes = json.loads(server.stdout)
    read = lambda k, ext: open(os.path.join(case_dir, k + ext), encoding="utf-8").read()
    return {k: (codes[k], read(k, ".out"), read(k, ".err")) for k in cases}


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Train a tiny checkpoint through the CLI, then run every other command at once (each process
    pays ~2 s to import torch; in parallel they fit the test budget)."""
    d = tmp_path_factory.mktemp("cli")
    corpus = d / "corpus.txt"
    corpus.write_text(make_corpus())
    ckpt = str(d / "ckpt")
    trained = run("train", "--data", str(corpus), "--preset", "tiny", "--vocab_size", "300", "--max_len", "48",
                  "--batch_size", "8", "--max_steps", "6", "--log_every", "2", "--out", ckpt)
    assert trained.returncode == 0, trained.stderr
    (d / "empty.txt").write_text("")
    (d / "latin1.txt").write_bytes("caf\xe9 au lait . Encore .\n".encode("iso-8859-1"))
    (d / "one.txt").write_text("Just one sentence here .\n")
    (d / "other.txt").write_text(make_corpus(seed=1))
    bad = d / "bad"
    bad.mkdir()
    (bad / "model.pt").write_bytes(b"not a checkpoint")
    (bad / "tokenizer.json").write_text("{}")
    notok = d / "notok"
    notok.mkdir()
    (notok / "model.pt").write_bytes(open(os.path.join(ckpt, "model.pt"), "rb").read())
    trunc = d / "trunc"
    trunc.mkdir()
    (trunc / "model.pt").write_bytes(open(os.path.join(ckpt, "model.pt"), "rb").read()[:5000])
    (trunc / "tokenizer.json").write_text(open(os.path.join(ckpt, "tokenizer.json")).read())
    mixed = d / "mixed"  # the weights of one run, the tokenizer of another
    mixed.mkdir()
    (mixed / "model.pt").write_bytes(open(os.path.join(ckpt, "model.pt"), "rb").read())
    other_docs = mb.parse_wikitext(make_corpus(seed=1).splitlines())
    mb.train_tokenizer((s for doc in other_docs for s in doc), 300).save(str(mixed / "tokenizer.json"))
    c = str(corpus)
    cases = {
        "demo": ["demo", "the [MASK] sat on the [MASK] .", "--ckpt", ckpt],
        "demo_odd": ["demo", "caf\xe9  \U0001F600 [MASK][MASK]   " + "x" * 300 + " [MASK]", "--ckpt", ckpt, "--top_k", "3"],
        "demo_long": ["demo", "the cat sat . " * 40 + "the [MASK] sat .", "--ckpt", ckpt],
        "eval": ["eval", "--data", c, "--ckpt", ckpt, "--json"],
        "eval_again": ["eval", "--data", c, "--ckpt", ckpt, "--json"],
        "no_mask": ["demo", "the cat sat", "--ckpt", ckpt],
        "empty_text": ["demo", "", "--ckpt", ckpt],
        "no_ckpt": ["demo", "the [MASK] sat", "--ckpt", str(d / "nowhere")],
        "foreign_ckpt": ["demo", "the [MASK] sat", "--ckpt", str(bad)],
        "truncated_ckpt": ["eval", "--data", c, "--ckpt", str(trunc)],
        "missing_tokenizer": ["demo", "the [MASK] sat", "--ckpt", str(notok)],
        "data_missing": ["train", "--data", str(d / "nope.txt"), "--out", str(d / "o1")],
        "data_empty": ["train", "--data", str(d / "empty.txt"), "--out", str(d / "o2")],
        "data_folder": ["train", "--data", str(d), "--out", str(d / "o3")],
        "data_latin1": ["train", "--data", str(d / "latin1.txt"), "--out", str(d / "o4")],
        "data_too_little": ["train", "--data", str(d / "one.txt"), "--out", str(d / "o5")],
        "no_cuda": ["train", "--data", c, "--device", "cuda", "--out", str(d / "o6")],
        "unknown_flag": ["train", "--data", c, "--bogus", "1"],
        "abbreviated_flag": ["train", "--data", c, "--max_step", "5"],
        "negative_max_steps": ["train", "--data", c, "--max_steps", "-5"],
        "bad_type": ["train", "--data", c, "--batch_size", "many"],
        "zero_batch": ["train", "--data", c, "--batch_size", "0"],
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
        "dropout_range": ["train", "--data", c, "--dropout", "1.5"],
        "resume_nothing": ["train", "--data", c, "--resume", "--out", str(d / "o8")],
        "resume_other_data": ["train", "--data", str(d / "other.txt"), "--resume", "--out", ckpt],
        "export_no_ckpt": ["export", "--ckpt", str(d / "nowhere"), "--to", str(d / "hf")],
        "export_unwritable": ["export", "--ckpt", ckpt, "--to", str(corpus / "hf")],
        "eval_too_little": ["eval", "--data", str(d / "one.txt"), "--ckpt", ckpt],
        "demo_only_mask": ["demo", "[MASK]", "--ckpt", ckpt],
        "demo_lower_mask": ["demo", "the [mask] sat", "--ckpt", ckpt],
        "foreign_tokenizer": ["demo", "the [MASK] sat", "--ckpt", str(mixed)],
    }
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")  # the hub fails at once, offline
    results = run_many(cases, env)
    for k in ("demo", "unknown_flag"):  # and twice as a plain `python minibert.py ...`, to be sure
        p = run(*cases[k], env=env)
        assert (p.returncode, p.stdout, p.stderr) == results[k]
    return {"trained": trained, "ckpt": ckpt, **results}


def test_cli_train_writes_checkpoint_and_log(cli):
    out = cli["trained"].stdout
    assert "step 6/6" in out and "data:" in out and "config:" in out
    assert set(os.listdir(cli["ckpt"])) >= {"model.pt", "tokenizer.json", "config.json", "metrics.jsonl"}
    log = [json.loads(line) for line in open(os.path.join(cli["ckpt"], "metrics.jsonl"))]
    assert [r["step"] for r in log if "loss" in r] == [2, 4, 6] and all(math.isfinite(r["loss"]) for r in log if "loss" in r)
    assert any(r.get("eval") == "end" for r in log)


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
    code, out, err = cli["demo_long"]  # longer than max_len: truncated around the mask, with a warning
    assert code == 0 and "warning" in err and len(out.strip().splitlines()) == 1


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


BAD = {  # case -> what the one-line message must mention
    "no_mask": "no [MASK]", "empty_text": "no [MASK]", "no_ckpt": "train one first", "foreign_ckpt": "not a minibert checkpoint",
    "truncated_ckpt": "not a minibert checkpoint", "missing_tokenizer": "tokenizer.json", "data_missing": "does not exist",
    "data_empty": "holds no text", "data_folder": "is a folder", "data_latin1": "not UTF-8", "data_too_little": "too little text",
    "no_cuda": "--device cpu", "unknown_flag": "unrecognized arguments: --bogus", "bad_type": "invalid int value",
    "zero_batch": "--batch_size must be positive", "negative_epochs": "--epochs must be positive",
    "zero_lr": "--lr must be positive", "abbreviated_flag": "unrecognized arguments: --max_step",
    "negative_max_steps": "--max_steps must not be negative", "bad_preset": "invalid choice", "unwritable_out": "cannot write",
    "existing_out": "--resume", "resume_other_shape": "hidden 128, not 64", "no_hub": "--data FILE",
    "top_k_zero": "--top_k", "heads_mismatch": "not divisible", "max_len_too_long": "--max_len must be between",
    "dropout_range": "--dropout must be in", "resume_nothing": "train one first", "resume_other_data": "same --data",
    "export_no_ckpt": "train one first", "foreign_tokenizer": "not the tokenizer model.pt was trained with", "export_unwritable": "cannot create --to", "eval_too_little": "too little text",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_cli_bad_input_is_one_clean_line(cli, case):
    code, out, err = cli[case]
    assert code != 0
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert BAD[case] in err


def test_fused_decoder_cross_entropy_matches_autograd():
    torch.manual_seed(0)
    h, W, b = torch.randn(11, 32, requires_grad=True), torch.randn(99, 32, requires_grad=True), torch.randn(99, requires_grad=True)
    target = torch.randint(0, 99, (11,))
    logits = torch.nn.functional.linear(h, W, b)
    ref = torch.nn.functional.cross_entropy(logits, target)
    grads = torch.autograd.grad(3 * ref, (h, W, b))
    loss, pred = mb.DecoderCrossEntropy.apply(h, W, b, target, 4)  # chunks of 4 rows: 4 + 4 + 3
    assert torch.allclose(loss, ref, atol=1e-6) and torch.equal(pred, logits.argmax(-1))
    for g, r in zip(torch.autograd.grad(3 * loss, (h, W, b)), grads):
        assert torch.allclose(g, r, atol=1e-6)


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
    enc = hf_tok(["the cat sat", "the dog"], ["on the mat .", "ran under the old bridge ."], padding=True, return_tensors="pt")
    ours = [tok.encode(a, b) for a, b in (("the cat sat", "on the mat ."), ("the dog", "ran under the old bridge ."))]
    for row, e in zip(enc["input_ids"].tolist(), ours):
        assert row[: len(e.ids)] == e.ids and all(t == PAD for t in row[len(e.ids) :])  # the same ids
    ids, seg = enc["input_ids"], enc["token_type_ids"]
    with torch.no_grad():
        mlm, nsp, _, _ = model(ids, seg)
        ref = hf(input_ids=ids, token_type_ids=seg, attention_mask=enc["attention_mask"])
    real = enc["attention_mask"].bool()
    assert (ref.prediction_logits[real] - mlm[real]).abs().max() < 1e-4
    assert (ref.seq_relationship_logits - nsp).abs().max() < 1e-4
