"""sparserec.savings: JSA-vs-dense measurements of a GRACE encoder report what they time."""
import torch

from sparserec import savings
from sparserec.models import GRACE
from sparserec.models.grace import GRACEConfig
from sparserec.tokenize import PackedHistories


def test_measure_reports_flops_and_every_latency():
    torch.manual_seed(0)
    model = GRACE(GRACEConfig(vocab_size=50, d_model=32, num_heads=2, d_ff=64, dropout=0.0, max_positions=256))
    lengths = [40, 200]
    cu_seqlens = torch.tensor([0, 40, 240], dtype=torch.int32)
    packed = PackedHistories(torch.randint(2, 50, (240,)), cu_seqlens, torch.rand(240) < 0.1)
    (row,) = savings.measure(model, [("two users", packed)], repeats=1, progress=False)
    assert (row.sequences, row.tokens_per_sequence) == (2, 120)
    assert row.dense_gflops == 2 * 4 * 32 * (40**2 + 200**2) / 1e9  # 2 layers x 4·D·H·T² (H·D = 32)
    assert row.jsa_gflops > 0
    for value in (row.dense_ms, row.jsa_ms, row.dense_train_ms, row.jsa_train_ms):
        assert value > 0
    table = savings.format_table([row], "CPU")
    assert "fwd+bwd speedup" in table and "two users" in table
