"""The trained model's forward pass for serving, in fewer graph ops.

TF Serving without XLA runs the graph op by op, and a request of 64 context points
and 16 queries is small: the time goes into per-op overhead, not arithmetic. The
Keras layers spend ops on shape bookkeeping (Dense on 3-D inputs reshapes through
tensordot; MultiHeadAttention runs six Einsums). `lean_forward(model)` computes the
same function from the same weights with 2-D matmuls: one matmul for the query, key
and value projections of a block, batched matmuls for the scores and values, one
for the output projection, LayerNorm and GELU written out. Standardisation, the
embedding and the output head are the model's own layers, called as they are.

It is used by the export (`build_archive`); the tests hold it to the Keras model's
outputs within float32 rounding for every head.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from gpicl_tf.layers import bar_outputs


def supported(model) -> bool:
    """The lean path covers float32 models (mixed-precision ones keep the Keras graph)."""
    return getattr(model.dtype_policy, "compute_dtype", "float32") == "float32"


def _normalise(h, eps):
    """LayerNorm without its scale and shift (folded into the next matmul)."""
    mean, var = tf.nn.moments(h, axes=[-1], keepdims=True)
    return (h - mean) * tf.math.rsqrt(var + eps)


def _fold(ln, kernel, bias):
    """Weights of LN(h) @ kernel + bias as normalised(h) @ W + c: W = gamma * kernel
    (row-wise), c = beta @ kernel + bias; numpy float32, computed once at trace time."""
    gamma, beta = np.asarray(ln.gamma, np.float64), np.asarray(ln.beta, np.float64)
    kernel, bias = np.asarray(kernel, np.float64), np.asarray(bias, np.float64)
    return ((gamma[:, None] * kernel).astype(np.float32),
            (beta @ kernel + bias).astype(np.float32))


def lean_forward(model):
    """A function (x, y, is_query) -> the model's inference outputs (the same structure
    as model(..., training=False)), with the trunk's weights as constants: their values
    when lean_forward is called (call it eagerly, once the weights are final)."""
    std = model.get_layer("standardize")
    embed = model.get_layer("embed")
    ln_final = model.get_layer("ln_final")
    blocks = [model.get_layer(f"block_{i}") for i in range(model.n_layers)]
    heads, key_dim = model.n_heads, blocks[0].key_dim
    hk = heads * key_dim
    scale = 1.0 / math.sqrt(key_dim)

    def block_weights(blk):
        attn = blk.attn
        qd, kd, vd, od = attn.query_dense, attn.key_dense, attn.value_dense, attn.output_dense
        kernel = np.concatenate([np.reshape(qd.kernel, [-1, hk]) * scale,
                                 np.reshape(kd.kernel, [-1, hk]),
                                 np.reshape(vd.kernel, [-1, hk])], axis=1)  # (D, 3 hk)
        bias = np.concatenate([np.reshape(qd.bias, [hk]) * scale, np.reshape(kd.bias, [hk]),
                               np.reshape(vd.bias, [hk])])
        w_qkv, b_qkv = _fold(blk.ln_attn, kernel, bias)
        w_in, b_in = _fold(blk.ln_mlp, blk.mlp_in.kernel, blk.mlp_in.bias)
        return dict(w_qkv=w_qkv, b_qkv=b_qkv, eps_attn=blk.ln_attn.epsilon,
                    w_out=np.reshape(od.kernel, [hk, -1]), b_out=np.asarray(od.bias),
                    w_in=w_in, b_in=b_in, act=blk.mlp_in.activation, eps_mlp=blk.ln_mlp.epsilon,
                    w_mlp=np.asarray(blk.mlp_out.kernel), b_mlp=np.asarray(blk.mlp_out.bias))

    def block_fn(w, h2, bias, b, n):
        a = _normalise(h2, w["eps_attn"])
        qkv = tf.nn.bias_add(tf.matmul(a, w["w_qkv"]), w["b_qkv"])
        qkv = tf.transpose(tf.reshape(qkv, [b, n, 3, heads, key_dim]), [2, 0, 3, 1, 4])
        scores = tf.matmul(qkv[0], qkv[1], transpose_b=True) + bias  # (B, H, N, N)
        ctx = tf.matmul(tf.nn.softmax(scores, axis=-1), qkv[2])  # (B, H, N, k)
        ctx = tf.reshape(tf.transpose(ctx, [0, 2, 1, 3]), [b * n, hk])
        h2 = h2 + tf.nn.bias_add(tf.matmul(ctx, w["w_out"]), w["b_out"])
        m = w["act"](tf.nn.bias_add(tf.matmul(_normalise(h2, w["eps_mlp"]), w["w_in"]),
                                    w["b_in"]))
        return h2 + tf.nn.bias_add(tf.matmul(m, w["w_mlp"]), w["b_mlp"])

    weights = [block_weights(blk) for blk in blocks]  # now, eagerly: numpy constants
    w_embed, b_embed = np.asarray(embed.kernel), np.asarray(embed.bias)

    def forward(x, y, is_query):
        feats, y_loc, y_scale = std(x, y, is_query)
        shape = tf.shape(feats)
        b, n = shape[0], shape[1]
        # Point i attends to j iff j is context or j == i (ContextAttentionMask), as an
        # additive bias (Keras's masked softmax adds -1e9 where the mask is off).
        ctx = tf.cast(is_query, tf.float32) < 0.5
        allowed = ctx[:, None, :] | tf.eye(n, dtype=tf.bool)[None]
        bias = tf.where(allowed, 0.0, -1e9)[:, None]  # (B, 1, N, N)
        h2 = tf.reshape(feats, [b * n, w_embed.shape[0]])
        h2 = tf.nn.bias_add(tf.matmul(h2, w_embed), b_embed)
        for w in weights:
            h2 = block_fn(w, h2, bias, b, n)
        h = tf.reshape(ln_final(h2), [b, n, -1])
        if model.head == "bar":
            return bar_outputs(model.get_layer("bar"), h, y_loc, y_scale, is_query, feats)
        if model.classify:
            return model.get_layer("y_pred")(h)
        return model.get_layer("y_pred")(model.get_layer("head")(h), y_loc, y_scale)

    return forward
