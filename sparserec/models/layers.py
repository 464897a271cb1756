"""Pieces shared by the recommenders: feed-forward, SDPA attention, packed <-> padded, the losses."""
import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class FeedForward(nn.Module):
    """T5's position-wise FFN: Linear(d→d_ff), activation, dropout, Linear(d_ff→d), no biases."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", dropout: float = 0.0):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.activation = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        return self.down(self.dropout(self.activation(self.up(x))))


class Attention(nn.Module):
    """Grouped-query softmax attention on padded batches (torch SDPA), as self- or cross-attention.

    Keys and values are projected separately (`keys_values`) so callers can cache them: the
    decoder's self-attention cache and its once-per-request cross-attention memory.
    head_dim: None = d_model // num_heads; else the heads' width is num_heads * head_dim, which
    may differ from d_model (T5's d_kv: TIGER uses 6 heads of 64 with d_model 128).
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, dropout: float = 0.0,
                 head_dim: int | None = None):
        super().__init__()
        if head_dim is None and d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = head_dim or d_model // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, num_kv_heads * self.head_dim, bias=False)
        self.out_proj = nn.Linear(num_heads * self.head_dim, d_model, bias=False)

    def _split_heads(self, x, heads):  # (B, T, heads*D) -> (B, heads, T, D)
        return x.unflatten(-1, (heads, self.head_dim)).transpose(1, 2)

    def keys_values(self, source):
        """source (B, S, d_model) -> keys, values, each (B, Hkv, S, D)."""
        return (self._split_heads(self.k_proj(source), self.num_kv_heads),
                self._split_heads(self.v_proj(source), self.num_kv_heads))

    def forward(self, x, keys, values, attn_mask=None):
        """x (B, L, d_model) attends to keys/values (B, Hkv, S, D); attn_mask: bool, True = visible,
        broadcastable to (B, H, L, S)."""
        q = self._split_heads(self.q_proj(x), self.num_heads)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, enable_gqa=True,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).flatten(2))


def causal_mask(num_queries: int, num_keys: int, device=None):
    """(L, S) bool: the last L of S positions each see themselves and everything before."""
    return torch.ones(num_queries, num_keys, dtype=torch.bool, device=device).tril(num_keys - num_queries)


def pad_packed(x, cu_seqlens):
    """Packed (T_total, ...) -> padded (B, T_max, ...) with zeros, and valid (B, T_max) bool."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    valid = torch.arange(int(lengths.max()), device=x.device)[None, :] < lengths[:, None].to(x.device)
    padded = x.new_zeros(*valid.shape, *x.shape[1:])
    padded[valid] = x
    return padded, valid


class PackedDenseSelfAttention(nn.Module):
    """Bidirectional dense self-attention with JourneySparseAttention's packed interface.

    The dense ablation of the encoder; `anchor_mask` and `plan` are accepted and ignored (dense
    attention sees everything and keeps no per-batch maps). On CUDA the jagged batch is padded and runs as one masked SDPA launch; on the CPU
    each sequence runs its own unmasked SDPA (the fused CPU kernel), since padding a batch of
    short and long histories to the longest wastes most of the work there.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, dropout: float = 0.0,
                 head_dim: int | None = None):
        super().__init__()
        self.attention = Attention(d_model, num_heads, num_kv_heads, dropout, head_dim)

    def forward(self, x, cu_seqlens, anchor_mask=None, plan=None):
        if x.is_cuda:
            padded, valid = pad_packed(x, cu_seqlens)
            keys, values = self.attention.keys_values(padded)
            return self.attention(padded, keys, values, attn_mask=valid[:, None, None, :])[valid]
        bounds = cu_seqlens.tolist()
        outputs = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            sequence = x[None, start:end]
            outputs.append(self.attention(sequence, *self.attention.keys_values(sequence))[0])
        return torch.cat(outputs)


def sequence_loss(logits, targets, ignore_index: int = -100):
    """Mean token cross-entropy of logits (B, L, V) against targets (B, L); `ignore_index` skips a position."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)


class _LinearCrossEntropy(torch.autograd.Function):
    """mean_n CE(x_n W^T, t_n), with the gradients made in the forward, a block of rows at a time.

    F.cross_entropy(F.linear(x, W), t) keeps (N, V) logits, their log-softmax and two (N, V)
    gradients in memory; in a Retail ranker step (20k items) those passes took 36% of the time, the
    three GEMMs 44%. Here each block's logits become its softmax gradient in place while they are in
    cache and go straight into dx and dW, so nothing of size (N, V) is stored and the backward only
    scales.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, block_rows, grad_enabled):
        need_x, need_weight = (grad_enabled and need for need in ctx.needs_input_grad[:2])
        rows, accumulate = x.shape[0], torch.promote_types(x.dtype, torch.float32)  # float64 stays float64
        row_losses = torch.empty(rows, dtype=accumulate, device=x.device)  # summed once: no running-sum error
        grad_x = torch.empty_like(x) if need_x else None
        grad_weight = torch.zeros_like(weight, dtype=accumulate) if need_weight else None
        for start in range(0, rows, block_rows):
            block, block_targets = x[start:start + block_rows], targets[start:start + block_rows]
            logits = (block @ weight.T).to(accumulate)
            target_logits = logits.gather(1, block_targets[:, None])[:, 0]
            top = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(top).exp_()  # the logits are not needed again: their memory is reused
            total = probs.sum(dim=1, keepdim=True)
            row_losses[start:start + block_rows] = top[:, 0] + total[:, 0].log() - target_logits
            if need_x or need_weight:
                probs.div_(total)
                probs[torch.arange(len(block_targets), device=x.device), block_targets] -= 1
                grad_logits = probs.to(x.dtype)
                if need_x:
                    torch.mm(grad_logits, weight, out=grad_x[start:start + block_rows])
                if need_weight:
                    grad_weight.addmm_(grad_logits.T.to(accumulate), block.to(accumulate))
        ctx.save_for_backward(grad_x.div_(rows) if need_x else None,
                              grad_weight.div_(rows).to(weight.dtype) if need_weight else None)
        return row_losses.mean()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_weight = ctx.saved_tensors
        return (None if grad_x is None else grad_x * grad_loss.to(grad_x.dtype),
                None if grad_weight is None else grad_weight * grad_loss.to(grad_weight.dtype), None, None, None)


def linear_cross_entropy(x, weight, targets, block_elements: int = 1 << 20):
    """F.cross_entropy(F.linear(x, weight), targets) (the mean over the N rows; logits and loss in at
    least float32) without its (N, V) intermediates: x (N, d), weight (V, d), targets (N,) int64 in
    [0, V). Rows go through in blocks of about `block_elements` logits (1M: the fastest on the CPU
    for a 20k catalogue). Not twice differentiable."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: x must be (N, d) and weight (V, d), got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.shape != x.shape[:1] or targets.dtype != torch.int64:
        raise TypeError(f"linear_cross_entropy: targets must be int64 of shape ({x.shape[0]},), got "
                        f"{targets.dtype} {tuple(targets.shape)}")
    if x.shape[0] == 0:
        raise ValueError("linear_cross_entropy: no rows (the mean of an empty set)")
    grad_enabled = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(x, weight, targets, max(1, block_elements // weight.shape[0]), grad_enabled)
