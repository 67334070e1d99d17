"""torch.compile(fullgraph=True) of a HOPE layer: the memory mixer's forward and backward trace as
one graph (no host-device sync, no data-dependent shape inside the layer), and the compiled layer
equals the eager one. Packed documents are the hard case: their offsets reach the op twice, on
the device and on the host (Segments.cu_seqlens_cpu / max_seqlen, made once per batch)."""
import os

import pytest
import torch
import torch._inductor.config

from hope_dist.config import load_config
from hope_dist.model import document_segments


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("HOPE_COMPILE_TESTS") != "1",
                    reason="torch.compile's first call takes minutes on CPU: run with HOPE_COMPILE_TESTS=1")
def test_compiled_mixer_equals_eager_without_graph_breaks():
    torch._dynamo.reset()
    cfg = load_config("configs/tiny.yaml", ["--model.d_model=32", "--model.n_heads=2", "--model.chunk_size=8",
                                            "--model.proj_chunk_size=8", "--model.kernel=torch"]).model
    torch.manual_seed(0)
    with torch.device("meta"):
        mixer = cfg.mixer_spec.build(cfg)
    mixer.to_empty(device="cpu").init_weights()
    tokens = torch.randint(1, 50, (2, 24))
    tokens[0, 9] = tokens[1, 16] = 0  # end-of-document tokens: documents of 10, 14, 17 and 7 tokens
    segs = document_segments(tokens, eod_id=0)
    assert segs.cu_seqlens is not None and segs.cu_seqlens_cpu is not None and segs.max_seqlen == 17
    x = torch.randn(2, 24, cfg.d_model)
    grad_y = torch.randn(2, 24, cfg.d_model)

    def step(layer, x):
        x = x.detach().requires_grad_(True)
        y, _ = layer(x, segs)
        params = [x, *layer.parameters()]
        return y.detach(), torch.autograd.grad((y * grad_y).sum(), params)

    y_ref, grads_ref = step(mixer, x)
    compiled = torch.compile(mixer, fullgraph=True)  # a graph break raises here
    with torch._inductor.config.patch(compile_threads=1):  # no worker pool left behind at exit
        y, grads = step(compiled, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
