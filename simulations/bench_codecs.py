"""``python -m simulations bench codecs``: bytes, error and speed of each tensor codec.

Two data sets go through every codec chain, chunk by chunk, exactly as the all-reduce
sends them (``protocol.tensor.encode_chunk`` / ``decode_chunk``):

* ``normal``: i.i.d. N(0, 1) float32;
* ``gradient``: the flattened gradient of a small transformer LM after a few AdamW steps
  on synthetic Markov-chain tokens (built here, CPU, one thread). Its vocabulary (4096) is
  much larger than one batch's tokens, as in real LMs, so most token-embedding rows have an
  all-zero gradient;
* ``grad-dense``: the same gradient without the token embedding (almost no zeros).

Per codec it prints the payload bytes as a fraction of fp32, the relative L2 error against
the fp32 original, and encode / decode throughput in GB/s of fp32 input (single thread;
best of ``--repeat`` runs). Then a top-k + error-feedback training check: ``--workers``
simulated data-parallel workers train the same tiny LM, averaging their gradients either in
fp32 or through ``--train-codec`` with one ``ErrorFeedback`` per worker, and the final
held-out losses are compared (bar: >= 50x fewer bytes, final loss within 2%).
With ``--json`` the last line is a JSON list: one object per (codec, data set), plus one
``"data": "train"`` object for the training check.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from protocol.tensor import (
    CodecSpec,
    ErrorFeedback,
    TensorChunk,
    chunk_ranges,
    decode_chunk,
    encode_chunk,
)

DEFAULT_CODECS = (
    "none,zstd,fp16,fp16+zstd,bf16,bf16+zstd,int8,int8+zstd,sigma8,sigma8+zstd,"
    "topk:0.01+zstd,topk:0.01+fp16+zstd,topk:0.01+int8+zstd"
)
Floats = NDArray[np.float32]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--codecs", default=DEFAULT_CODECS, help="comma-separated codec specs")
    parser.add_argument("--elements", type=int, default=1 << 21, help="size of the normal data set")
    parser.add_argument(
        "--repeat", type=int, default=3, help="timing runs per codec (best is kept)"
    )
    parser.add_argument(
        "--train-codec", default="topk:0.02+fp16+zstd", help="codec of the training check"
    )
    parser.add_argument("--workers", type=int, default=4, help="simulated data-parallel workers")
    parser.add_argument("--steps", type=int, default=300, help="training steps (0 skips the check)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print a final JSON line")


@dataclass
class Row:
    codec: str
    data: str
    ratio: float
    rel_err: float
    enc_gbps: float
    dec_gbps: float

    def as_json(self) -> dict[str, Any]:
        return {
            "codec": self.codec,
            "data": self.data,
            "bytes_ratio": round(self.ratio, 5),
            "rel_l2_err": float(f"{self.rel_err:.4g}"),
            "encode_gbps": round(self.enc_gbps, 3),
            "decode_gbps": round(self.dec_gbps, 3),
        }


def encode_all(x: Floats, codec: CodecSpec) -> list[TensorChunk]:
    return [encode_chunk(x[o : o + n], codec, offset=o) for o, n in chunk_ranges(x.size, codec)]


def decode_all(chunks: list[TensorChunk], numel: int) -> Floats:
    out = np.empty(numel, np.float32)
    for c in chunks:
        out[c.offset : c.offset + c.numel] = decode_chunk(c)
    return out


def measure(x: Floats, name: str, data: str, repeat: int) -> Row:
    """Bytes ratio, relative L2 error and best-of-``repeat`` encode/decode GB/s for one codec."""
    codec = CodecSpec.parse(name)
    enc_s = dec_s = math.inf
    chunks: list[TensorChunk] = []
    y = x
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        chunks = encode_all(x, codec)
        t1 = time.perf_counter()
        y = decode_all(chunks, x.size)
        t2 = time.perf_counter()
        enc_s, dec_s = min(enc_s, t1 - t0), min(dec_s, t2 - t1)
    wire = sum(c.wire_bytes for c in chunks)
    diff = float(np.linalg.norm((y - x).astype(np.float64)))
    err = diff / max(float(np.linalg.norm(x.astype(np.float64))), 1e-30)
    return Row(
        codec.name, data, wire / x.nbytes, err, x.nbytes / enc_s / 1e9, x.nbytes / dec_s / 1e9
    )


# --------------------------------------------------------------------------- the tiny LM


@dataclass(frozen=True)
class LMConfig:
    vocab: int = 64
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    seq: int = 32
    batch: int = 16


#: A small LM shaped like real ones: vocabulary much larger than the tokens of one batch, so
#: most embedding rows get an all-zero gradient (as they do in practice).
GRAD_MODEL = LMConfig(vocab=4096, d_model=192, layers=3, heads=4, seq=64, batch=8)
TRAIN_MODEL = LMConfig()


def build_lm(cfg: LMConfig, seed: int) -> Any:
    import torch
    from torch import nn

    class TinyLM(nn.Module):
        """Token + position embeddings, pre-norm causal transformer blocks, linear head."""

        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
            self.pos = nn.Parameter(torch.randn(cfg.seq, cfg.d_model) * 0.02)
            layer = nn.TransformerEncoderLayer(
                cfg.d_model,
                cfg.heads,
                4 * cfg.d_model,
                dropout=0.0,
                batch_first=True,
                norm_first=True,
            )
            self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(cfg.d_model)
            self.head = nn.Linear(cfg.d_model, cfg.vocab)
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(cfg.seq))

        def forward(self, idx: Any) -> Any:
            h = self.tok(idx) + self.pos[: idx.shape[1]]
            h = self.blocks(h, mask=self.mask, is_causal=True)
            return self.head(self.norm(h))

    torch.manual_seed(seed)
    return TinyLM()


class MarkovTokens:
    """Synthetic token streams from a fixed random Markov chain (learnable, entropy > 0)."""

    def __init__(self, vocab: int, seed: int) -> None:
        import torch

        g = torch.Generator().manual_seed(seed)
        self.probs = torch.softmax(torch.randn(vocab, vocab, generator=g) * 3.0, dim=1)
        self.vocab = vocab

    def sample(self, count: int, seq: int, g: Any) -> Any:
        """``count`` sequences of ``seq + 1`` tokens (inputs are [:, :-1], targets [:, 1:])."""
        import torch

        tokens = torch.empty(count, seq + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, self.vocab, (count,), generator=g)
        for t in range(seq):
            tokens[:, t + 1] = torch.multinomial(self.probs[tokens[:, t]], 1, generator=g).squeeze(
                1
            )
        return tokens

    def batch(self, cfg: LMConfig, g: Any) -> tuple[Any, Any]:
        tokens = self.sample(cfg.batch, cfg.seq, g)
        return tokens[:, :-1], tokens[:, 1:]


def lm_loss(model: Any, x: Any, y: Any) -> Any:
    import torch.nn.functional as F

    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def flat_grad(model: Any) -> Floats:
    import torch

    return (
        torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        .numpy()
        .astype(np.float32, copy=False)
    )


def set_flat_grad(model: Any, flat: Floats) -> None:
    import torch

    pos = 0
    src = torch.from_numpy(flat)
    for p in model.parameters():
        n = p.numel()
        p.grad = src[pos : pos + n].view_as(p).clone()
        pos += n


def real_gradient(seed: int, warmup: int = 5) -> tuple[Floats, int]:
    """The flattened gradient of GRAD_MODEL after ``warmup`` AdamW steps, and how many of
    its leading elements are the token embedding's."""
    import torch

    cfg = GRAD_MODEL
    model = build_lm(cfg, seed)
    data = MarkovTokens(cfg.vocab, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(warmup + 1):
        opt.zero_grad(set_to_none=True)
        lm_loss(model, *data.batch(cfg, g)).backward()
        if _ < warmup:
            opt.step()
    return flat_grad(model).copy(), int(model.tok.weight.numel())


@dataclass
class TrainResult:
    loss: float
    bytes_ratio: float


#: Peak learning rate of the training check (AdamW), reached after WARMUP steps, then a
#: cosine decay to 10% at the last step: the usual LM recipe.
LR = 3e-3
WARMUP = 20


def lr_factor(step: int, steps: int) -> float:
    if step < WARMUP:
        return (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(codec: CodecSpec | None, *, workers: int, steps: int, seed: int) -> TrainResult:
    """Data-parallel in simulation: each worker's gradient goes through ``codec`` (with its
    own ErrorFeedback) or stays fp32; the mean is applied to one shared replica (every
    worker would apply the same mean). Only the worker -> reducer direction is compressed."""
    import torch

    cfg = TRAIN_MODEL
    model = build_lm(cfg, seed)
    data = MarkovTokens(cfg.vocab, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    shards = data.sample(workers * steps * cfg.batch, cfg.seq, g).view(
        workers, steps, cfg.batch, cfg.seq + 1
    )
    held_out = data.sample(512, cfg.seq, g)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps))
    numel = sum(p.numel() for p in model.parameters())
    feedback = [ErrorFeedback(numel) for _ in range(workers)]
    wire = 0
    for step in range(steps):
        mean = np.zeros(numel, np.float32)
        for w in range(workers):
            opt.zero_grad(set_to_none=True)
            batch = shards[w, step]
            lm_loss(model, batch[:, :-1], batch[:, 1:]).backward()
            grad = flat_grad(model)
            if codec is not None:
                chunks = [
                    encode_chunk(grad[o : o + n], codec, feedback=feedback[w].slice(o, n), offset=o)
                    for o, n in chunk_ranges(numel, codec)
                ]
                wire += sum(c.wire_bytes for c in chunks)
                grad = decode_all(chunks, numel)
            else:
                wire += grad.nbytes
            mean += grad
        mean /= np.float32(workers)
        set_flat_grad(model, mean)
        opt.step()
        sched.step()
    with torch.no_grad():
        loss = float(lm_loss(model, held_out[:, :-1], held_out[:, 1:]))
    return TrainResult(loss, wire / (steps * workers * numel * 4))


# --------------------------------------------------------------------------- output


def print_table(rows: list[Row]) -> None:
    print(
        f"{'codec':<24}{'data':<10}{'bytes/fp32':>11}{'x fewer':>9}{'rel L2 err':>12}{'enc GB/s':>10}{'dec GB/s':>10}"
    )
    for r in rows:
        print(
            f"{r.codec:<24}{r.data:<10}{r.ratio:>11.4f}{1 / r.ratio:>9.2f}{r.rel_err:>12.3g}"
            f"{r.enc_gbps:>10.3f}{r.dec_gbps:>10.3f}"
        )


def check_bars(rows: list[Row]) -> list[str]:
    """The wire-bytes bars that the rows can decide (PASS/FAIL lines)."""
    by = {(r.codec, r.data): r for r in rows}
    out = []
    for data in ("normal", "gradient", "grad-dense"):
        i8, s8 = by.get(("int8", data)), by.get(("sigma8", data))
        if i8 and s8:
            ok = i8.ratio <= 0.26 and i8.rel_err <= s8.rel_err
            out.append(
                f"{'PASS' if ok else 'FAIL'} int8 <= 0.26x fp32 ({i8.ratio:.4f}) at error <= sigma8 "
                f"({i8.rel_err:.3g} vs {s8.rel_err:.3g}) on {data}"
            )
    iz = by.get(("int8+zstd", "gradient"))
    if iz:
        out.append(
            f"{'PASS' if iz.ratio <= 0.2 else 'FAIL'} int8+zstd <= 0.2x fp32 on real gradients ({iz.ratio:.4f})"
        )
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)
    names = [n.strip() for n in args.codecs.split(",") if n.strip()]
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    grad, emb = real_gradient(args.seed)
    sets = {
        "normal": rng.standard_normal(args.elements).astype(np.float32),
        "gradient": grad,
        "grad-dense": grad[emb:],
    }
    print(
        f"data: normal = {sets['normal'].size} N(0,1) values; gradient = {grad.size} values of a tiny "
        f"LM {GRAD_MODEL} ({time.perf_counter() - t0:.1f}s to build), {np.mean(grad == 0):.1%} exact "
        f"zeros (embedding rows of tokens absent from the batch); grad-dense = the same without "
        f"the token embedding ({np.mean(grad[emb:] == 0):.1%} zeros). Timings: one thread."
    )
    rows = [measure(x, name, data, args.repeat) for data, x in sets.items() for name in names]
    print_table(rows)
    lines = check_bars(rows)
    out: list[dict[str, Any]] = [r.as_json() for r in rows]
    if args.steps > 0:
        codec = CodecSpec.parse(args.train_codec)
        t1 = time.perf_counter()
        base = train(None, workers=args.workers, steps=args.steps, seed=args.seed)
        comp = train(codec, workers=args.workers, steps=args.steps, seed=args.seed)
        rel = comp.loss / base.loss
        print(
            f"\ntraining check: {args.workers} workers x {args.steps} steps, tiny LM {TRAIN_MODEL} "
            f"({time.perf_counter() - t1:.1f}s)"
        )
        print(f"  fp32 mean          final loss {base.loss:.4f}")
        print(
            f"  {codec.name:<18} final loss {comp.loss:.4f}  ratio {rel:.4f}  bytes {comp.bytes_ratio:.5f} "
            f"of fp32 ({1 / comp.bytes_ratio:.1f}x fewer)"
        )
        ok = 1 / comp.bytes_ratio >= 50 and rel <= 1.02
        lines.append(
            f"{'PASS' if ok else 'FAIL'} top-k+EF >= 50x ({1 / comp.bytes_ratio:.1f}x) with final loss "
            f"within 2% ({(rel - 1) * 100:+.2f}%)"
        )
        out.append(
            {
                "codec": codec.name,
                "data": "train",
                "bytes_ratio": round(comp.bytes_ratio, 6),
                "fp32_loss": round(base.loss, 5),
                "loss": round(comp.loss, 5),
                "loss_ratio": round(rel, 5),
                "workers": args.workers,
                "steps": args.steps,
            }
        )
    print()
    for line in lines:
        print(line)
    if args.json:
        print(json.dumps(out))
    return 0
