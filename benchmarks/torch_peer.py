"""The default gpicl_tf model written in PyTorch, timed eager and under torch.compile.

    python benchmarks/torch_peer.py [--batch 64 --points 64 --d-model 64 --layers 4 --heads 4]

Run it with a Python that has torch (an optional peer, never a dependency of
gpicl_tf); `python benchmarks/train_throughput.py --peer torch --torch-python PY`
runs it beside the TensorFlow figure. The model is the same computation: per-task
standardisation of x and y over the context points, one token per point
(x, y zeroed on queries, query flag), pre-LN blocks whose attention lets every
point see the context points and itself, GELU MLP 4x (exact, or with --gelu tanh the
tanh approximation, as model.gelu), a zero-initialised head,
the masked-query MSE, Adam with global-norm clipping at 1.0. The batch is drawn
once (random 1-16-16-16-1 tanh/swish/relu MLP tasks) and reused, so only the
step is timed. Prints one JSON line.
"""

import argparse
import json
import math
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d, heads, key_dim, mlp, res_scale, gelu="exact"):
        super().__init__()
        self.heads, self.key_dim = heads, key_dim
        self.gelu = "none" if gelu == "exact" else gelu  # F.gelu's name for the exact one
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-5), nn.LayerNorm(d, eps=1e-5)
        self.qkv = nn.Linear(d, 3 * heads * key_dim)
        self.out = nn.Linear(heads * key_dim, d)
        self.mlp_in, self.mlp_out = nn.Linear(d, mlp), nn.Linear(mlp, d)
        with torch.no_grad():
            self.out.weight.mul_(res_scale)
            self.mlp_out.weight.mul_(res_scale)

    def forward(self, h, mask):  # h (B, N, D), mask (B, 1, N, N) bool
        b, n, _ = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, n, 3, self.heads, self.key_dim).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), attn_mask=mask)
        h = h + self.out(a.transpose(1, 2).reshape(b, n, self.heads * self.key_dim))
        return h + self.mlp_out(F.gelu(self.mlp_in(self.ln2(h)), approximate=self.gelu))


class InContextTransformer(nn.Module):
    def __init__(self, dx=1, dy=1, d=64, layers=4, heads=4, key_dim=None, mlp_ratio=4,
                 gelu="exact"):
        super().__init__()
        self.embed = nn.Linear(dx + dy + 1, d)
        scale = 1.0 / math.sqrt(2 * layers)
        key_dim = key_dim or d // heads
        self.blocks = nn.ModuleList(Block(d, heads, key_dim, mlp_ratio * d, scale, gelu)
                                    for _ in range(layers))
        self.ln = nn.LayerNorm(d, eps=1e-5)
        self.head = nn.Linear(d, dy)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @staticmethod
    def standardize(v, w, n):
        mean = (v * w).sum(1, keepdim=True) / n.clamp(min=1)
        var = ((v - mean) ** 2 * w).sum(1, keepdim=True) / n.clamp(min=1)
        std = torch.where(n >= 2, var.sqrt().clamp(min=1e-12), torch.ones_like(var))
        return (v - mean) / std, mean, std

    def forward(self, x, y, is_query):
        w = (1 - is_query).unsqueeze(-1)  # (B, N, 1)
        n = w.sum(1, keepdim=True)
        xs = self.standardize(x, w, n)[0]
        ys, loc, scale = self.standardize(y, w, n)
        feats = torch.cat([xs, ys * w, is_query.unsqueeze(-1)], -1)
        ctx = is_query < 0.5  # (B, N)
        eye = torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
        mask = (ctx[:, None, :] | eye[None]).unsqueeze(1)  # (B, 1, N, N)
        h = self.embed(feats)
        for blk in self.blocks:
            h = blk(h, mask)
        return self.head(self.ln(h)) * scale + loc


def random_mlp_batch(b, n, gen):
    x = torch.rand(b, n, 1, generator=gen) * 2 - 1
    h = x
    for i, act in enumerate((torch.tanh, F.silu, F.relu)):
        din = 1 if i == 0 else 16
        h = act(h @ torch.randn(b, din, 16, generator=gen) + torch.randn(b, 1, 16, generator=gen))
    y = h @ torch.randn(b, 16, 1, generator=gen) + torch.randn(b, 1, 1, generator=gen)
    y = (y - y.mean(1, keepdim=True)) / (y.std(1, keepdim=True, unbiased=False) + 1e-4)
    k = torch.randint(0, n, (b, 1), generator=gen)
    rank = torch.rand(b, n, generator=gen).argsort(1).argsort(1)
    return x, y, (rank >= k).float()


def time_steps(model, batch, steps, compiled):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y, q = batch

    def step():
        pred = model(x, y * (1 - q).unsqueeze(-1), q)
        loss = (((pred - y) ** 2).mean(-1) * q).sum() / q.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    fn = torch.compile(step) if compiled else step
    for _ in range(5):  # compile and warm up
        fn()
    cpu, tic = cpu_seconds(), time.perf_counter()
    for _ in range(steps):
        loss = fn()
    wall = time.perf_counter() - tic
    return steps / wall, float(loss), (cpu_seconds() - cpu) / wall


def cpu_seconds():
    """User + system CPU seconds of this process (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def matmul_peak(n=2048, repeats=20):
    a = torch.randn(n, n)
    a @ a
    tic = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return 2 * n**3 / ((time.perf_counter() - tic) / repeats) / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--points", type=int, default=64)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--key-dim", type=int, default=0, help="per-head size (0: d_model // heads)")
    p.add_argument("--mlp-ratio", type=int, default=4)
    p.add_argument("--gelu", choices=["exact", "tanh"], default="exact",
                   help="the MLP's GELU: exact or its tanh approximation (model.gelu)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    batch = random_mlp_batch(a.batch, a.points, torch.Generator().manual_seed(0))
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "gelu": a.gelu,
           "matmul_peak_gflops": matmul_peak()}
    for name, compiled in (("eager", False), ("compile", True)):
        model = InContextTransformer(d=a.d_model, layers=a.layers, heads=a.heads,
                                     key_dim=a.key_dim or None, mlp_ratio=a.mlp_ratio,
                                     gelu=a.gelu)
        rate, loss, cores = time_steps(model, batch, a.steps, compiled)
        out[f"{name}_steps_per_sec"], out[f"{name}_last_loss"] = rate, loss
        out[f"{name}_cores"] = cores  # CPU seconds per second while timed
    print(json.dumps(out))


if __name__ == "__main__":
    main()
