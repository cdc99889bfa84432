"""2 gloo processes give the same InfoNCE loss and gradients as 1 process on the global batch."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlm.objectives import clip_infonce

B, D = 10, 6


def inputs():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1)
    return img, txt


def reference():
    img, txt = (t.clone().requires_grad_() for t in inputs())
    scale = torch.tensor([1.7], requires_grad=True)
    loss = clip_infonce(image_embed=img, text_embed=txt, logit_scale=scale)["clip_infonce"]
    loss.backward()
    return loss.detach(), img.grad, txt.grad, scale.grad


def _rank(rank, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    img, txt = inputs()
    half = slice(rank * B // 2, (rank + 1) * B // 2)
    img, txt = img[half].clone().requires_grad_(), txt[half].clone().requires_grad_()
    scale = torch.tensor([1.7], requires_grad=True)
    loss = clip_infonce(image_embed=img, text_embed=txt, logit_scale=scale)["clip_infonce"]
    loss.backward()
    # DeepSpeed averages parameter gradients over ranks; do the same for the shared scale
    dist.all_reduce(scale.grad)
    scale.grad /= 2
    losses = [torch.zeros(()) for _ in range(2)]
    dist.all_gather(losses, loss.detach())
    queue.put((rank, sum(losses) / 2, img.grad, txt.grad, scale.grad))
    dist.destroy_process_group()


def test_two_ranks_match_one_process_on_the_global_batch():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get() for _ in range(2))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    loss, img_g, txt_g, scale_g = reference()
    # per-rank losses average to the global loss; each rank's input grads are its rows of
    # the global gradient scaled by 2 (each rank's loss is a mean over half the rows)
    assert torch.allclose(results[0][1], loss, rtol=1e-6)
    got_img = torch.cat([r[2] for r in results]) / 2
    got_txt = torch.cat([r[3] for r in results]) / 2
    assert torch.allclose(got_img, img_g, atol=1e-6)
    assert torch.allclose(got_txt, txt_g, atol=1e-6)
    assert torch.allclose(results[0][4], scale_g, atol=1e-6)
