"""gpicl_tf's models written in PyTorch, timed eager and under torch.compile.

    python benchmarks/torch_peer.py [--batch 64 --points 64 --d-model 64 --layers 4 --heads 4]
    python benchmarks/torch_peer.py --model-file default.npz    # the `default` preset's model

Run it with a Python that has torch (an optional peer, never a dependency of
gpicl_tf); `python benchmarks/train_throughput.py --peer torch --torch-python PY`
runs it beside the TensorFlow figure. Two models, each the same computation as
gpicl_tf's:

- the plain one (`mlp1d`): per-task standardisation of x and y over the context
  points, one token per point (x, y zeroed on queries, query flag), pre-LN blocks whose
  attention lets every point see the context points and itself, GELU MLP 4x (exact, or
  with --gelu tanh the tanh approximation, as model.gelu), a zero-initialised head, the
  masked-query MSE. The batch is drawn once (random 1-16-16-16-1 tanh/swish/relu MLP
  tasks).
- with --model-file, the `default` preset's (`BarTransformer`): the context's ridge and
  RBF-kernel GP fits and the features built from them (`FitsStandardizer`, gpicl_tf's
  ContextStandardizer as `default` configures it), the same blocks, the bar head and its
  masked-query NLL. The file (written by train_throughput.py) holds gpicl_tf's weights,
  the batch, and gpicl_tf's outputs on them, which the peer checks its own against
  before timing (the check_* figures it prints).

Both train with Adam and global-norm clipping at 1.0 on their one batch, reused, so only
the step is timed. Prints one JSON line.
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


# Constants of gpicl_tf.layers and gpicl_tf.distributions (the peer imports no TensorFlow);
# tests/test_benchmarks.py holds them equal to the package's.
LOO_CLIP, BASE_CLIP, BASE_CLIP_MAX, LOO_SCALE_FLOOR = 10.0, 3.0, 6.0, 1e-3
GP_UNIT_MIN, GP_UNIT_MAX = 0.05, 20.0
KERNEL_VAR_FLOOR, KERNEL_VAR_FLOOR_F64, KERNEL_FLOAT32_NOISE = 1e-6, 1e-12, 1e-4
PHI_INV_075, SQRT_2_OVER_PI = 0.6744897501960817, math.sqrt(2.0 / math.pi)
RECAL_LEVELS = ((0.0, 0.002, 0.01, 0.025) + tuple(round(0.05 * i, 2) for i in range(1, 20))
                + (0.975, 0.99, 0.998, 1.0))


class FitsStandardizer(nn.Module):
    """gpicl_tf's ContextStandardizer as the `default` preset configures it: per-task
    standardisation relative to a context point, presence flags, ridge fits, RBF-kernel GP
    fits (Cholesky, leave-one-out fits and variances, evidence), their evidence-weighted
    average as a competing base fit (base_fit="loo_bma"), the base picked by leave-one-out
    error (the ridge fits' counting the intercept with loo_intercept), the per-point unit
    (y_scale="loo_gp") and the kernel fits' log stds (kernel_std). Configs with other
    options of the layer are refused before the peer runs (train_throughput.py's
    peer_problem)."""

    def __init__(self, cfg):
        super().__init__()
        self.eps = cfg["std_eps"]
        self.ridge = cfg["ridge_penalties"]
        self.scales = cfg["kernel_length_scales"]
        self.noises = cfg["kernel_noises"]
        self.loo_intercept = cfg.get("loo_intercept", False)  # model.loo_intercept

    def stats(self, v, w, n):
        first = w[..., 0].argmax(1)
        pick = F.one_hot(first, v.shape[1]).to(v.dtype).unsqueeze(-1)
        ref = (v * pick * w).sum(1, keepdim=True)
        dev = (v - ref) * w
        spread = dev.abs().amax(1, keepdim=True)
        spread = torch.where(spread > self.eps * ref.abs(), spread, torch.zeros_like(spread))
        safe = torch.where(spread > 0, spread, torch.ones_like(spread))
        u = dev / safe
        nn_ = n.clamp(min=1.0)
        mean_u = u.sum(1, keepdim=True) / nn_
        var_u = ((u - mean_u) ** 2 * w).sum(1, keepdim=True) / nn_
        std_u = torch.where(spread > 0, var_u.sqrt(), torch.ones_like(var_u))
        few = n < 2.0
        mean_u = torch.where(few, torch.zeros_like(mean_u), mean_u)
        std_u = torch.where(few, torch.ones_like(std_u), std_u)
        safe = torch.where(few, torch.ones_like(safe), safe)
        return ref, safe, mean_u, std_u, spread

    def standardize(self, v, w, n):
        ref, safe, mean_u, std_u, spread = self.stats(v, w, n)
        vs = ((v - ref) / safe - mean_u) / std_u
        loc = ref + safe * mean_u
        scale = torch.where((spread > 0) | (n < 2.0), safe * std_u, torch.zeros_like(std_u))
        return vs, loc, scale, spread

    def ridge_fits(self, xs, ys, w):
        xc = xs * w
        dy = ys.shape[-1]
        gram = xc.transpose(1, 2) @ xc  # (B, dx, dx)
        rhs = torch.cat([xc.transpose(1, 2) @ ys, xc.transpose(1, 2)], -1)  # [X'y, X']
        eye = torch.eye(xs.shape[-1], dtype=xs.dtype)
        lams = torch.tensor(self.ridge, dtype=xs.dtype)
        a = gram[:, None] + lams[:, None, None] * eye
        chol = torch.linalg.cholesky(a)
        sol = torch.cholesky_solve(rhs[:, None].expand(-1, len(self.ridge), -1, -1), chol)
        fit = torch.einsum("bni,bpik->bnpk", xs, sol[..., :dy])
        lev = torch.einsum("bni,bpin->bnp", xc, sol[..., dy:])[..., None]
        if self.loo_intercept:  # the context's mean was fitted too: its leverage 1/n
            lev = lev + w[..., None] / w.sum(1, keepdim=True)[..., None].clamp(min=1.0)
        return fit, (fit - lev * ys[:, :, None]) / (1.0 - lev).clamp(min=1e-6)

    def kernel_fits(self, xs, ys, w, present):
        sq = (xs ** 2).sum(-1)
        d2 = (sq[:, :, None] + sq[:, None, :] - 2.0 * xs @ xs.transpose(1, 2)).clamp(min=0.0)
        d = present.sum(-1).clamp(min=1.0)  # (B, 1)
        ls2 = torch.tensor(self.scales, dtype=xs.dtype) ** 2
        k = torch.exp(-0.5 * d2[:, None] / (d[:, :, None, None] * ls2[None, :, None, None]))
        m = w[..., 0]
        k_ctx = k * m[:, None, None, :]
        noise = torch.tensor(self.noises, dtype=xs.dtype).reshape(1, -1, 1, 1)
        eye = torch.eye(xs.shape[1], dtype=xs.dtype)
        diag = (noise * m[:, None, :, None] + (1.0 - m)[:, None, :, None]) * eye
        a = k_ctx * m[:, None, :, None] + diag
        dy = ys.shape[-1]
        rhs = ys[:, None].expand(-1, len(self.scales), -1, -1)
        chol = torch.linalg.cholesky(a)
        z = torch.linalg.solve_triangular(chol, torch.cat([rhs, eye.expand(a.shape)], -1),
                                          upper=False)
        c_inv, z = z[..., dy:], z[..., :dy]
        alpha = torch.linalg.solve_triangular(chol.transpose(-1, -2), z, upper=True)
        fit = (k_ctx @ alpha).permute(0, 2, 1, 3)
        a_inv_diag = (c_inv ** 2).sum(-2)
        loo = ys[:, :, None] - (alpha / a_inv_diag[..., None]).permute(0, 2, 1, 3)
        n = m.sum(1).clamp(min=1.0)[:, None, None]
        quad = (z ** 2).sum(2)
        half_logdet = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        amp = (quad / n).clamp(min=1e-30)
        evidence = -0.5 * n * torch.log(amp) - half_logdet[..., None]
        v = c_inv @ k_ctx.transpose(-1, -2)
        var = 1.0 + noise[..., 0] - (v ** 2).sum(-2)
        var = torch.where(m[:, None] > 0, 1.0 / a_inv_diag, var)
        return fit, loo, var.clamp(min=KERNEL_VAR_FLOOR).permute(0, 2, 1), evidence, amp

    @staticmethod
    def loo_best(fit, loo, ys, w, n, eligible):
        err = (((loo - ys[:, :, None]) ** 2) * w[..., None]).sum(1)
        err = torch.where(eligible > 0, err, torch.full_like(err, 1e30))
        n0 = n[:, 0]
        mean_err = (ys ** 2 * w).sum(1) * (n0 / (n0 - 1.0).clamp(min=1.0)) ** 2
        mean_err = torch.where(n0 < 3.0, -torch.ones_like(mean_err), mean_err)
        err = torch.cat([mean_err[:, None], err], 1)
        pick = F.one_hot(err.argmin(1), err.shape[1]).to(fit.dtype).permute(0, 2, 1)[:, 1:]
        mse = err.amin(1) / n0.clamp(min=1.0) + torch.exp(3.0 - n0)
        rms = mse.clamp(min=LOO_SCALE_FLOOR ** 2).sqrt()
        rms = torch.where(n0 < 3.0, torch.ones_like(rms), rms)
        clip = BASE_CLIP * (n0 / 8.0).clamp(1.0, BASE_CLIP_MAX / BASE_CLIP)
        base = (fit * pick[:, None]).sum(2)
        resid = torch.where(pick.sum(1, keepdim=True) > 0,
                            ((ys[:, :, None] - loo) * pick[:, None]).sum(2),
                            ys * (n / (n - 1.0).clamp(min=1.0))) * w
        base = torch.minimum(torch.maximum(base, -clip[:, None]), clip[:, None])
        return base, rms[:, None], resid, pick

    def forward(self, x, y, is_query):
        q = is_query.unsqueeze(-1)
        w = 1.0 - q
        n = w.sum(1, keepdim=True)
        xs, _, _, x_spread = self.standardize(x, w, n)
        ys, y_loc, y_scale, _ = self.standardize(y, w, n)
        ys = ys * w
        present = (x_spread > 0).to(x.dtype)
        r_fit, r_loo = self.ridge_fits(xs, ys, w)
        k_fit, k_loo, k_var, evidence, amp = self.kernel_fits(xs, ys, w, present)
        fit = torch.cat([r_fit, k_fit], 2)
        loo = torch.cat([r_loo, k_loo], 2).clamp(-LOO_CLIP, LOO_CLIP)
        b, npts, n_fits, dy = fit.shape
        n_other = len(self.ridge)
        # loo_bma: the kernel fits' evidence-weighted average competes as one more fit
        wts = torch.softmax(evidence, 1)[:, None]
        kf, kl = fit[:, :, n_other:], loo[:, :, n_other:]
        mean_fit, mean_loo = (kf * wts).sum(2, keepdim=True), (kl * wts).sum(2, keepdim=True)
        ctx = w[:, :, :, None] > 0
        at, mean_at = torch.where(ctx, kl, kf), torch.where(ctx, mean_loo, mean_fit)
        mix_var = ((amp[:, None] * k_var[..., None] + (at - mean_at) ** 2) * wts).sum(
            2, keepdim=True)
        cand_var = torch.cat([torch.ones_like(fit[:, :, :n_other]), k_var[..., None]
                              * torch.ones_like(fit[:, :, :1]), mix_var], 2)
        ones = torch.ones_like(evidence[:, :1])
        eligible = torch.cat([ones] * n_other + [0.0 * ones] * len(self.scales) + [ones], 1)
        base, base_err, loo_resid, pick = self.loo_best(
            torch.cat([fit, mean_fit], 2), torch.cat([loo, mean_loo], 2), ys, w, n, eligible)
        y_loc = y_loc + y_scale * base
        picked = (cand_var * pick[:, None]).sum(2) + (1.0 - pick.sum(1, keepdim=True))
        ctx_var = (picked * w).sum(1, keepdim=True) / n.clamp(min=1.0)
        ctx_var = torch.where(n > 0.0, ctx_var, torch.ones_like(ctx_var))
        rel = (picked / ctx_var.clamp(min=KERNEL_VAR_FLOOR_F64)).sqrt().clamp(GP_UNIT_MIN,
                                                                             GP_UNIT_MAX)
        base_err = base_err * rel
        y_scale = y_scale * base_err
        in_unit = lambda v, u: (v / u).clamp(-LOO_CLIP, LOO_CLIP)  # noqa: E731
        feats = [xs, ys, q, present * torch.ones_like(xs), fit.reshape(b, npts, -1), base,
                 (ys - base) * w, torch.log(base_err) * torch.ones_like(ys),
                 in_unit(loo_resid, base_err) * w,
                 in_unit(fit - base[:, :, None], base_err[:, :, None]).reshape(b, npts, -1),
                 0.5 * torch.log(k_var)]
        return torch.cat(feats, -1), y_loc, y_scale


class BarTransformer(nn.Module):
    """The `default` preset's model: FitsStandardizer, the transformer of
    InContextTransformer above on its features, and the bar head (logits over the
    borders' bins of the standardised y; its NLL with half-normal or Pareto tails, through
    the identity tail warps gpicl_tf's head returns in training)."""

    def __init__(self, cfg, borders):
        super().__init__()
        d, layers, heads = cfg["d_model"], cfg["n_layers"], cfg["n_heads"]
        self.fits = FitsStandardizer(cfg)
        self.embed = nn.Linear(cfg["n_features"], d)
        scale = 1.0 / math.sqrt(2 * layers)
        self.blocks = nn.ModuleList(Block(d, heads, cfg["key_dim"], cfg["mlp_ratio"] * d,
                                          scale, cfg["gelu"]) for _ in range(layers))
        self.ln = nn.LayerNorm(d, eps=1e-5)
        self.dy, self.n_bins = cfg["y_dim"], len(borders) - 1
        self.head = nn.Linear(d, self.dy * self.n_bins)
        self.register_buffer("borders", torch.tensor(borders, dtype=torch.float32))
        self.tail, self.tail_index = cfg["bar_tail"], cfg["bar_tail_index"]
        self.register_buffer("levels", torch.tensor(RECAL_LEVELS, dtype=torch.float32))

    def forward(self, x, y, is_query):
        feats, y_loc, y_scale = self.fits(x, y, is_query)
        return self.trunk(feats, is_query), y_loc, y_scale

    def trunk(self, feats, is_query):
        """The logits [B, N, dy, n_bins] from the standardiser's features."""
        x = feats
        ctx = is_query < 0.5
        eye = torch.eye(x.shape[1], dtype=torch.bool)
        mask = (ctx[:, None, :] | eye[None]).unsqueeze(1)
        h = self.embed(feats)
        for blk in self.blocks:
            h = blk(h, mask)
        return self.head(self.ln(h)).view(*h.shape[:2], self.dy, self.n_bins)

    def tail_scale(self, width):
        s = width / PHI_INV_075
        return s if self.tail == "normal" else s * SQRT_2_OVER_PI * (self.tail_index - 1.0)

    def tail_log_pdf(self, t, scale):
        if self.tail == "normal":
            return math.log(SQRT_2_OVER_PI) - torch.log(scale) - 0.5 * (t / scale) ** 2
        a = self.tail_index
        return math.log(a) - torch.log(scale) - (a + 1.0) * torch.log1p(t / scale)

    def tail_survival(self, t, scale):
        if self.tail == "normal":
            return torch.erfc(t / scale / math.sqrt(2.0))
        return torch.exp(-self.tail_index * torch.log1p(t / scale))

    def warp_slope(self, s, warp):  # the identity warp of training: xs = ys = the levels
        xs, ys = warp, warp
        dx = xs[..., 1:] - xs[..., :-1]
        slope = torch.where(dx > 0, (ys[..., 1:] - ys[..., :-1]) / dx.clamp(min=1e-30), 0.0)
        inside = (s[..., None] > xs[..., :-1]) & (s[..., None] <= xs[..., 1:])
        return torch.where(inside, slope, 0.0).sum(-1)

    def nll(self, logits, y, y_loc, y_scale, is_query):
        unit = torch.where(y_scale > 0, y_scale, torch.ones_like(y_scale))
        z = ((y - y_loc) / unit).clamp(-1e6, 1e6)
        b = self.borders
        widths = b[1:] - b[:-1]
        logp = torch.log_softmax(logits, -1)
        idx = torch.searchsorted(b[1:-1].contiguous(), z.contiguous(), right=True)
        lp_bin = logp.gather(-1, idx[..., None])[..., 0]
        inner = lp_bin - torch.log(widths[idx])
        s_lo, s_hi = self.tail_scale(widths[0]), self.tail_scale(widths[-1])
        t_lo, t_hi = (b[1] - z).clamp(min=0.0), (z - b[-2]).clamp(min=0.0)
        warp = self.levels.expand(*z.shape, -1)
        lower = (lp_bin + self.tail_log_pdf(t_lo, s_lo) + torch.log(self.warp_slope(
            self.tail_survival(t_lo, s_lo).clamp(min=1e-37), warp)))
        upper = (lp_bin + self.tail_log_pdf(t_hi, s_hi) + torch.log(self.warp_slope(
            self.tail_survival(t_hi, s_hi).clamp(min=1e-37), warp)))
        lp = torch.where(idx == 0, lower, torch.where(idx == self.n_bins - 1, upper, inner))
        nll = -lp.mean(-1)
        return (nll * is_query).sum() / is_query.sum().clamp(min=1.0)

    def loss(self, x, y, is_query):
        logits, y_loc, y_scale = self(x, y * (1 - is_query).unsqueeze(-1), is_query)
        return self.nll(logits, y, y_loc, y_scale, is_query)

    def load_keras(self, weights):
        """gpicl_tf's weights (Keras paths, numpy arrays) into this module."""
        t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
        with torch.no_grad():
            self.embed.weight.copy_(t(weights["embed/kernel"]).T)
            self.embed.bias.copy_(t(weights["embed/bias"]))
            for i, blk in enumerate(self.blocks):
                g = lambda k: weights[f"block_{i}/{k}"]  # noqa: E731
                d = blk.ln1.weight.shape[0]
                blk.ln1.weight.copy_(t(g("ln_attn/gamma")))
                blk.ln1.bias.copy_(t(g("ln_attn/beta")))
                blk.qkv.weight.copy_(torch.cat([t(g(f"attn/{p}/kernel")).reshape(d, -1)
                                                for p in ("query", "key", "value")], 1).T)
                blk.qkv.bias.copy_(torch.cat([t(g(f"attn/{p}/bias")).reshape(-1)
                                              for p in ("query", "key", "value")]))
                blk.out.weight.copy_(t(g("attn/attention_output/kernel")).reshape(-1, d).T)
                blk.out.bias.copy_(t(g("attn/attention_output/bias")))
                blk.ln2.weight.copy_(t(g("ln_mlp/gamma")))
                blk.ln2.bias.copy_(t(g("ln_mlp/beta")))
                blk.mlp_in.weight.copy_(t(g("mlp_in/kernel")).T)
                blk.mlp_in.bias.copy_(t(g("mlp_in/bias")))
                blk.mlp_out.weight.copy_(t(g("mlp_out/kernel")).T)
                blk.mlp_out.bias.copy_(t(g("mlp_out/bias")))
            self.ln.weight.copy_(t(weights["ln_final/gamma"]))
            self.ln.bias.copy_(t(weights["ln_final/beta"]))
            self.head.weight.copy_(t(weights["bar/logits/kernel"]).T)
            self.head.bias.copy_(t(weights["bar/logits/bias"]))


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


def mse_loss(model, x, y, q):
    pred = model(x, y * (1 - q).unsqueeze(-1), q)
    return (((pred - y) ** 2).mean(-1) * q).sum() / q.sum().clamp(min=1)


def time_steps(model, batch, steps, compiled, loss_fn=mse_loss):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y, q = batch

    def step():
        loss = loss_fn(model, x, y, q)
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
    p.add_argument("--model-file", metavar="NPZ",
                   help="the `default` preset's model instead (FitsStandardizer, bar head): its "
                        "config, weights, one batch and gpicl_tf's outputs on it, as "
                        "benchmarks/train_throughput.py --peer torch writes them; the peer "
                        "checks its own outputs against them, then times steps on that batch")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "gelu": a.gelu,
           "matmul_peak_gflops": matmul_peak()}
    if a.model_file:
        make, batch, loss_fn = bar_model(a.model_file, out)
    else:
        batch = random_mlp_batch(a.batch, a.points, torch.Generator().manual_seed(0))
        loss_fn = mse_loss

        def make():
            return InContextTransformer(d=a.d_model, layers=a.layers, heads=a.heads,
                                        key_dim=a.key_dim or None, mlp_ratio=a.mlp_ratio,
                                        gelu=a.gelu)
    for name, compiled in (("eager", False), ("compile", True)):
        rate, loss, cores = time_steps(make(), batch, a.steps, compiled, loss_fn)
        out[f"{name}_steps_per_sec"], out[f"{name}_last_loss"] = rate, loss
        out[f"{name}_cores"] = cores  # CPU seconds per second while timed
    print(json.dumps(out))


def bar_model(path, out):
    """(a maker of the model with gpicl_tf's weights, the batch, its loss) from a model
    file; records in `out` how far the peer's features, logits and loss are from
    gpicl_tf's on that batch and weights (largest absolute differences)."""
    import numpy as np

    f = np.load(path)
    cfg = json.loads(str(f["config"]))
    weights = {k[2:]: f[k] for k in f.files if k.startswith("w:")}
    batch = tuple(torch.tensor(f[k], dtype=torch.float32) for k in ("x", "y", "is_query"))

    def make():
        model = BarTransformer(cfg, f["borders"].tolist())
        model.load_keras(weights)
        return model

    x, y, q = batch
    model = make()
    tf_out = {k: torch.tensor(f[k]) for k in ("features", "y_loc", "y_scale", "check_logits")}
    with torch.no_grad():
        feats, y_loc, y_scale = model.fits(x, y * (1 - q).unsqueeze(-1), q)
        loss = model.nll(model.trunk(feats, q), y, y_loc, y_scale, q)
        # the transformer and head alone, on gpicl_tf's features, with a random head kernel
        # (the initial one is zero: every logit 0) in both
        model.head.weight.copy_(torch.tensor(f["check_head_kernel"]).T)
        logits = model.trunk(tf_out["features"], q)
        check_loss = model.nll(logits, y, tf_out["y_loc"], tf_out["y_scale"], q)
    for name, mine in (("features", feats), ("y_loc", y_loc), ("y_scale", y_scale),
                       ("check_logits", logits)):
        out[f"check_{name.replace('check_', '')}_max_abs_diff"] = float(
            (mine - tf_out[name]).abs().max())
    out["check_loss_gpicl_tf"], out["check_loss_torch"] = float(f["check_loss"]), float(
        check_loss)
    out["initial_loss_gpicl_tf"], out["initial_loss_torch"] = float(f["loss"]), float(loss)
    return make, batch, lambda m, x, y, q: m.loss(x, y, q)


if __name__ == "__main__":
    main()
