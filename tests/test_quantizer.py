"""The batched quantizer against a plain per-codebook reference written here (docs/method.md §1)."""
import pytest
import torch
import torch.nn.functional as F

from meditok.quantizer import MultiCodebookQuantizer


def reference_quantize(z, codebooks, beta):
    """Straightforward per-codebook definition: loop over the K chunks one at a time.

    z: [B, L, K*D]; codebooks: [K, V, D] (raw, un-normalised). Returns (quantized [B, L, K*D],
    ids [B, K, L], loss averaged over codebooks)."""
    B, L, C = z.shape
    K, V, D = codebooks.shape
    outs, ids, losses = [], [], []
    for k in range(K):
        chunk = F.normalize(z[..., k * D:(k + 1) * D].reshape(-1, D), dim=-1)
        book = F.normalize(codebooks[k], dim=-1)
        idx = torch.argmax(chunk.detach() @ book.T, dim=1)
        e = book[idx]
        losses.append(beta * F.mse_loss(e.detach(), chunk) + F.mse_loss(e, chunk.detach()))
        outs.append((e.detach() - chunk.detach() + chunk).reshape(B, L, D))
        ids.append(idx.reshape(B, L))
    return torch.cat(outs, dim=-1), torch.stack(ids, dim=1), sum(losses) / K


@pytest.fixture
def quantizer():
    torch.manual_seed(0)
    q = MultiCodebookQuantizer(num_codebooks=8, codebook_size=64, codebook_dim=8, beta=0.25)
    with torch.no_grad():  # spread the codewords so ties are impossible
        q.weight.normal_()
    return q


def test_batched_equals_per_codebook_reference(quantizer):
    z = torch.randn(3, 10, 64, requires_grad=True)
    z_ref = z.detach().clone().requires_grad_(True)
    w_ref = quantizer.weight.detach().clone().requires_grad_(True)

    out = quantizer(z)
    ref_q, ref_ids, ref_loss = reference_quantize(z_ref, w_ref, beta=0.25)

    assert out.ids.shape == (3, 8, 10) and out.ids.dtype == torch.int64
    assert torch.equal(out.ids, ref_ids)
    torch.testing.assert_close(out.quantized, ref_q)
    torch.testing.assert_close(out.loss, ref_loss)

    # Same gradients for the input (straight-through + commitment) and for the codebooks.
    probe = torch.randn_like(out.quantized)
    (out.loss + (out.quantized * probe).sum()).backward()
    (ref_loss + (ref_q * probe).sum()).backward()
    torch.testing.assert_close(z.grad, z_ref.grad)
    torch.testing.assert_close(quantizer.weight.grad, w_ref.grad)


def test_quantized_values_are_unit_codewords_and_ids_roundtrip(quantizer):
    z = torch.randn(2, 5, 64)
    out = quantizer(z)
    chunks = out.quantized.reshape(2, 5, 8, 8)
    torch.testing.assert_close(chunks.norm(dim=-1), torch.ones(2, 5, 8))
    # idx_to_f reproduces the forward's quantized latent, and f_to_idx agrees with forward's ids
    torch.testing.assert_close(quantizer.idx_to_f(out.ids), out.quantized)
    assert torch.equal(quantizer.f_to_idx(z), out.ids)
    # a latent made of codewords maps back to the same ids
    assert torch.equal(quantizer.f_to_idx(quantizer.idx_to_f(out.ids)), out.ids)
    # [B, K, h, w] ids are accepted too
    torch.testing.assert_close(quantizer.idx_to_f(out.ids.reshape(2, 8, 5, 1)), out.quantized)


def test_usage_metric_and_ema_only_in_training(quantizer):
    ids_pattern = torch.arange(16)  # tokens pick 16 of 64 codes in every codebook
    codes = F.normalize(quantizer.weight.detach(), dim=-1)[:, ids_pattern]  # [K, 16, D]
    z = codes.permute(1, 0, 2).reshape(1, 16, 64)
    quantizer.eval()
    out = quantizer(z)
    assert torch.equal(out.ids[0], ids_pattern.expand(8, 16))
    assert out.usage.item() == pytest.approx(100 * 16 / 64)
    assert torch.count_nonzero(quantizer.vocab_usage) == 0, "eval mode must not touch the usage buffer"
    quantizer.train()
    quantizer(z)
    expected = torch.zeros(8, 64)
    expected[:, :16] = 1 / 16
    torch.testing.assert_close(quantizer.vocab_usage, expected)


