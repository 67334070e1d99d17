"""The attention mixer's kernels (model.attn_impl): which one runs where, and that each equals
softmax(q k^T / sqrt(d) + causal document mask) v written out, on random packed rows.

Tolerances: float64 everywhere on CPU, outputs and gradients within 1e-12 (max abs; measured ~1e-16);
the GPU test (flash-attn, bf16) within 2e-2 of the float32 reference."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from hope_dist.config import ConfigError, ModelConfig
from hope_dist.model import attention
from hope_dist.model.attention import AttentionMixer, resolve_attn_impl, varlen_inputs
from hope_dist.model.segments import document_segments

EOD = 0
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def reference(q, k, v, seg):
    """The definition: scores, causal mask within a document (seg None: one per row), softmax, values."""
    T = q.shape[2]
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if seg is not None:
        allowed = allowed & (seg[:, None, :, None] == seg[:, None, None, :])
    scores = (q @ k.mT / math.sqrt(q.shape[-1])).masked_fill(~allowed, -math.inf)
    return torch.softmax(scores, dim=-1) @ v


def packed_batch(B=2, H=3, T=40, d=8, dtype=torch.float64, device=CPU, seed=0):
    """Random q, k, v (B, H, T, d) and the Segments of rows holding several documents of random lengths."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 50, (B, T), generator=g)
    tokens[torch.rand(B, T, generator=g) < 0.12] = EOD
    segs = document_segments(tokens.to(device), EOD)
    assert segs.cu_seqlens is not None  # several documents in a row
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=dtype).to(device).requires_grad_() for _ in range(3))
    return q, k, v, segs


def mixer(impl: str) -> AttentionMixer:
    return AttentionMixer(ModelConfig(d_model=24, n_heads=3, mixer="attention", attn_impl=impl))


@pytest.mark.parametrize("requested,device,dtype,training,flash,expected", [
    ("auto", CUDA, torch.bfloat16, True, True, "flash"),
    ("auto", CUDA, torch.float32, True, True, "flex"),  # flash-attn takes 16-bit inputs only
    ("auto", CUDA, torch.bfloat16, True, False, "flex"),
    ("auto", CPU, torch.bfloat16, True, True, "sdpa"),
    ("auto", CPU, torch.float32, False, False, "sdpa"),
    ("sdpa", CUDA, torch.bfloat16, True, True, "sdpa"),
    ("flex", CUDA, torch.float32, True, False, "flex"),
    ("flex", CPU, torch.float64, False, False, "flex"),  # forward only: FlexAttention runs eagerly on CPU
    ("flash", CUDA, torch.float16, True, True, "flash"),
])
def test_selection(requested, device, dtype, training, flash, expected):
    assert resolve_attn_impl(requested, device, dtype, training, has_flash=flash) == expected


@pytest.mark.parametrize("requested,device,dtype,training,flash,message", [
    ("flash", CUDA, torch.bfloat16, True, False, "pip install -e .[flash]"),
    ("flash", CPU, torch.bfloat16, True, True, "needs CUDA and float16/bfloat16"),
    ("flash", CUDA, torch.float32, True, True, "needs CUDA and float16/bfloat16"),
    ("flex", CPU, torch.float32, True, False, "no CPU backward"),
])
def test_selection_errors_name_the_key(requested, device, dtype, training, flash, message):
    with pytest.raises(ConfigError, match="model.attn_impl") as e:
        resolve_attn_impl(requested, device, dtype, training, has_flash=flash)
    assert message in str(e.value)


@pytest.mark.parametrize("documents", [True, False])
def test_sdpa_equals_reference_with_gradients(documents):
    q, k, v, segs = packed_batch()
    segs = segs if documents else None
    out = mixer("sdpa").attend(q, k, v, segs, past=0)
    ref = reference(q, k, v, segs.seg if documents else None)
    assert (out - ref).abs().max() < 1e-12
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads):
        assert (a - b).abs().max() < 1e-12


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
@pytest.mark.parametrize("documents", [True, False])
def test_flex_equals_reference(documents):
    q, k, v, segs = packed_batch(seed=1)
    q, k, v = (x.detach() for x in (q, k, v))  # FlexAttention refuses CPU inputs that require grad
    segs = segs if documents else None
    out = mixer("flex").attend(q, k, v, segs, past=0)
    ref = reference(q, k, v, segs.seg if documents else None)
    assert (out - ref).abs().max() < 1e-12


def test_varlen_inputs_are_the_documents():
    """What the flash path hands flash_attn_varlen_func: attention run per document over the packed
    tokens and offsets equals the masked reference (flash-attn itself needs a GPU)."""
    q, k, v, segs = packed_batch(seed=2)
    B, H, T, d = q.shape
    (pq, cu, max_len), (pk, _, _), (pv, _, _) = (varlen_inputs(x.detach(), segs) for x in (q, k, v))
    assert cu.dtype == torch.int32 and max_len == int(cu.diff().max())
    out = torch.empty_like(pq)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):  # each document alone, heads first
        doc = [x[s:e].transpose(0, 1)[None] for x in (pq, pk, pv)]
        out[s:e] = reference(*doc, None)[0].transpose(0, 1)
    ref = reference(q, k, v, segs.seg).detach()
    assert (out.view(B, T, H, d).transpose(1, 2) - ref).abs().max() < 1e-12
    _, cu_rows, len_rows = varlen_inputs(q.detach(), None)  # one document per row
    assert cu_rows.tolist() == [0, T, 2 * T] and len_rows == T


def test_choice_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(attention, "_logged", set())
    m = mixer("auto")
    x = torch.randn(2, 16, 24)
    with caplog.at_level(logging.INFO, logger="hope_dist.model.attention"):
        for _ in range(3):
            m(x)
    records = [r.getMessage() for r in caplog.records if r.name == "hope_dist.model.attention"]
    assert records == ["attention kernel: sdpa (model.attn_impl=auto, cpu)"]


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and attention.flash_available()), reason="needs CUDA and flash-attn")
def test_flash_equals_reference_on_gpu():
    q, k, v, segs = packed_batch(dtype=torch.float32, device=CUDA, d=64)
    ref = reference(q, k, v, segs.seg)
    out = mixer("flash").attend(*(x.bfloat16() for x in (q, k, v)), segs, past=0)
    assert (out.float() - ref).abs().max() < 2e-2