@pytest.mark.parametrize("sync_usage", [True, False])
def test_usage_all_reduce_follows_the_sync_usage_switch(quantizer, monkeypatch, sync_usage):
    """In a process group, usage covers the global batch only with sync_usage (the default); the all-reduce is
    stood in for by one that adds a second rank's counts (codes 16..47), so the effect is visible on one process."""
    assert MultiCodebookQuantizer().sync_usage is True
    local_ids = torch.arange(16)
    codes = F.normalize(quantizer.weight.detach(), dim=-1)[:, local_ids]
    z = codes.permute(1, 0, 2).reshape(1, 16, 64)                      # this rank picks codes 0..15
    other_rank = torch.zeros(8, 64)
    other_rank[:, 16:48] = 1.0                                          # the other rank picked 16..47, once each
    calls = []

    def all_reduce(tensor, *args, **kwargs):
        calls.append(tensor.shape)
        tensor.add_(other_rank.flatten().view_as(tensor))

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    quantizer.sync_usage = sync_usage
    quantizer.train()
    usage = quantizer(z).usage.item()
    expected_counts = torch.zeros(8, 64)
    expected_counts[:, :16] = 1.0
    if sync_usage:
        expected_counts += other_rank
    assert len(calls) == int(sync_usage)
    assert usage == pytest.approx(100 * (expected_counts > 0).float().mean().item())   # 75 % synced, 25 % local
    torch.testing.assert_close(quantizer.vocab_usage, expected_counts / expected_counts.sum(dim=1, keepdim=True))
    quantizer.eval()
    quantizer(z)
    assert len(calls) == int(sync_usage), "eval mode never all-reduces"


def test_state_dict_uses_released_per_codebook_names(quantizer):
    sd = quantizer.state_dict()
    assert set(sd) == {f"codebooks.{k}.{n}" for k in range(8) for n in ("codebook.weight", "vocab_usage")}
    assert sd["codebooks.3.codebook.weight"].shape == (64, 8)
    torch.testing.assert_close(sd["codebooks.3.codebook.weight"], quantizer.weight[3].detach())
    fresh = MultiCodebookQuantizer(num_codebooks=8, codebook_size=64, codebook_dim=8)
    fresh.load_state_dict(sd, strict=True)
    torch.testing.assert_close(fresh.weight, quantizer.weight)
    del sd["codebooks.5.vocab_usage"]
    with pytest.raises(RuntimeError, match="vocab_usage"):
        fresh.load_state_dict(sd, strict=True)


def test_bad_ids_are_rejected(quantizer):
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        quantizer.idx_to_f(torch.full((1, 8, 4), 64))
    with pytest.raises(ValueError, match="shape"):
        quantizer.idx_to_f(torch.zeros(1, 7, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="64 channels"):
        quantizer(torch.randn(1, 4, 32))


def test_ids_are_float32_decisions_under_bf16_autocast():
    """4,096 codewords on the 8-d sphere leave near-ties that bf16 scores would break differently: the
    assignment must ignore an enclosing autocast region (on every path: f_to_idx, quantize, forward)."""
    torch.manual_seed(0)
    q = MultiCodebookQuantizer()
    z = torch.randn(4, 256, 64)
    ids32 = q.f_to_idx(z)
    # the hazard is real: scoring the same chunks in bf16 changes some ids
    chunks = F.normalize(z.reshape(-1, 8, 8).transpose(0, 1), dim=-1)
    sim16 = torch.bmm(chunks.bfloat16(), q.normalized_codebooks().bfloat16().transpose(1, 2))
    assert (sim16.argmax(-1).reshape(8, 4, 256).transpose(0, 1) != ids32).any()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(q.f_to_idx(z), ids32)
        assert torch.equal(q.quantize(z)[0], ids32)
        assert torch.equal(q(z).ids, ids32)
